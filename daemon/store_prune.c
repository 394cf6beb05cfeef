/*
 * Retention's side of the history (store_prune()): which rows go, and the
 * topics that go with their last command.
 *
 * A topic's newest accepted command is what a retained replay repeats
 * (dedup.h), so it is kept past max_age and max_rows, but only for the
 * max_topics topics that accepted a command last: their last_accepted
 * values are the largest, so "exempt" is "last_accepted >= the
 * max_topics-th largest one", a walk of max_topics entries of topics_last
 * and one look-up per kept row. A row below that mark is never exempt.
 */
#include <stdlib.h>
#include <string.h>

#include "store_internal.h"

enum prune_stmt {
	PSTMT_THRESHOLD,
	PSTMT_AGE,
	PSTMT_ROWS,
	PSTMT_OUTBOX,
	PSTMT_TOPIC_GONE,
	PSTMT_COUNT
};

#define PRUNE_EXEMPT \
	" AND (m.id < ?3 OR NOT EXISTS (SELECT 1 FROM topics t WHERE t.last_accepted = m.id))"

static const char *const prune_sql[PSTMT_COUNT] = {
	/* 0 when fewer topics than that: every topic's newest is kept. */
	[PSTMT_THRESHOLD] =
	    "SELECT coalesce((SELECT last_accepted FROM topics WHERE last_accepted IS NOT NULL"
	    " ORDER BY last_accepted DESC LIMIT 1 OFFSET ?1), 0)",
	/* Older than max_age: gone, unless it is a kept topic's newest command. */
	[PSTMT_AGE] =
	    "DELETE FROM messages WHERE id IN (SELECT m.id FROM messages m"
	    " WHERE m.age_ms < age_clock() - ?1" PRUNE_EXEMPT
	    " ORDER BY m.age_ms LIMIT ?2) RETURNING topic",
	/* Beyond the newest max_rows: gone, unless kept or a consumer still needs it. */
	[PSTMT_ROWS] =
	    "DELETE FROM messages WHERE id IN (SELECT m.id FROM messages m"
	    " WHERE m.id <= (SELECT max(id) FROM messages) - ?1" PRUNE_EXEMPT
	    " AND NOT EXISTS (SELECT 1 FROM consumers c JOIN filter_topics f ON f.filter = c.filter"
	    "   WHERE f.topic = m.topic AND m.id > c.acked_id AND m.status = 'accepted')"
	    " ORDER BY m.id LIMIT ?2) RETURNING topic",
	/* Sent uplink messages older than max_age: gone; queued ones never. */
	[PSTMT_OUTBOX] =
	    "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox"
	    " WHERE status = 'sent' AND sent_age_ms < age_clock() - ?1 ORDER BY id LIMIT ?2)",
	/* Its filter_topics rows follow (trigger topics_gone). */
	[PSTMT_TOPIC_GONE] =
	    "DELETE FROM topics WHERE topic = ?1 AND NOT EXISTS (SELECT 1 FROM messages"
	    " WHERE topic = ?1 AND status = 'accepted')",
};

const struct store_sql store_prune_sql = { prune_sql, PSTMT_COUNT };

/* The topics of the rows one call removed, each once in a row: at most limit. */
struct prune_topics {
	char **topic;
	size_t n;
};

static void
store_prune_topics_clear(struct prune_topics *pt)
{
	for (size_t i = 0; i < pt->n; i++)
		free(pt->topic[i]);
	free(pt->topic);
	*pt = (struct prune_topics){ 0 };
}

/* Runs a DELETE ... RETURNING topic; returns the rows it removed, -1 on error. */
static int
store_prune_delete(struct store *st, sqlite3_stmt *s, struct prune_topics *pt)
{
	int n = 0, rc;

	while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
		const char *topic = (const char *)sqlite3_column_text(s, 0);

		n++;
		if (pt->n > 0 && strcmp(pt->topic[pt->n - 1], topic) == 0)
			continue;
		if ((pt->topic[pt->n] = strdup(topic)) == NULL) {
			rc = SQLITE_NOMEM;
			break;
		}
		pt->n++;
	}
	sqlite3_reset(s);
	sqlite3_clear_bindings(s);
	return rc == SQLITE_DONE ? n : store_fail(st, "%s", sqlite3_sql(s));
}

/* A topic whose last accepted command went leaves topics and filter_topics. */
static int
store_prune_topics(struct store *st, const struct prune_topics *pt)
{
	for (size_t i = 0; i < pt->n; i++) {
		sqlite3_bind_text(store_stmt(st, STORE_PART_PRUNE, PSTMT_TOPIC_GONE), 1, pt->topic[i], -1,
		    SQLITE_STATIC);
		if (store_run(st, STORE_PART_PRUNE, PSTMT_TOPIC_GONE, NULL) == -1)
			return -1;
	}
	return 0;
}

int
store_prune(struct store *st, const struct store_retention *r, int limit)
{
	sqlite3_stmt *age = store_stmt(st, STORE_PART_PRUNE, PSTMT_AGE);
	sqlite3_stmt *rows = store_stmt(st, STORE_PART_PRUNE, PSTMT_ROWS);
	sqlite3_stmt *outbox = store_stmt(st, STORE_PART_PRUNE, PSTMT_OUTBOX);
	struct prune_topics pt = { 0 };
	int64_t threshold;
	int n = 0, more;

	if ((pt.topic = calloc((size_t)limit, sizeof(char *))) == NULL)
		return store_fail(st, "retention");
	/* One transaction: a topic leaves with its last command, or neither. */
	if (store_begin(st) == -1)
		goto fail;
	sqlite3_bind_int64(store_stmt(st, STORE_PART_PRUNE, PSTMT_THRESHOLD), 1, r->max_topics - 1);
	if (store_run(st, STORE_PART_PRUNE, PSTMT_THRESHOLD, &threshold) == -1)
		goto fail;
	sqlite3_bind_int64(age, 1, r->max_age_ms);
	sqlite3_bind_int(age, 2, limit);
	sqlite3_bind_int64(age, 3, threshold);
	if ((n = store_prune_delete(st, age, &pt)) == -1)
		goto fail;
	if (n < limit) {
		sqlite3_bind_int64(outbox, 1, r->max_age_ms);
		sqlite3_bind_int(outbox, 2, limit - n);
		if (store_run(st, STORE_PART_PRUNE, PSTMT_OUTBOX, NULL) == -1)
			goto fail;
		n += sqlite3_changes(store_db(st));
	}
	if (n < limit) {
		sqlite3_bind_int64(rows, 1, r->max_rows);
		sqlite3_bind_int(rows, 2, limit - n);
		sqlite3_bind_int64(rows, 3, threshold);
		if ((more = store_prune_delete(st, rows, &pt)) == -1)
			goto fail;
		n += more;
	}
	if (store_prune_topics(st, &pt) == -1 || store_commit(st) == -1)
		goto fail;
	store_prune_topics_clear(&pt);
	return n;
fail:
	store_rollback(st);
	store_prune_topics_clear(&pt);
	return -1;
}
