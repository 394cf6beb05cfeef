/* The schema migrations of sql/NNN_*.sql, compiled in by the Makefile. */
#ifndef CMDRELAY_MIGRATIONS_H
#define CMDRELAY_MIGRATIONS_H

#include <stddef.h>

struct migration {
	int version;
	const char *name;
	const char *sql;
};

extern const struct migration migrations[];
extern const size_t nmigrations;

#endif
