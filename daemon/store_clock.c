#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include <sqlite3.h>

#include "event.h"
#include "store_internal.h"

/*
 * The age clock, in ms, decides retention (messages.age_ms, outbox
 * sent_age_ms): CLOCK_BOOTTIME carried on across restarts in meta
 * 'age_clock' ("boot-id boottime-ms clock-ms"), so a wall-clock step in
 * either direction ages nothing. Within one boot it is exact; after a
 * reboot it goes on from its last save, so time the host was down (and
 * since that save) does not count: a row is then kept longer, never less.
 * A new history starts it at the wall clock, which makes age_ms read like
 * received_at until the first step.
 */
static int64_t
store_age_clock_now(struct store *st)
{
	const struct store_age_clock *c = store_age_clock_of(st);

	return c->base_ms + ((int64_t)event_boot_ms() - c->boot_ms);
}

void
store_age_clock_sql(sqlite3_context *ctx, int argc, sqlite3_value **argv)
{
	(void)argc;
	(void)argv;
	sqlite3_result_int64(ctx, store_age_clock_now(sqlite3_user_data(ctx)));
}

int
store_age_clock_save(struct store *st)
{
	sqlite3_stmt *s = NULL;
	char value[96];
	int rc;

	snprintf(value, sizeof(value), "%s %" PRId64 " %" PRId64, store_age_clock_of(st)->boot_id,
	    (int64_t)event_boot_ms(), store_age_clock_now(st));
	if (sqlite3_prepare_v2(store_db(st), "INSERT OR REPLACE INTO meta (key, value)"
	    " VALUES ('age_clock', ?1)", -1, &s, NULL) != SQLITE_OK)
		return store_fail(st, "saving the age clock");
	sqlite3_bind_text(s, 1, value, -1, SQLITE_STATIC);
	rc = sqlite3_step(s);
	sqlite3_finalize(s);
	return rc == SQLITE_DONE ? 0 : store_fail(st, "saving the age clock");
}

int
store_age_clock_resume(struct store *st)
{
	struct store_age_clock *c = store_age_clock_of(st);
	sqlite3_stmt *s = NULL;
	char saved_boot[40] = "";
	long long saved_boot_ms = 0, saved_clock = 0;
	bool have = false;
	FILE *fp;

	if ((fp = fopen("/proc/sys/kernel/random/boot_id", "re")) != NULL) {
		if (fgets(c->boot_id, sizeof(c->boot_id), fp) == NULL)
			c->boot_id[0] = '\0';
		c->boot_id[strcspn(c->boot_id, "\n")] = '\0';
		fclose(fp);
	}
	if (c->boot_id[0] == '\0')	/* no /proc: every start counts as a reboot */
		snprintf(c->boot_id, sizeof(c->boot_id), "unknown");
	if (sqlite3_prepare_v2(store_db(st), "SELECT value FROM meta WHERE key = 'age_clock'", -1, &s,
	    NULL) != SQLITE_OK)
		return store_fail(st, "reading the age clock");
	if (sqlite3_step(s) == SQLITE_ROW && sqlite3_column_text(s, 0) != NULL)
		have = sscanf((const char *)sqlite3_column_text(s, 0), "%39s %lld %lld", saved_boot,
		    &saved_boot_ms, &saved_clock) == 3;
	sqlite3_finalize(s);
	c->boot_ms = (int64_t)event_boot_ms();
	if (!have)
		c->base_ms = (int64_t)event_wall_ms();
	else if (strcmp(saved_boot, c->boot_id) == 0 && strcmp(saved_boot, "unknown") != 0 &&
	    c->boot_ms >= saved_boot_ms)
		c->base_ms = saved_clock + (c->boot_ms - saved_boot_ms);
	else
		c->base_ms = saved_clock;
	/*
	 * Not fatal: a full disk must not keep the relay from starting (G6).
	 * Retention saves it again later; until then a reboot resumes from the
	 * older save, which only keeps rows longer.
	 */
	store_age_clock_save(st);
	return 0;
}
