/*
 * What the files of the store module share (store.c, store_dedup.c), in the
 * way of mosquitto's lib/mosquitto_internal.h: nothing outside them includes it.
 */
#ifndef CMDRELAY_STORE_INTERNAL_H
#define CMDRELAY_STORE_INTERNAL_H

#include <stdint.h>

#include <sqlite3.h>

#include "dedup.h"
#include "store.h"

struct store_dedup;

sqlite3 *store_db(struct store *st);
/* The broker connection that deliveries are recorded under now. */
int64_t store_connection(const struct store *st);
struct store_dedup *store_dedup_of(struct store *st);

/* Sets the error that store_errmsg() returns, with SQLite's message; returns -1. */
int store_fail(struct store *st, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Runs a statement that returns nothing or one integer; resets it. */
int store_step(struct store *st, sqlite3_stmt *s, int64_t *out);
/* libmosquitto hands an empty payload as NULL; SQL must see an empty BLOB. */
void store_bind_payload(sqlite3_stmt *s, int col, const struct delivery *d);

/* Prepares the dedup statements; NULL with the store's error set. */
struct store_dedup *store_dedup_new(struct store *st);
void store_dedup_free(struct store_dedup *sd);

#endif
