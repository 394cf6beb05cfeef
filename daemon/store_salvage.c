/*
 * A damaged history (a worn SD card): the bounded check at start, and the
 * recovery that moves the file aside and carries into a fresh history what
 * can still be read, row by row with the ids kept.
 */
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include <sqlite3.h>

#include "event.h"
#include "store_internal.h"

/*
 * quick_check reads every page once (about 1 s per GB on an SD card);
 * past this budget it is interrupted and the start goes on, so a huge
 * history delays the start by at most this much.
 */
#define SALVAGE_CHECK_BUDGET_US (5 * 1000 * 1000)
/* VM steps between budget checks: a few microseconds each. */
#define SALVAGE_PROGRESS_OPS 10000
/* Ids probed one by one at most: about a second of look-ups. */
#define SALVAGE_MAX_ROWS 1000000

struct salvage_clock {
	uint64_t deadline_us;
	bool expired;
};

static int
salvage_progress(void *arg)
{
	struct salvage_clock *c = arg;

	if (event_now_us() < c->deadline_us)
		return 0;
	c->expired = true;
	return 1;
}

bool
store_is_corrupt_rc(int rc)
{
	rc &= 0xff;
	return rc == SQLITE_CORRUPT || rc == SQLITE_NOTADB;
}

int
store_check(struct store *st, bool *complete)
{
	struct salvage_clock clock = { event_now_us() + SALVAGE_CHECK_BUDGET_US, false };
	sqlite3 *db = store_db(st);
	sqlite3_stmt *s = NULL;
	const char *first = NULL;
	int rc;

	*complete = true;
	if (sqlite3_prepare_v2(db, "PRAGMA quick_check(1)", -1, &s, NULL) != SQLITE_OK)
		return store_fail(st, "integrity check");
	sqlite3_progress_handler(db, SALVAGE_PROGRESS_OPS, salvage_progress, &clock);
	if ((rc = sqlite3_step(s)) == SQLITE_ROW)
		first = (const char *)sqlite3_column_text(s, 0);
	sqlite3_progress_handler(db, 0, NULL, NULL);
	if (rc == SQLITE_INTERRUPT && clock.expired) {
		*complete = false;
		sqlite3_finalize(s);
		return 0;
	}
	if (rc == SQLITE_ROW && first && strcmp(first, "ok") == 0) {
		sqlite3_finalize(s);
		return 0;
	}
	if (rc == SQLITE_ROW) {
		store_set_corrupt(st, "integrity check: %s", first ? first : "?");
		store_one_line(st);
	}
	else
		store_fail(st, "integrity check");
	sqlite3_finalize(s);
	return -1;
}

int
store_move_aside(const char *path, char *aside, size_t len, char *err, size_t errlen)
{
	/* The database last; -puback is the dedup mark of its rows (store_dedup.c). */
	static const char *const ext[] = { "-wal", "-shm", "-puback", "" };
	char from[PATH_MAX + 8], to[PATH_MAX + 8], stamp[32];
	time_t now = time(NULL);
	struct tm tm;

	gmtime_r(&now, &tm);
	strftime(stamp, sizeof(stamp), "%Y%m%dT%H%M%SZ", &tm);
	if ((size_t)snprintf(aside, len, "%s.corrupt-%s", path, stamp) >= len) {
		snprintf(err, errlen, "%s: path too long to move aside", path);
		return -1;
	}
	for (size_t i = 0; i < sizeof(ext) / sizeof(ext[0]); i++) {
		snprintf(from, sizeof(from), "%s%s", path, ext[i]);
		snprintf(to, sizeof(to), "%s%s", aside, ext[i]);
		if (rename(from, to) == -1 && (*ext[i] == '\0' || errno != ENOENT)) {
			snprintf(err, errlen, "cannot move %s to %s: %s", from, to, strerror(errno));
			return -1;
		}
	}
	return 0;
}

/* The columns table has in both histories, quoted, comma-separated. */
static char *
salvage_columns(sqlite3 *db, const char *table)
{
	sqlite3_stmt *s = NULL;
	char *cols = NULL;

	if (sqlite3_prepare_v2(db, "SELECT group_concat('\"' || m.name || '\"', ',')"
	    " FROM pragma_table_info(?1, 'main') m JOIN pragma_table_info(?1, 'old') o USING (name)",
	    -1, &s, NULL) != SQLITE_OK)
		return NULL;
	sqlite3_bind_text(s, 1, table, -1, SQLITE_STATIC);
	if (sqlite3_step(s) == SQLITE_ROW && sqlite3_column_text(s, 0))
		cols = sqlite3_mprintf("%s", sqlite3_column_text(s, 0));
	sqlite3_finalize(s);
	return cols;
}

/* Copies table whole (small tables); returns rows copied or -1. */
static int
salvage_table(sqlite3 *db, const char *table, const char *where)
{
	char *cols = salvage_columns(db, table), *sql;
	int rc;

	if (cols == NULL)
		return -1;
	sql = sqlite3_mprintf("INSERT OR REPLACE INTO main.\"%w\" (%s) SELECT %s FROM old.\"%w\" %s",
	    table, cols, cols, table, where);
	rc = sql ? sqlite3_exec(db, sql, NULL, NULL, NULL) : SQLITE_NOMEM;
	sqlite3_free(sql);
	sqlite3_free(cols);
	return rc == SQLITE_OK ? sqlite3_changes(db) : -1;
}

static int64_t
salvage_int(sqlite3 *db, const char *sql)
{
	sqlite3_stmt *s = NULL;
	int64_t v = -1;

	if (sqlite3_prepare_v2(db, sql, -1, &s, NULL) == SQLITE_OK && sqlite3_step(s) == SQLITE_ROW &&
	    sqlite3_column_type(s, 0) != SQLITE_NULL)
		v = sqlite3_column_int64(s, 0);
	sqlite3_finalize(s);
	return v;
}

/* Appends a range of lost ids to the report, as far as it has room. */
static void
salvage_note_lost(char *lost, size_t len, int64_t from, int64_t to)
{
	size_t n = strlen(lost);

	if (n + 48 >= len) {
		if (n + 4 < len && (n < 3 || strcmp(lost + n - 3, "...") != 0))
			snprintf(lost + n, len - n, "...");
		return;
	}
	if (from == to)
		snprintf(lost + n, len - n, "%s%" PRId64, n ? "," : "", from);
	else
		snprintf(lost + n, len - n, "%s%" PRId64 "-%" PRId64, n ? "," : "", from, to);
}

/*
 * The accepted commands after the oldest cursor, one id at a time: a
 * damaged page loses the rows on it, not the scan. Returns rows copied.
 */
static int64_t
salvage_messages(sqlite3 *db, int64_t lo, int64_t hi, char *lost, size_t lostlen)
{
	char *cols = salvage_columns(db, "messages"), *sql;
	sqlite3_stmt *s = NULL, *dup = NULL;
	int64_t copied = 0, lost_from = 0;
	int step, changed;
	bool ok;

	if (cols == NULL)
		return -1;
	sql = sqlite3_mprintf("INSERT INTO main.messages (%s) SELECT %s FROM old.messages"
	    " WHERE id = ?1 AND status = 'accepted'", cols, cols);
	sqlite3_free(cols);
	if (sql == NULL || sqlite3_prepare_v2(db, sql, -1, &s, NULL) != SQLITE_OK) {
		sqlite3_free(sql);
		return -1;
	}
	sqlite3_free(sql);
	/* A row neither copied nor a readable duplicate was on a damaged page. */
	if (sqlite3_prepare_v2(db, "SELECT 1 FROM old.messages WHERE id = ?1 AND status = 'duplicate'",
	    -1, &dup, NULL) != SQLITE_OK) {
		sqlite3_finalize(s);
		return -1;
	}
	for (int64_t id = lo + 1; id <= hi; id++) {
		sqlite3_bind_int64(s, 1, id);
		sqlite3_bind_int64(dup, 1, id);
		step = sqlite3_step(s);
		changed = step == SQLITE_DONE ? sqlite3_changes(db) : 0;
		ok = changed == 1 || (step == SQLITE_DONE && sqlite3_step(dup) == SQLITE_ROW);
		copied += changed;
		sqlite3_reset(dup);
		if (ok) {
			if (lost_from)
				salvage_note_lost(lost, lostlen, lost_from, id - 1);
			lost_from = 0;
		} else if (lost_from == 0) {
			lost_from = id;
		}
		sqlite3_reset(s);
	}
	if (lost_from)
		salvage_note_lost(lost, lostlen, lost_from, hi);
	sqlite3_finalize(s);
	sqlite3_finalize(dup);
	return copied;
}

/* URI of a file name for a read-only ATTACH: %, ? and # escaped. */
static char *
salvage_uri(const char *path)
{
	char buf[PATH_MAX * 3 + 32], *p = buf;

	p += snprintf(buf, sizeof(buf), "file:");
	for (; *path && p < buf + sizeof(buf) - 16; path++) {
		if (*path == '%' || *path == '?' || *path == '#')
			p += sprintf(p, "%%%02X", (unsigned char)*path);
		else
			*p++ = *path;
	}
	snprintf(p, (size_t)(buf + sizeof(buf) - p), "?mode=ro");
	return sqlite3_mprintf("%s", buf);
}

int
store_salvage(struct store *st, const char *aside, char *report, size_t len)
{
	sqlite3 *db = store_db(st);
	sqlite3_stmt *s = NULL;
	char *uri = salvage_uri(aside), lost[256] = "";
	int consumers, subs;
	int64_t lo, hi, seq, maxid, copied = 0;

	if (uri == NULL || sqlite3_prepare_v2(db, "ATTACH ?1 AS old", -1, &s, NULL) != SQLITE_OK) {
		sqlite3_free(uri);
		return store_fail(st, "salvage");
	}
	sqlite3_bind_text(s, 1, uri, -1, SQLITE_TRANSIENT);
	sqlite3_free(uri);
	if (sqlite3_step(s) != SQLITE_DONE) {
		sqlite3_finalize(s);
		return store_fail(st, "salvage: attaching %s", aside);
	}
	sqlite3_finalize(s);
	sqlite3_exec(db, "BEGIN IMMEDIATE", NULL, NULL, NULL);
	consumers = salvage_table(db, "consumers", "");
	subs = salvage_table(db, "session_subscriptions", "");
	salvage_table(db, "meta", "WHERE key IN ('session', 'age_clock')");
	/* Where new ids start: past every id a consumer or the file knew. */
	seq = salvage_int(db, "SELECT seq FROM old.sqlite_sequence WHERE name = 'messages'");
	maxid = salvage_int(db, "SELECT max(id) FROM old.messages");
	hi = salvage_int(db, "SELECT max(acked_id) FROM main.consumers");
	hi = seq > hi ? seq : hi;
	hi = maxid > hi ? maxid : hi;
	lo = consumers > 0 ? salvage_int(db, "SELECT min(acked_id) FROM main.consumers") : 0;
	if (lo < 0)
		lo = 0;
	if (hi - lo > SALVAGE_MAX_ROWS) {
		salvage_note_lost(lost, sizeof(lost), lo + 1, hi - SALVAGE_MAX_ROWS);
		lo = hi - SALVAGE_MAX_ROWS;
	}
	if (hi > lo && (copied = salvage_messages(db, lo, hi, lost, sizeof(lost))) < 0)
		copied = 0;
	sqlite3_exec(db, "INSERT OR IGNORE INTO main.topics SELECT DISTINCT topic FROM main.messages",
	    NULL, NULL, NULL);
	/* sqlite_sequence has no key: the salvaged rows may have made the row already. */
	sqlite3_exec(db, "DELETE FROM main.sqlite_sequence WHERE name = 'messages'", NULL, NULL, NULL);
	if (hi > 0 && (sqlite3_prepare_v2(db, "INSERT INTO main.sqlite_sequence (name, seq)"
	    " VALUES ('messages', ?1)", -1, &s, NULL) == SQLITE_OK)) {
		sqlite3_bind_int64(s, 1, hi);
		sqlite3_step(s);
		sqlite3_finalize(s);
	}
	if (sqlite3_exec(db, "COMMIT", NULL, NULL, NULL) != SQLITE_OK) {
		store_fail(st, "salvage: commit");
		sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
		sqlite3_exec(db, "DETACH old", NULL, NULL, NULL);
		return -1;
	}
	sqlite3_exec(db, "DETACH old", NULL, NULL, NULL);
	snprintf(report, len, "salvaged %d consumer cursors, %d session subscriptions, %" PRId64
	    " accepted commands of ids %" PRId64 "-%" PRId64 "; lost ids: %s; new ids start after %"
	    PRId64, consumers < 0 ? 0 : consumers, subs < 0 ? 0 : subs, copied, lo + 1, hi,
	    *lost ? lost : "none", hi);
	return 0;
}
