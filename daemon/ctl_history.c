/*
 * cmdrelayctl history and outbox: the history file's tables, read in
 * bounded pages, as tables for people or JSON lines.
 */
#include <errno.h>
#include <getopt.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>
#include <mosquitto.h>
#include <sqlite3.h>

#include "ctl.h"
#include "wire.h"

#define PAYLOAD_COLUMN 40	/* characters */
#define DEVICE_COLUMN 14	/* characters: a serial number such as 012C000003AX */
#define HISTORY_MAX_LIMIT 1000000
/* Rows read per read transaction: a few hundred KiB to print, then the snapshot is let go. */
#define HISTORY_PAGE 256

static long
history_parse_limit(const char *arg)
{
	char *end;
	long limit;

	errno = 0;
	limit = strtol(arg, &end, 10);
	if (errno || *end || end == arg || limit < 1 || limit > HISTORY_MAX_LIMIT)
		ctl_die(EX_USAGE_STATUS, "--limit: '%s' is not a number from 1 to %d", arg, HISTORY_MAX_LIMIT);
	return limit;
}

/* What history and outbox both take: --status (one of statuses), --limit, --json. */
struct listing {
	const char *const *statuses;	/* NULL-ended, "all" last */
	const char *status;
	long limit;
	bool json;
};

/* One of the shared options; false when ch is none of them. */
static bool
listing_option(struct listing *l, int ch, const char *arg)
{
	char allowed[128] = "";
	size_t i;

	switch (ch) {
	case 'S':
		for (i = 0; l->statuses[i] && strcmp(arg, l->statuses[i]) != 0; i++)
			;
		if (l->statuses[i] == NULL) {
			for (i = 0; l->statuses[i]; i++)
				snprintf(allowed + strlen(allowed), sizeof(allowed) - strlen(allowed), "%s%s",
				    i == 0 ? "" : l->statuses[i + 1] ? ", " : " or ", l->statuses[i]);
			ctl_die(EX_USAGE_STATUS, "--status: '%s' is not %s", arg, allowed);
		}
		l->status = arg;
		return true;
	case 'l':
		l->limit = history_parse_limit(arg);
		return true;
	case 'j':
		l->json = true;
		return true;
	}
	return false;
}

/* One history row, as a table line or JSON. */
static void
history_row(const struct ctl *ctl, FILE *out, sqlite3_stmt *s, bool json)
{
	const char *row_topic = (const char *)sqlite3_column_text(s, 2);
	const unsigned char *payload = sqlite3_column_blob(s, 3);
	int plen = sqlite3_column_bytes(s, 3);
	char when[CTL_TIME_MAX];
	int shown;

	if (json) {
		const char *encoding;
		json_t *o;

		wire_time(sqlite3_column_int64(s, 1), when, sizeof(when));
		o = json_pack("{s:I, s:s, s:s, s:o, s:i, s:b, s:b, s:s}",
		    "id", (json_int_t)sqlite3_column_int64(s, 0), "received_at", when,
		    "topic", row_topic, "payload", wire_payload(payload, (size_t)plen, &encoding),
		    "qos", sqlite3_column_int(s, 4), "retained", sqlite3_column_int(s, 5),
		    "dup", sqlite3_column_int(s, 6), "status", (const char *)sqlite3_column_text(s, 7));
		char *line;
		json_object_set_new(o, "encoding", json_string(encoding));
		json_object_set_new(o, "reason", sqlite3_column_type(s, 8) == SQLITE_NULL ? json_null() :
		    json_string((const char *)sqlite3_column_text(s, 8)));
		json_object_set_new(o, "duplicate_of", sqlite3_column_type(s, 9) == SQLITE_NULL ?
		    json_null() : json_integer(sqlite3_column_int64(s, 9)));
		json_object_set_new(o, "device", sqlite3_column_type(s, 10) == SQLITE_NULL ? json_null() :
		    json_string((const char *)sqlite3_column_text(s, 10)));
		line = json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER);
		fprintf(out, "%s\n", line);
		free(line);
		json_decref(o);
	} else {
		ctl_time(ctl, sqlite3_column_int64(s, 1), when, sizeof(when));
		fprintf(out, "%-6lld %-*s ", (long long)sqlite3_column_int64(s, 0), CTL_TIME_WIDTH, when);
		/* a topic level the broker sent: rendered, or a hostile one could drive the terminal */
		shown = sqlite3_column_type(s, 10) == SQLITE_NULL ? fprintf(out, "-") :
		    ctl_render(out, sqlite3_column_text(s, 10), (size_t)sqlite3_column_bytes(s, 10), DEVICE_COLUMN);
		fprintf(out, "%*s %-9s %-15s %-6s %-3d %-3d ", shown < DEVICE_COLUMN ? DEVICE_COLUMN - shown : 0, "",
		    (const char *)sqlite3_column_text(s, 7),
		    sqlite3_column_type(s, 8) == SQLITE_NULL ? "-" : (const char *)sqlite3_column_text(s, 8),
		    sqlite3_column_type(s, 9) == SQLITE_NULL ? "-" : (const char *)sqlite3_column_text(s, 9),
		    sqlite3_column_int(s, 5), sqlite3_column_int(s, 6));
		ctl_render(out, payload, (size_t)plen, PAYLOAD_COLUMN);
		fputc('\n', out);
	}
}

/* What history selects; ?1 to ?5 of its statements. */
struct history_filter {
	const char *device, *topic, *status;
	int64_t since, until;
};

#define HISTORY_WHERE \
	" WHERE (?1 IS NULL OR device = ?1) AND received_at >= ?2 AND received_at <= ?3" \
	" AND (?4 = 'all' OR status = ?4) AND (?5 IS NULL OR mqtt_match(?5, topic))"

static void
history_bind(sqlite3_stmt *s, const struct history_filter *f)
{
	sqlite3_bind_text(s, 1, f->device, -1, SQLITE_STATIC);
	sqlite3_bind_int64(s, 2, f->since);
	sqlite3_bind_int64(s, 3, f->until);
	sqlite3_bind_text(s, 4, f->status, -1, SQLITE_STATIC);
	sqlite3_bind_text(s, 5, f->topic, -1, SQLITE_STATIC);
}

/* The ids of the oldest and newest of the newest limit matching rows (first > last: none). */
static void
history_range(struct ctl *ctl, sqlite3 *db, const struct history_filter *f, long limit,
    int64_t *first, int64_t *last)
{
	sqlite3_stmt *s;

	*first = 1;
	*last = 0;
	s = ctl_prepare(ctl, db, "SELECT min(id), max(id) FROM (SELECT id FROM messages"
	    HISTORY_WHERE " ORDER BY id DESC LIMIT ?6)");
	history_bind(s, f);
	sqlite3_bind_int64(s, 6, limit);
	if (sqlite3_step(s) == SQLITE_ROW && sqlite3_column_type(s, 0) != SQLITE_NULL) {
		*first = sqlite3_column_int64(s, 0);
		*last = sqlite3_column_int64(s, 1);
	}
	sqlite3_finalize(s);
}

int
cmd_history(struct ctl *ctl, int argc, char *argv[])
{
	static const struct option opts[] = {
		{ "device", required_argument, NULL, 'd' },
		{ "topic", required_argument, NULL, 't' },
		{ "since", required_argument, NULL, 's' },
		{ "until", required_argument, NULL, 'u' },
		{ "status", required_argument, NULL, 'S' },
		{ "limit", required_argument, NULL, 'l' },
		{ "json", no_argument, NULL, 'j' },
		{ NULL, 0, NULL, 0 },
	};
	static const char *const statuses[] = { "accepted", "duplicate", "all", NULL };
	struct listing l = { statuses, "all", 100, false };
	const char *device = NULL, *topic = NULL;
	int64_t since = 0, until = INT64_MAX;
	long rows = 0;
	struct history_filter filter;
	int64_t first, last;
	sqlite3_stmt *s;
	sqlite3 *db;
	int ch, rc;

	optind = 0;	/* 0: GNU getopt starts afresh, options may follow operands */
	while ((ch = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (ch) {
		case 'd':
			device = optarg;
			break;
		case 't':
			topic = optarg;
			if (*topic == '\0' || mosquitto_sub_topic_check(topic) != MOSQ_ERR_SUCCESS)
				ctl_die(EX_USAGE_STATUS, "--topic: '%s' is not an MQTT topic filter", optarg);
			break;
		case 's':
		case 'u':
			if (!ctl_parse_time(optarg, ch == 's' ? &since : &until))
				ctl_die(EX_USAGE_STATUS, "--%s: '%s' is not ISO 8601 (2026-12-01T21:00:00+01:00), "
				    "today, yesterday or an age like 2h",
				    ch == 's' ? "since" : "until", optarg);
			break;
		default:
			if (!listing_option(&l, ch, optarg))
				ctl_usage(EX_USAGE_STATUS);
		}
	}
	if (optind != argc)
		ctl_usage(EX_USAGE_STATUS);

	db = ctl_open_history(ctl);
	/*
	 * The newest LIMIT rows that match, shown oldest first: first their id
	 * range, then pages of it, each read in full before it is printed, so
	 * that a stalled pager holds no read transaction (which would keep the
	 * daemon's WAL from being reused, and growing).
	 */
	s = ctl_prepare(ctl, db,
	    "SELECT id, received_at, topic, payload, qos, retain, dup, status,"
	    " reason, duplicate_of, device FROM messages"
	    HISTORY_WHERE " AND id BETWEEN ?6 AND ?7 ORDER BY id LIMIT ?8");
	filter = (struct history_filter){ device, topic, l.status, since, until };
	history_bind(s, &filter);
	history_range(ctl, db, &filter, l.limit, &first, &last);
	if (!l.json)
		printf("%-6s %-*s %-14s %-9s %-15s %-6s %-3s %-3s %s\n", "ID", CTL_TIME_WIDTH, "RECEIVED", "DEVICE",
		    "STATUS", "REASON", "DUP_OF", "RET", "DUP", "PAYLOAD");
	sqlite3_bind_int(s, 8, HISTORY_PAGE);
	for (int n = HISTORY_PAGE; n == HISTORY_PAGE && first <= last; ) {
		char *buf = NULL;
		size_t buflen = 0;
		FILE *out = open_memstream(&buf, &buflen);

		if (out == NULL)
			ctl_die(1, "out of memory");
		sqlite3_bind_int64(s, 6, first);
		sqlite3_bind_int64(s, 7, last);
		for (n = 0; (rc = sqlite3_step(s)) == SQLITE_ROW; n++) {
			first = sqlite3_column_int64(s, 0) + 1;
			history_row(ctl, out, s, l.json);
		}
		if (rc != SQLITE_DONE)
			ctl_die_history(ctl, db);
		rows += n;
		sqlite3_reset(s);	/* the read transaction ends here */
		fclose(out);
		fwrite(buf, 1, buflen, stdout);
		free(buf);
	}
	sqlite3_finalize(s);
	if (rows == l.limit) {
		/* a cut that says nothing reads as "that is all there is" */
		s = ctl_prepare(ctl, db, "SELECT count(*) - ?6 FROM messages" HISTORY_WHERE);
		history_bind(s, &filter);
		sqlite3_bind_int64(s, 6, l.limit);
		if (sqlite3_step(s) == SQLITE_ROW && sqlite3_column_int64(s, 0) > 0)
			fprintf(stderr, "cmdrelayctl: %lld more rows match; use --limit N (up to %d) or "
			    "--since\n", (long long)sqlite3_column_int64(s, 0), HISTORY_MAX_LIMIT);
		sqlite3_finalize(s);
	}
	sqlite3_close(db);
	return 0;
}

int
cmd_outbox(struct ctl *ctl, int argc, char *argv[])
{
	static const struct option opts[] = {
		{ "status", required_argument, NULL, 'S' },
		{ "limit", required_argument, NULL, 'l' },
		{ "json", no_argument, NULL, 'j' },
		{ NULL, 0, NULL, 0 },
	};
	static const char *const statuses[] = { "queued", "sent", "failed", "all", NULL };
	struct listing l = { statuses, "all", 100, false };
	sqlite3_stmt *s;
	sqlite3 *db;
	int ch, rc;

	optind = 0;	/* 0: GNU getopt starts afresh, options may follow operands */
	while ((ch = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (ch) {
		default:
			if (!listing_option(&l, ch, optarg))
				ctl_usage(EX_USAGE_STATUS);
		}
	}
	if (optind != argc)
		ctl_usage(EX_USAGE_STATUS);
	db = ctl_open_history(ctl);
	s = ctl_prepare(ctl, db, "SELECT * FROM (SELECT id, queued_at, topic, payload, qos, retain,"
	    " status, sent_at, attempts, origin FROM outbox WHERE ?1 = 'all' OR status = ?1"
	    " ORDER BY id DESC LIMIT ?2) ORDER BY id");
	sqlite3_bind_text(s, 1, l.status, -1, SQLITE_STATIC);
	sqlite3_bind_int64(s, 2, l.limit);
	if (!l.json)
		printf("%-6s %-*s %-6s %-*s %-3s %-3s %-8s %s\n", "ID", CTL_TIME_WIDTH, "QUEUED", "STATUS",
		    CTL_TIME_WIDTH, "SENT",
		    "QOS", "RET", "ATTEMPTS", "TOPIC / PAYLOAD");
	while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
		const unsigned char *payload = sqlite3_column_blob(s, 3);
		int plen = sqlite3_column_bytes(s, 3);
		char queued[CTL_TIME_MAX], sent[CTL_TIME_MAX] = "-";
		/* JSON in UTC, as the socket protocol has it; the table for people */
		const struct ctl *as = l.json ? &(const struct ctl){ .utc = true } : ctl;

		ctl_time(as, sqlite3_column_int64(s, 1), queued, sizeof(queued));
		if (sqlite3_column_type(s, 7) != SQLITE_NULL)
			ctl_time(as, sqlite3_column_int64(s, 7), sent, sizeof(sent));
		if (l.json) {
			const char *encoding;
			json_t *o = json_pack("{s:I, s:s, s:s, s:o, s:i, s:b, s:s, s:s?, s:i, s:s}",
			    "id", (json_int_t)sqlite3_column_int64(s, 0), "queued_at", queued,
			    "topic", (const char *)sqlite3_column_text(s, 2),
			    "payload", wire_payload(payload, (size_t)plen, &encoding),
			    "qos", sqlite3_column_int(s, 4), "retain", sqlite3_column_int(s, 5),
			    "status", (const char *)sqlite3_column_text(s, 6),
			    "sent_at", sqlite3_column_type(s, 7) == SQLITE_NULL ? NULL : sent,
			    "attempts", sqlite3_column_int(s, 8), "origin", (const char *)sqlite3_column_text(s, 9));
			char *line;
			json_object_set_new(o, "encoding", json_string(encoding));
			line = json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER);
			puts(line);
			free(line);
			json_decref(o);
		} else {
			printf("%-6lld %-*s %-6s %-*s %-3d %-3d %-8d %s ",
			    (long long)sqlite3_column_int64(s, 0), CTL_TIME_WIDTH, queued,
			    (const char *)sqlite3_column_text(s, 6), CTL_TIME_WIDTH, sent, sqlite3_column_int(s, 4),
			    sqlite3_column_int(s, 5), sqlite3_column_int(s, 8),
			    (const char *)sqlite3_column_text(s, 2));
			ctl_render(stdout, payload, (size_t)plen, PAYLOAD_COLUMN);
			putchar('\n');
		}
	}
	if (rc != SQLITE_DONE)
		ctl_die_history(ctl, db);
	sqlite3_finalize(s);
	sqlite3_close(db);
	return 0;
}
