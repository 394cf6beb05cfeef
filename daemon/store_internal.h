/*
 * What the files of the store module share (store.c and store_*.c), in the
 * way of mosquitto's lib/mosquitto_internal.h: nothing outside them includes it.
 */
#ifndef CMDRELAY_STORE_INTERNAL_H
#define CMDRELAY_STORE_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <sqlite3.h>

#include "dedup.h"
#include "store.h"

struct store_dedup;

sqlite3 *store_db(struct store *st);
/* The broker connection that deliveries are recorded under now. */
int64_t store_connection(const struct store *st);
struct store_dedup *store_dedup_of(struct store *st);

/* The age clock (store_clock.c): what retention measures ages with. */
struct store_age_clock {
	int64_t base_ms;	/* the age clock at boot_ms */
	int64_t boot_ms;	/* CLOCK_BOOTTIME when this process took the clock over */
	char boot_id[40];	/* /proc/sys/kernel/random/boot_id of this boot */
};
struct store_age_clock *store_age_clock_of(struct store *st);
/* Takes the clock over from the history's last save (meta age_clock), at open. */
int store_age_clock_resume(struct store *st);
/* SQL age_clock(), registered with the store as its user data. */
void store_age_clock_sql(sqlite3_context *ctx, int argc, sqlite3_value **argv);

/* Sets the error that store_errmsg() returns, with SQLite's message; returns -1. */
int store_fail(struct store *st, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Like store_fail, for damage SQLite reported in a result rather than a code. */
int store_set_corrupt(struct store *st, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
bool store_is_corrupt_rc(int rc);
/* quick_check answers in lines; the log wants one. */
void store_one_line(struct store *st);
/* PRAGMA quick_check within a time budget; *complete false when cut short (store_salvage.c). */
int store_check(struct store *st, bool *complete);
/* Renames path and its -wal, -shm to path.corrupt-<UTC time>, named in aside. */
int store_move_aside(const char *path, char *aside, size_t len, char *err, size_t errlen);
/* Copies what can be read of the history at aside into st; report says what. */
int store_salvage(struct store *st, const char *aside, char *report, size_t len);
/* Runs a statement that returns nothing or one integer; resets it. */
int store_step(struct store *st, sqlite3_stmt *s, int64_t *out);
/* libmosquitto hands an empty payload as NULL; SQL must see an empty BLOB. */
void store_bind_payload(sqlite3_stmt *s, int col, const void *payload, size_t len);

/*
 * The files of the store that keep their SQL beside their code, each in a
 * table indexed by its own enum; store.c prepares every table when the
 * history opens and finalizes them when it closes.
 */
enum store_part {
	STORE_PART_INGEST,	/* store_ingest.c */
	STORE_PART_CONSUMERS,	/* store_consumers.c */
	STORE_PART_OUTBOX,	/* store_outbox.c */
	STORE_PART_SESSION,	/* store_session.c */
	STORE_PART_PRUNE,	/* store_prune.c */
	STORE_NPARTS
};
struct store_sql {
	const char *const *sql;
	int n;
};
extern const struct store_sql store_ingest_sql, store_consumers_sql, store_outbox_sql, store_session_sql,
    store_prune_sql;
/* The prepared statement i of a part's table, and store_step() of it. */
sqlite3_stmt *store_stmt(struct store *st, enum store_part part, int i);
int store_run(struct store *st, enum store_part part, int i, int64_t *out);
/* Notes which known topics a filter no consumer had matches (filter_topics). */
int store_register_filter(struct store *st, const char *filter);

/*
 * Prepares the dedup statements and checks the PUBACK mark against the
 * history (fresh: a new file, whose mark is reset); NULL with the store's
 * error set, and corrupt when acknowledged commits are missing.
 */
struct store_dedup *store_dedup_new(struct store *st, bool fresh);
void store_dedup_free(struct store_dedup *sd);

/*
 * Takes the WAL checkpoint off writer's commits onto a thread of its own
 * (store_checkpoint.c); NULL if it cannot, and SQLite's own stays.
 */
struct store_checkpointer *store_checkpointer_start(sqlite3 *writer, const char *path);
void store_checkpointer_stop(struct store_checkpointer *cp);

#endif
