/*
 * Today's counts, from the history: the rows received since the local
 * midnight, read once per day (or clock step) through the received_at index,
 * never by scanning the history. The daemon adds each commit to them after.
 * Only SQLite: cmdrelayctl, which links no store, counts with it too.
 */
#include <time.h>

#include <sqlite3.h>

#include "store.h"

int64_t
store_local_midnight(int64_t unix_ms, int days)
{
	time_t secs = (time_t)(unix_ms / 1000);
	struct tm tm;

	localtime_r(&secs, &tm);
	tm.tm_hour = tm.tm_min = tm.tm_sec = 0;
	tm.tm_mday += days;
	tm.tm_isdst = -1;	/* mktime finds whether that midnight was summer time */
	return (int64_t)mktime(&tm) * 1000;
}

int
store_day_count(sqlite3 *db, int64_t now_ms, struct store_day *day)
{
	sqlite3_stmt *s;
	int rc;

	*day = (struct store_day){ .since_ms = store_local_midnight(now_ms, 0),
	    .until_ms = store_local_midnight(now_ms, 1) };
	/* INDEXED BY: an error, not a full scan, should the index ever be missing. */
	if (sqlite3_prepare_v2(db, "SELECT count(*), count(*) FILTER (WHERE status = 'accepted'),"
	    " count(*) FILTER (WHERE status = 'duplicate'), count(*) FILTER (WHERE reason = 'possible_repeat')"
	    " FROM messages INDEXED BY messages_received_at WHERE received_at >= ?1 AND received_at < ?2",
	    -1, &s, NULL) != SQLITE_OK)
		return -1;
	sqlite3_bind_int64(s, 1, day->since_ms);
	sqlite3_bind_int64(s, 2, day->until_ms);
	if ((rc = sqlite3_step(s)) == SQLITE_ROW) {
		day->received = (uint64_t)sqlite3_column_int64(s, 0);
		day->accepted = (uint64_t)sqlite3_column_int64(s, 1);
		day->duplicates = (uint64_t)sqlite3_column_int64(s, 2);
		day->possible_repeats = (uint64_t)sqlite3_column_int64(s, 3);
	}
	sqlite3_finalize(s);
	return rc == SQLITE_ROW ? 0 : -1;
}
