/*
 * What every unit test file shares: cmocka (which wants these headers
 * first) and the TEST() shorthand. One file per module of daemon/.
 */
#ifndef CMDRELAY_UNIT_H
#define CMDRELAY_UNIT_H

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#define TEST(name) static void name(void **state __attribute__((unused)))

#endif
