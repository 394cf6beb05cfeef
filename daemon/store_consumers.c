/*
 * The named consumers' durable cursors in the history: open (hello), ack,
 * the sent mark behind "redelivered", reset and delete, expiry, and the
 * bounded lag that stats and metrics show.
 */
#include <sqlite3.h>

#include "event.h"
#include "store_internal.h"

enum consumers_stmt_id {
	CSTMT_GET,
	CSTMT_SENT_GET,
	CSTMT_ROOM,
	CSTMT_TOUCH,
	CSTMT_EXPIRE,
	CSTMT_PUT,
	CSTMT_ACK,
	CSTMT_MOVE,
	CSTMT_DELETE,
	CSTMT_SENT,
	CSTMT_SYNC_NORMAL,
	CSTMT_SYNC_FULL,
	CSTMT_COUNT
};

static const char *const consumers_sql[CSTMT_COUNT] = {
	[CSTMT_GET] = "SELECT acked_id FROM consumers WHERE name = ?1",
	[CSTMT_SENT_GET] = "SELECT sent_id FROM consumers WHERE name = ?1",
	[CSTMT_ROOM] =
	    "SELECT EXISTS (SELECT 1 FROM consumers WHERE name = ?1)"
	    " OR (SELECT count(*) FROM consumers) < ?2",
	[CSTMT_TOUCH] = "UPDATE consumers SET updated_at = ?2 WHERE name = ?1",
	[CSTMT_EXPIRE] =
	    "DELETE FROM consumers WHERE updated_at < ?1 RETURNING name, acked_id, updated_at",
	[CSTMT_PUT] =
	    "INSERT INTO consumers (name, filter, acked_id, updated_at) VALUES (?1, ?2, ?3, ?4)"
	    " ON CONFLICT (name) DO UPDATE SET filter = excluded.filter,"
	    " acked_id = excluded.acked_id, updated_at = excluded.updated_at",
	[CSTMT_ACK] =
	    "UPDATE consumers SET acked_id = ?2, updated_at = ?3, acked_at = ?3"
	    " WHERE name = ?1 AND acked_id < ?2",
	[CSTMT_MOVE] = "UPDATE consumers SET acked_id = ?2, updated_at = ?3 WHERE name = ?1",
	[CSTMT_DELETE] = "DELETE FROM consumers WHERE name = ?1",
	[CSTMT_SENT] = "UPDATE consumers SET sent_id = ?2 WHERE name = ?1 AND sent_id < ?2",
	[CSTMT_SYNC_NORMAL] = "PRAGMA synchronous = NORMAL",
	[CSTMT_SYNC_FULL] = "PRAGMA synchronous = FULL",
};

const struct store_sql store_consumers_sql = { consumers_sql, CSTMT_COUNT };

int
store_consumer_open(struct store *st, const char *name, const char *filter,
    const struct store_start *start, int64_t max_cursors, int64_t *resume_after, int64_t *sent_id)
{
	sqlite3_stmt *put = store_stmt(st, STORE_PART_CONSUMERS, CSTMT_PUT);
	int64_t acked = 0, room;

	if (store_begin(st) == -1)
		return -1;
	sqlite3_bind_text(store_stmt(st, STORE_PART_CONSUMERS, CSTMT_ROOM), 1, name, -1, SQLITE_STATIC);
	sqlite3_bind_int64(store_stmt(st, STORE_PART_CONSUMERS, CSTMT_ROOM), 2, max_cursors);
	if (store_run(st, STORE_PART_CONSUMERS, CSTMT_ROOM, &room) == -1)
		goto fail;
	if (!room) {
		store_rollback(st);
		return -2;
	}
	sqlite3_bind_text(store_stmt(st, STORE_PART_CONSUMERS, CSTMT_GET), 1, name, -1, SQLITE_STATIC);
	sqlite3_bind_text(store_stmt(st, STORE_PART_CONSUMERS, CSTMT_SENT_GET), 1, name, -1, SQLITE_STATIC);
	if (store_run(st, STORE_PART_CONSUMERS, CSTMT_GET, &acked) == -1 ||
	    store_run(st, STORE_PART_CONSUMERS, CSTMT_SENT_GET, sent_id) == -1 || store_register_filter(st, filter) == -1)
		goto fail;
	switch (start->from) {
	case STORE_FROM_STORED: {
		/* a new consumer starts at 0: the oldest row kept; a cursor
		 * stored beyond the newest row (before hello refused that)
		 * comes back to it, or new commands would pass it unseen */
		int64_t newest;
		if ((newest = store_last_id(st)) < 0)
			goto fail;
		if (acked > newest)
			acked = newest;
		break;
	}
	case STORE_FROM_LIVE:
		if ((acked = store_last_id(st)) < 0)
			goto fail;
		break;
	case STORE_FROM_ID:
		acked = start->id;
		break;
	}
	sqlite3_bind_text(put, 1, name, -1, SQLITE_STATIC);
	sqlite3_bind_text(put, 2, filter, -1, SQLITE_STATIC);
	sqlite3_bind_int64(put, 3, acked);
	sqlite3_bind_int64(put, 4, (int64_t)event_wall_ms());
	if (store_run(st, STORE_PART_CONSUMERS, CSTMT_PUT, NULL) == -1 || store_commit(st) == -1)
		goto fail;
	*resume_after = acked;
	return 0;
fail:
	store_rollback(st);
	return -1;
}

int
store_consumer_ack(struct store *st, const char *name, int64_t id)
{
	sqlite3_stmt *s = store_stmt(st, STORE_PART_CONSUMERS, CSTMT_ACK);

	sqlite3_bind_text(s, 1, name, -1, SQLITE_STATIC);
	sqlite3_bind_int64(s, 2, id);
	sqlite3_bind_int64(s, 3, (int64_t)event_wall_ms());
	return store_run(st, STORE_PART_CONSUMERS, CSTMT_ACK, NULL);
}

/*
 * Runs before the commands leave, so that after any crash of the relay a
 * command sent again is known as such. Not synced: the WAL keeps it in order
 * before the next synced commit, and a power cut that loses it takes the
 * local consumer down with the relay.
 */
int
store_consumer_sent(struct store *st, const char *name, int64_t id)
{
	int rc;

	sqlite3_bind_text(store_stmt(st, STORE_PART_CONSUMERS, CSTMT_SENT), 1, name, -1, SQLITE_STATIC);
	sqlite3_bind_int64(store_stmt(st, STORE_PART_CONSUMERS, CSTMT_SENT), 2, id);
	if (store_run(st, STORE_PART_CONSUMERS, CSTMT_SYNC_NORMAL, NULL) == -1)
		return -1;
	rc = store_run(st, STORE_PART_CONSUMERS, CSTMT_SENT, NULL);
	if (store_run(st, STORE_PART_CONSUMERS, CSTMT_SYNC_FULL, NULL) == -1)
		return -1;
	return rc;
}

int
store_consumer_touch(struct store *st, const char *name)
{
	sqlite3_bind_text(store_stmt(st, STORE_PART_CONSUMERS, CSTMT_TOUCH), 1, name, -1, SQLITE_STATIC);
	sqlite3_bind_int64(store_stmt(st, STORE_PART_CONSUMERS, CSTMT_TOUCH), 2, (int64_t)event_wall_ms());
	return store_run(st, STORE_PART_CONSUMERS, CSTMT_TOUCH, NULL);
}

int
store_consumers_expire(struct store *st, int64_t before_ms, store_consumer_fn *fn, void *arg)
{
	sqlite3_stmt *s = store_stmt(st, STORE_PART_CONSUMERS, CSTMT_EXPIRE);
	int n = 0, rc;

	sqlite3_bind_int64(s, 1, before_ms);
	while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
		struct store_consumer c = {
			.name = (const char *)sqlite3_column_text(s, 0),
			.acked_id = sqlite3_column_int64(s, 1),
			.updated_at_ms = sqlite3_column_int64(s, 2),
		};
		n++;
		fn(&c, arg);
	}
	sqlite3_reset(s);
	if (rc != SQLITE_DONE)
		return store_fail(st, "%s", consumers_sql[CSTMT_EXPIRE]);
	return n;
}

int
store_consumer_set(struct store *st, const char *name, const struct store_start *start,
    int64_t *acked_id)
{
	enum consumers_stmt_id id = start ? CSTMT_MOVE : CSTMT_DELETE;
	sqlite3_stmt *s = store_stmt(st, STORE_PART_CONSUMERS, id);
	int64_t newest;

	if ((newest = store_last_id(st)) < 0)
		return -1;
	*acked_id = start && start->from == STORE_FROM_ID ? start->id : newest;
	if (*acked_id > newest)
		return -3;
	sqlite3_bind_text(s, 1, name, -1, SQLITE_STATIC);
	if (start) {
		sqlite3_bind_int64(s, 2, *acked_id);
		sqlite3_bind_int64(s, 3, (int64_t)event_wall_ms());
	}
	if (store_run(st, STORE_PART_CONSUMERS, id, NULL) == -1)
		return -1;
	return sqlite3_changes(store_db(st)) == 0 ? -2 : 0;
}

/*
 * The lag as consumer_lag counts it, with bounded work: the daemon answers
 * stats and writes metrics from its loop, where a count over a long
 * history would stall everything else. A filter of at most
 * STORE_LAG_TOPICS topics is counted through messages_topic_id, a seek per
 * topic and at most STORE_LAG_SCAN + 1 rows: exact up to STORE_LAG_SCAN,
 * however far behind the ack is. A wider one walks at most STORE_LAG_SCAN
 * rows after the ack (or the oldest row kept): exact when that reaches
 * the newest row.
 */
int
store_consumers(struct store *st, store_consumer_fn *fn, void *arg)
{
	sqlite3_stmt *s;
	int rc;

	if (sqlite3_prepare_v2(store_db(st),
	    /* Two subqueries: min() and max() together would scan every row. */
	    "WITH b AS (SELECT coalesce((SELECT min(id) FROM messages), 1) - 1 AS lo,"
	    "   coalesce((SELECT max(id) FROM messages), 0) AS hi),"
	    " c AS (SELECT name, filter, acked_id, max(acked_id, lo) AS start, hi,"
	    "   (SELECT count(*) FROM (SELECT 1 FROM filter_topics f WHERE f.filter = consumers.filter"
	    "     LIMIT ?2 + 1)) <= ?2 AS narrow FROM consumers, b),"
	    " l AS MATERIALIZED (SELECT name, filter, acked_id, narrow, hi - start <= ?1 AS walked_all,"
	    "   CASE WHEN narrow THEN (SELECT count(*) FROM (SELECT 1 FROM filter_topics f"
	    "     JOIN messages m INDEXED BY messages_topic_id ON m.topic = f.topic"
	    "     WHERE f.filter = c.filter AND m.id > c.start AND m.status = 'accepted'"
	    "     AND m.oversize IS NULL LIMIT ?1 + 1))"
	    "   ELSE (SELECT count(*) FROM messages m WHERE m.id > c.start AND m.id <= c.start + ?1"
	    "     AND +m.status = 'accepted' AND m.oversize IS NULL"
	    "     AND +m.topic IN (SELECT topic FROM filter_topics f WHERE f.filter = c.filter)) END AS n"
	    "   FROM c)"
	    " SELECT name, filter, acked_id, min(n, ?1), CASE WHEN narrow THEN n <= ?1 ELSE walked_all END"
	    " FROM l ORDER BY name", -1, &s, NULL) != SQLITE_OK)
		return store_fail(st, "reading the consumers");
	sqlite3_bind_int(s, 1, STORE_LAG_SCAN);
	sqlite3_bind_int(s, 2, STORE_LAG_TOPICS);
	while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
		struct store_consumer c = {
			.name = (const char *)sqlite3_column_text(s, 0),
			.filter = (const char *)sqlite3_column_text(s, 1),
			.acked_id = sqlite3_column_int64(s, 2),
			.lag = sqlite3_column_int64(s, 3),
			.lag_exact = sqlite3_column_int(s, 4),
		};
		if (fn(&c, arg) == -1)
			break;
	}
	sqlite3_finalize(s);
	return rc == SQLITE_ROW || rc == SQLITE_DONE ? 0 : store_fail(st, "reading the consumers");
}
