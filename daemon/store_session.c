/*
 * The broker session's subscriptions as the history knows them, so that a
 * session the broker kept is not SUBSCRIBEd again (G8: that would replay
 * retained messages).
 */
#include <stdlib.h>
#include <string.h>

#include <sqlite3.h>

#include "store_internal.h"

enum session_stmt_id {
	SSTMT_SET,
	SSTMT_DEL,
	SSTMT_COUNT
};

static const char *const session_sql[SSTMT_COUNT] = {
	[SSTMT_SET] =
	    "INSERT OR REPLACE INTO session_subscriptions (filter, qos, subscribed_at)"
	    " VALUES (?1, ?2, CAST(strftime('%s', 'now') AS INTEGER) * 1000)",
	[SSTMT_DEL] = "DELETE FROM session_subscriptions WHERE filter = ?1",
};

const struct store_sql store_session_sql = { session_sql, SSTMT_COUNT };

int
store_subscriptions_load(struct store *st, const char *session_key,
    struct store_subscription **out, size_t *n)
{
	sqlite3_stmt *s = NULL;
	struct store_subscription *subs = NULL;
	size_t count = 0;
	int rc;

	*out = NULL;
	*n = 0;
	if (sqlite3_prepare_v2(store_db(st),
	    "SELECT filter, qos FROM session_subscriptions"
	    " WHERE (SELECT value FROM meta WHERE key = 'session') = ?1 ORDER BY filter",
	    -1, &s, NULL) != SQLITE_OK)
		return store_fail(st, "reading session_subscriptions");
	sqlite3_bind_text(s, 1, session_key, -1, SQLITE_STATIC);
	while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
		struct store_subscription *grown = realloc(subs, (count + 1) * sizeof(*subs));
		if (grown == NULL)
			goto fail;
		subs = grown;
		subs[count].qos = sqlite3_column_int(s, 1);
		if ((subs[count].filter = strdup((const char *)sqlite3_column_text(s, 0))) == NULL)
			goto fail;
		count++;
	}
	if (rc != SQLITE_DONE)
		goto fail;
	sqlite3_finalize(s);
	*out = subs;
	*n = count;
	return 0;
fail:
	store_fail(st, "reading session_subscriptions");
	sqlite3_finalize(s);
	store_subscriptions_free(subs, count);
	return -1;
}

void
store_subscriptions_free(struct store_subscription *subs, size_t n)
{
	for (size_t i = 0; i < n; i++)
		free(subs[i].filter);
	free(subs);
}

int
store_subscriptions_forget(struct store *st, const char *session_key)
{
	sqlite3_stmt *s = NULL;
	int rc;

	if (sqlite3_exec(store_db(st), "DELETE FROM session_subscriptions", NULL, NULL, NULL) != SQLITE_OK)
		return store_fail(st, "clearing session_subscriptions");
	if (sqlite3_prepare_v2(store_db(st),
	    "INSERT OR REPLACE INTO meta (key, value) VALUES ('session', ?1)", -1, &s, NULL) != SQLITE_OK)
		return store_fail(st, "recording the session");
	sqlite3_bind_text(s, 1, session_key, -1, SQLITE_STATIC);
	rc = sqlite3_step(s);
	sqlite3_finalize(s);
	if (rc != SQLITE_DONE)
		return store_fail(st, "recording the session");
	return 0;
}

int
store_subscription_set(struct store *st, const char *filter, int qos)
{
	sqlite3_bind_text(store_stmt(st, STORE_PART_SESSION, SSTMT_SET), 1, filter, -1, SQLITE_STATIC);
	sqlite3_bind_int(store_stmt(st, STORE_PART_SESSION, SSTMT_SET), 2, qos);
	return store_run(st, STORE_PART_SESSION, SSTMT_SET, NULL);
}

int
store_subscription_del(struct store *st, const char *filter)
{
	sqlite3_bind_text(store_stmt(st, STORE_PART_SESSION, SSTMT_DEL), 1, filter, -1, SQLITE_STATIC);
	return store_run(st, STORE_PART_SESSION, SSTMT_DEL, NULL);
}
