/* The SQLite history: schema migrations, group-committed inserts, dedup look-ups. */
#ifndef CMDRELAY_STORE_H
#define CMDRELAY_STORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "dedup.h"
#include "topic.h"

#define STORE_ERR_MAX 512

struct store;
struct sqlite3;

struct store_subscription {
	char *filter;
	int qos;
};

/*
 * Opens (creating if needed) and migrates the history at path; a damaged
 * one is moved aside and salvaged into a fresh history when recover is set.
 */
struct store *store_new(const char *path, bool recover, char *err, size_t errlen);
void store_free(struct store *st);
/* True when store_new() found no file and began a new history. */
bool store_created(const struct store *st);
const char *store_errmsg(const struct store *st);
/*
 * The size of the history's WAL. Checkpoints keep it near 1 MiB; much more
 * means a reader holds an old snapshot, and the WAL grows until it lets go.
 */
int64_t store_wal_bytes(const char *db_path);
#define STORE_WAL_PINNED (64LL * 1024 * 1024)
/* The last failure was another connection's lock (an admin's write, a long reader). */
bool store_busy(const struct store *st);

/* The history reported damage: commits fail until a restart recovers it. */
bool store_corrupt(const struct store *st);
/* Recoveries from a damaged history not yet acknowledged, and what the last one did. */
int64_t store_corruptions(const struct store *st);
const char *store_corruption(const struct store *st);
int store_corruption_ack(struct store *st);
/* False when the start-up integrity check ran out of its time budget (a huge history). */
bool store_check_complete(const struct store *st);

int store_begin(struct store *st);
int store_commit(struct store *st);
void store_rollback(struct store *st);

/* Numbers a new broker connection; redeliveries are matched across them. */
int64_t store_connection_start(struct store *st);
const struct dedup_source *store_dedup_source(struct store *st);

/*
 * The messages earlier connections left without a confirmed PUBACK,
 * recorded less than window_ms ago on the age clock (no wall-clock step
 * moves it), oldest first (store_dedup.c); *out is malloc'ed.
 */
int store_unacked_load(struct store *st, int64_t window_ms, struct dedup_candidate **out,
    size_t *n);
/* row, delivered now with packet id mid, waits for the broker to have its PUBACK. */
int store_unacked_add(struct store *st, int64_t row, const struct dedup_verdict *v, int mid);
/* The broker has every PUBACK that connection sent for rows up to row. */
int store_unacked_confirm(struct store *st, int64_t connection, int64_t row);
/* The PUBACKs of rows up to row of connection may leave now (store_dedup.c). */
int store_puback_mark(struct store *st, int64_t connection, int64_t row);
/* The redeliveries are over: what earlier connections left and did not come again is acknowledged. */
int store_unacked_retire(struct store *st);

/* Where a named consumer starts: after its last ack, after the newest row, or after an id. */
struct store_start {
	enum { STORE_FROM_STORED, STORE_FROM_LIVE, STORE_FROM_ID } from;
	int64_t id;
};

/* An accepted command as read back for consumers; valid during the callback. */
struct stored_command {
	int64_t id;
	int64_t received_at_ms;
	const char *topic;
	const void *payload;
	size_t payloadlen;
	int qos;
	bool retain;
	const char *fields_json;	/* NULL when the topic did not fit topic_fields */
	int64_t possible_repeat_of;	/* the row it may repeat (dedup.h); 0: none */
};

/* Returns -1 to stop the fetch early. */
typedef int store_command_fn(const struct stored_command *c, void *arg);

int store_insert(struct store *st, const struct delivery *d,
    const struct dedup_verdict *v, const struct topic_fields *fields, int64_t *id);
/* The row came from the inject op, not from a broker. */
int store_mark_injected(struct store *st, int64_t row);

/* Notes that row id's payload of payloadlen bytes was too large to keep. */
int store_mark_oversize(struct store *st, int64_t id, size_t payloadlen);

/* What retention keeps (store.retention, store.max_topics). */
struct store_retention {
	int64_t max_age_ms;
	int64_t max_rows;
	int64_t max_topics;
};

/*
 * Deletes up to limit rows that retention lets go, in one transaction:
 * older than max_age_ms on the age clock (wall-clock steps do not age a
 * row), or beyond the newest max_rows and acknowledged by every consumer
 * whose filter matches; never the newest accepted command of one of the
 * max_topics topics that accepted one last. A topic without accepted rows
 * left goes from topics and filter_topics. Returns how many, -1 on error.
 */
int store_prune(struct store *st, const struct store_retention *r, int limit);
/* Records the age clock, so that after a reboot it goes on from here. */
int store_age_clock_save(struct store *st);

/*
 * Creates or moves a named consumer's cursor; *resume_after is where it
 * starts, *sent_id the highest id ever sent to it. -2: a new name, and
 * max_cursors cursors exist already.
 */
int store_consumer_open(struct store *st, const char *name, const char *filter,
    const struct store_start *start, int64_t max_cursors, int64_t *resume_after, int64_t *sent_id);
int store_consumer_ack(struct store *st, const char *name, int64_t id);
/* Records that commands up to id are about to be sent to the consumer. */
int store_consumer_sent(struct store *st, const char *name, int64_t id);
/*
 * Moves a cursor to after an id or the newest row (start NULL: deletes it);
 * *acked_id is where it is now. -2: no such consumer, -3: the id is beyond
 * the newest row, -1: storage.
 */
int store_consumer_set(struct store *st, const char *name, const struct store_start *start,
    int64_t *acked_id);

struct store_consumer {
	const char *name;
	const char *filter;
	int64_t acked_id;
	int64_t lag;
	bool lag_exact;		/* false: at least lag, more beyond the rows counted */
	int64_t updated_at_ms;	/* store_consumers_expire() only */
};
/* History rows one consumer's lag may count in the daemon: about a millisecond. */
#define STORE_LAG_SCAN 4096
/* Topics a filter may match for its lag to be counted per topic: a seek each. */
#define STORE_LAG_TOPICS 64
typedef int store_consumer_fn(const struct store_consumer *c, void *arg);
/* Every named consumer with its lag (as view consumer_lag, bounded), by name. */
int store_consumers(struct store *st, store_consumer_fn *fn, void *arg);
int64_t store_last_id(struct store *st);

/* The rows of one local day: [since_ms, until_ms), its midnights. */
struct store_day {
	int64_t since_ms, until_ms;
	uint64_t received, accepted, duplicates, possible_repeats;
};
/* The local midnight days after (before, when negative) the one that began unix_ms's day. */
int64_t store_local_midnight(int64_t unix_ms, int days);
/* The day of now_ms so far, through the received_at index; for cmdrelayctl's read-only handle. */
int store_day_count(struct sqlite3 *db, int64_t now_ms, struct store_day *day);
int store_today(struct store *st, int64_t now_ms, struct store_day *day);
/* Marks a cursor as in use now. */
int store_consumer_touch(struct store *st, const char *name);
/* Removes the cursors last used before before_ms, calling fn for each; returns how many. */
int store_consumers_expire(struct store *st, int64_t before_ms, store_consumer_fn *fn, void *arg);
/*
 * Calls fn for up to limit accepted commands with after_id < id <= upto_id,
 * in id order; filter NULL: every topic. Returns how many were read, -1 on
 * error. The rows walked are bounded by upto_id - after_id.
 */
int store_fetch(struct store *st, const char *filter, int64_t after_id, int64_t upto_id,
    int limit, store_command_fn *fn, void *arg);

/* A local program's publication in the outbox. */
struct outbox_msg {
	int64_t id;
	const char *topic;
	const void *payload;
	size_t payloadlen;
	int qos;
	bool retain;
};
typedef int store_outbox_fn(const struct outbox_msg *msg, void *arg);

/* Commits msg to the outbox; -2 when max_queued messages wait already. */
int store_outbox_add(struct store *st, const struct outbox_msg *msg, const char *origin,
    int64_t max_queued, int64_t *id);
/* Queued messages after after_id, in order; returns how many, -1 on error. */
int store_outbox_next(struct store *st, int64_t after_id, int limit, store_outbox_fn *fn, void *arg);
int store_outbox_handed(struct store *st, int64_t id);
int store_outbox_sent(struct store *st, int64_t id);
int store_outbox_failed(struct store *st, int64_t id);

/*
 * The subscriptions the broker session holds, as last confirmed by SUBACK.
 * They belong to one session (client id at a broker): under another
 * session_key the list is empty.
 */
int store_subscriptions_load(struct store *st, const char *session_key,
    struct store_subscription **out, size_t *n);
void store_subscriptions_free(struct store_subscription *subs, size_t n);
int store_subscriptions_forget(struct store *st, const char *session_key);
int store_subscription_set(struct store *st, const char *filter, int qos);
int store_subscription_del(struct store *st, const char *filter);

#endif
