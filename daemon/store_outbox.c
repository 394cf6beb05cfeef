/* The uplink outbox: local programs' publications, queued until the broker has them. */
#include <sqlite3.h>

#include "event.h"
#include "store_internal.h"

enum outbox_stmt_id {
	OSTMT_QUEUED,
	OSTMT_ADD,
	OSTMT_NEXT,
	OSTMT_HANDED,
	OSTMT_SENT,
	OSTMT_FAILED,
	OSTMT_COUNT
};

static const char *const outbox_sql[OSTMT_COUNT] = {
	[OSTMT_QUEUED] = "SELECT count(*) FROM outbox WHERE status = 'queued'",
	[OSTMT_ADD] =
	    "INSERT INTO outbox (queued_at, topic, payload, qos, retain, origin)"
	    " VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
	[OSTMT_NEXT] =
	    "SELECT id, topic, payload, qos, retain FROM outbox"
	    " WHERE status = 'queued' AND id > ?1 ORDER BY id LIMIT ?2",
	[OSTMT_HANDED] = "UPDATE outbox SET attempts = attempts + 1 WHERE id = ?1",
	[OSTMT_SENT] =
	    "UPDATE outbox SET status = 'sent', sent_at = ?2, sent_age_ms = age_clock() WHERE id = ?1",
	[OSTMT_FAILED] = "UPDATE outbox SET status = 'failed' WHERE id = ?1",
};

const struct store_sql store_outbox_sql = { outbox_sql, OSTMT_COUNT };

int
store_outbox_add(struct store *st, const struct outbox_msg *msg, const char *origin,
    int64_t max_queued, int64_t *id)
{
	sqlite3_stmt *s = store_stmt(st, STORE_PART_OUTBOX, OSTMT_ADD);
	int64_t queued;

	if (store_run(st, STORE_PART_OUTBOX, OSTMT_QUEUED, &queued) == -1)
		return -1;
	if (queued >= max_queued)
		return -2;
	sqlite3_bind_int64(s, 1, (int64_t)event_wall_ms());
	sqlite3_bind_text(s, 2, msg->topic, -1, SQLITE_STATIC);
	store_bind_payload(s, 3, msg->payload, msg->payloadlen);
	sqlite3_bind_int(s, 4, msg->qos);
	sqlite3_bind_int(s, 5, msg->retain);
	sqlite3_bind_text(s, 6, origin, -1, SQLITE_STATIC);
	if (store_run(st, STORE_PART_OUTBOX, OSTMT_ADD, NULL) == -1)
		return -1;
	*id = sqlite3_last_insert_rowid(store_db(st));
	return 0;
}

int
store_outbox_next(struct store *st, int64_t after_id, int limit, store_outbox_fn *fn, void *arg)
{
	sqlite3_stmt *s = store_stmt(st, STORE_PART_OUTBOX, OSTMT_NEXT);
	int n = 0, rc;

	sqlite3_bind_int64(s, 1, after_id);
	sqlite3_bind_int(s, 2, limit);
	while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
		const struct outbox_msg msg = {
			.id = sqlite3_column_int64(s, 0),
			.topic = (const char *)sqlite3_column_text(s, 1),
			.payload = sqlite3_column_blob(s, 2),
			.payloadlen = (size_t)sqlite3_column_bytes(s, 2),
			.qos = sqlite3_column_int(s, 3),
			.retain = sqlite3_column_int(s, 4),
		};
		n++;
		if (fn(&msg, arg) == -1)
			break;
	}
	sqlite3_reset(s);
	if (rc != SQLITE_ROW && rc != SQLITE_DONE)
		return store_fail(st, "%s", outbox_sql[OSTMT_NEXT]);
	return n;
}

int
store_outbox_handed(struct store *st, int64_t id)
{
	sqlite3_bind_int64(store_stmt(st, STORE_PART_OUTBOX, OSTMT_HANDED), 1, id);
	return store_run(st, STORE_PART_OUTBOX, OSTMT_HANDED, NULL);
}

int
store_outbox_sent(struct store *st, int64_t id)
{
	sqlite3_bind_int64(store_stmt(st, STORE_PART_OUTBOX, OSTMT_SENT), 1, id);
	sqlite3_bind_int64(store_stmt(st, STORE_PART_OUTBOX, OSTMT_SENT), 2, (int64_t)event_wall_ms());
	return store_run(st, STORE_PART_OUTBOX, OSTMT_SENT, NULL);
}

int
store_outbox_failed(struct store *st, int64_t id)
{
	sqlite3_bind_int64(store_stmt(st, STORE_PART_OUTBOX, OSTMT_FAILED), 1, id);
	return store_run(st, STORE_PART_OUTBOX, OSTMT_FAILED, NULL);
}
