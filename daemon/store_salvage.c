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

/*
 * Reading the damaged file on its own connection: a multi-database
 * transaction that touched a corrupt page cannot commit at all.
 */
struct salvage_copy {
	sqlite3_stmt *sel;	/* on the damaged file */
	sqlite3_stmt *ins;	/* into the fresh history */
};

static void
salvage_copy_free(struct salvage_copy *c)
{
	sqlite3_finalize(c->sel);
	sqlite3_finalize(c->ins);
	c->sel = c->ins = NULL;
}

/* The columns of table in both histories (an older schema may lack some). */
static int
salvage_copy_prepare(struct salvage_copy *c, sqlite3 *old, sqlite3 *db, const char *table,
    const char *where)
{
	sqlite3_str *cols = sqlite3_str_new(db), *marks = sqlite3_str_new(db);
	sqlite3_stmt *s = NULL, *probe;
	char *sql;
	int n = 0, rc = -1;

	c->sel = c->ins = NULL;
	if (sqlite3_prepare_v2(db, "SELECT m.name FROM pragma_table_info(?1) m", -1, &s, NULL) != SQLITE_OK)
		goto out;
	sqlite3_bind_text(s, 1, table, -1, SQLITE_STATIC);
	while (sqlite3_step(s) == SQLITE_ROW) {
		sql = sqlite3_mprintf("SELECT \"%w\" FROM \"%w\" LIMIT 0", sqlite3_column_text(s, 0), table);
		probe = NULL;
		if (sql && sqlite3_prepare_v2(old, sql, -1, &probe, NULL) == SQLITE_OK) {
			sqlite3_str_appendf(cols, "%s\"%w\"", n ? "," : "", sqlite3_column_text(s, 0));
			sqlite3_str_appendf(marks, "%s?", n++ ? "," : "");
		}
		sqlite3_finalize(probe);
		sqlite3_free(sql);
	}
	if (n == 0)
		goto out;
	sql = sqlite3_mprintf("SELECT %s FROM \"%w\" %s", sqlite3_str_value(cols), table, where);
	rc = sql && sqlite3_prepare_v2(old, sql, -1, &c->sel, NULL) == SQLITE_OK ? 0 : -1;
	sqlite3_free(sql);
	sql = sqlite3_mprintf("INSERT OR REPLACE INTO \"%w\" (%s) VALUES (%s)", table,
	    sqlite3_str_value(cols), sqlite3_str_value(marks));
	if (rc == 0 && (sql == NULL || sqlite3_prepare_v2(db, sql, -1, &c->ins, NULL) != SQLITE_OK))
		rc = -1;
	sqlite3_free(sql);
out:
	sqlite3_finalize(s);
	sqlite3_free(sqlite3_str_finish(cols));
	sqlite3_free(sqlite3_str_finish(marks));
	if (rc == -1)
		salvage_copy_free(c);
	return rc;
}

/* Copies what sel reads (bound to arg if it takes one); rows copied, -1 when it could not read them. */
static int64_t
salvage_copy_run(struct salvage_copy *c, int64_t arg)
{
	int64_t copied = 0;
	int rc;

	if (sqlite3_bind_parameter_count(c->sel) > 0)
		sqlite3_bind_int64(c->sel, 1, arg);
	while ((rc = sqlite3_step(c->sel)) == SQLITE_ROW) {
		for (int i = 0; i < sqlite3_column_count(c->sel); i++)
			sqlite3_bind_value(c->ins, i + 1, sqlite3_column_value(c->sel, i));
		rc = sqlite3_step(c->ins);
		sqlite3_reset(c->ins);
		if (rc != SQLITE_DONE)
			break;
		copied++;
	}
	sqlite3_reset(c->sel);
	return rc == SQLITE_DONE ? copied : -1;
}

/* A small table whole; rows copied, -1 if unreadable. */
static int64_t
salvage_table(sqlite3 *old, sqlite3 *db, const char *table, const char *where)
{
	struct salvage_copy c;
	int64_t n;

	if (salvage_copy_prepare(&c, old, db, table, where) == -1)
		return -1;
	n = salvage_copy_run(&c, 0);
	salvage_copy_free(&c);
	return n;
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
salvage_messages(sqlite3 *old, sqlite3 *db, int64_t lo, int64_t hi, char *lost, size_t lostlen)
{
	struct salvage_copy c;
	sqlite3_stmt *dup = NULL;
	int64_t copied = 0, lost_from = 0, n;
	bool ok;

	if (salvage_copy_prepare(&c, old, db, "messages", "WHERE id = ?1 AND status = 'accepted'") == -1)
		return -1;
	/* A row neither copied nor a readable duplicate was on a damaged page. */
	if (sqlite3_prepare_v2(old, "SELECT 1 FROM messages WHERE id = ?1 AND status = 'duplicate'",
	    -1, &dup, NULL) != SQLITE_OK) {
		salvage_copy_free(&c);
		return -1;
	}
	for (int64_t id = lo + 1; id <= hi; id++) {
		n = salvage_copy_run(&c, id);
		sqlite3_bind_int64(dup, 1, id);
		ok = n == 1 || (n == 0 && sqlite3_step(dup) == SQLITE_ROW);
		sqlite3_reset(dup);
		if (n == 1)
			copied++;
		if (ok && lost_from)
			salvage_note_lost(lost, lostlen, lost_from, id - 1);
		if (ok)
			lost_from = 0;
		else if (lost_from == 0)
			lost_from = id;
	}
	if (lost_from)
		salvage_note_lost(lost, lostlen, lost_from, hi);
	salvage_copy_free(&c);
	sqlite3_finalize(dup);
	return copied;
}

/*
 * The newest row whose PUBACK could have left, from the -puback mark kept
 * aside (store_dedup.c): past a torn WAL, the one record of ids handed out.
 */
static int64_t
salvage_mark_row(const char *aside)
{
	char path[PATH_MAX + 16], boot[40];
	long long connection, row;
	FILE *fp;
	int n;

	snprintf(path, sizeof(path), "%s-puback", aside);
	if ((fp = fopen(path, "re")) == NULL)
		return -1;
	n = fscanf(fp, "%39s %lld %lld", boot, &connection, &row);
	fclose(fp);
	return n == 3 ? row : -1;
}

int
store_salvage(struct store *st, const char *aside, char *report, size_t len)
{
	sqlite3 *db = store_db(st), *old = NULL;
	sqlite3_stmt *s = NULL;
	char lost[256] = "";
	int64_t consumers, subs, lo, hi, seq, maxid, copied = 0, unacked = 0;

	if (sqlite3_open_v2(aside, &old, SQLITE_OPEN_READONLY, NULL) != SQLITE_OK ||
	    /* Else a file shorter than its header says (truncated) is refused whole. */
	    sqlite3_exec(old, "PRAGMA writable_schema = ON", NULL, NULL, NULL) != SQLITE_OK ||
	    sqlite3_exec(old, "SELECT count(*) FROM sqlite_schema", NULL, NULL, NULL) != SQLITE_OK) {
		/* Not even the schema reads: the fresh history starts empty. */
		snprintf(report, len, "salvaged nothing, the schema is unreadable (%s)",
		    old ? sqlite3_errmsg(old) : "out of memory");
		sqlite3_close(old);
		return 0;
	}
	if (sqlite3_exec(db, "BEGIN IMMEDIATE", NULL, NULL, NULL) != SQLITE_OK) {
		sqlite3_close(old);
		return store_fail(st, "salvage");
	}
	consumers = salvage_table(old, db, "consumers", "");
	subs = salvage_table(old, db, "session_subscriptions", "");
	/* The connection count too: the candidates below name their connection. */
	salvage_table(old, db, "meta", "WHERE key IN ('session', 'age_clock', 'connection')");
	/* Where new ids start: past every id a consumer or the file knew. */
	seq = salvage_int(old, "SELECT seq FROM sqlite_sequence WHERE name = 'messages'");
	maxid = salvage_int(old, "SELECT max(id) FROM messages");
	hi = salvage_int(db, "SELECT max(acked_id) FROM consumers");
	hi = seq > hi ? seq : hi;
	hi = maxid > hi ? maxid : hi;
	seq = salvage_mark_row(aside);
	hi = seq > hi ? seq : hi;
	lo = consumers > 0 ? salvage_int(db, "SELECT min(acked_id) FROM consumers") : 0;
	if (lo < 0)
		lo = 0;
	if (hi - lo > SALVAGE_MAX_ROWS) {
		salvage_note_lost(lost, sizeof(lost), lo + 1, hi - SALVAGE_MAX_ROWS);
		lo = hi - SALVAGE_MAX_ROWS;
	}
	if (hi > lo && (copied = salvage_messages(old, db, lo, hi, lost, sizeof(lost))) < 0)
		copied = 0;
	/*
	 * What the broker may still redeliver (store_dedup.c), as far as its
	 * rows came along: else the next connection's DUP=1 redeliveries of
	 * the last batch would be accepted a second time.
	 */
	if (salvage_table(old, db, "broker_unacked", "") > 0 &&
	    sqlite3_exec(db, "DELETE FROM broker_unacked WHERE entry NOT IN (SELECT id FROM messages)"
	    " OR command NOT IN (SELECT id FROM messages)", NULL, NULL, NULL) == SQLITE_OK)
		unacked = salvage_int(db, "SELECT count(*) FROM broker_unacked");
	sqlite3_close(old);
	sqlite3_exec(db, "INSERT OR IGNORE INTO topics SELECT DISTINCT topic FROM messages",
	    NULL, NULL, NULL);
	/* sqlite_sequence has no key: the salvaged rows may have made the row already. */
	sqlite3_exec(db, "DELETE FROM sqlite_sequence WHERE name = 'messages'", NULL, NULL, NULL);
	if (hi > 0 && sqlite3_prepare_v2(db, "INSERT INTO sqlite_sequence (name, seq)"
	    " VALUES ('messages', ?1)", -1, &s, NULL) == SQLITE_OK) {
		sqlite3_bind_int64(s, 1, hi);
		sqlite3_step(s);
		sqlite3_finalize(s);
	}
	if (sqlite3_exec(db, "COMMIT", NULL, NULL, NULL) != SQLITE_OK) {
		store_fail(st, "salvage: commit");
		sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
		return -1;
	}
	snprintf(report, len, "salvaged %" PRId64 " consumer cursors, %" PRId64 " session subscriptions, %"
	    PRId64 " accepted commands of ids %" PRId64 "-%" PRId64 ", %" PRId64 " the broker may"
	    " redeliver; lost ids: %s; new ids start after %" PRId64, consumers < 0 ? 0 : consumers,
	    subs < 0 ? 0 : subs, copied, lo + 1, hi, unacked, *lost ? lost : "none", hi);
	return 0;
}
