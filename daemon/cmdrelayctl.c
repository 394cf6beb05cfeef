/* cmdrelayctl: ask the history what the relay received. */
#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <getopt.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>
#include <mosquitto.h>
#include <sqlite3.h>

#include "config.h"
#include "ctl.h"
#include "store.h"
#include "topic.h"
#include "version.h"
#include "wire.h"

#define DEFAULT_CONFIG "/etc/cmdrelay/cmdrelay.yaml"
#define PAYLOAD_COLUMN 40	/* characters */
#define HISTORY_MAX_LIMIT 1000000
/* Rows read per read transaction: a few hundred KiB to print, then the snapshot is let go. */
#define HISTORY_PAGE 256

static int cmd_history(struct ctl *, int, char *[]);
static int cmd_outbox(struct ctl *, int, char *[]);
static int cmd_check_config(struct ctl *, int, char *[]);

/* One row per subcommand: its arguments as usage shows them. */
static const struct ctl_command {
	const char *name;
	int (*fn)(struct ctl *, int, char *[]);
	const char *args;
} ctl_commands[] = {
	{ "history", cmd_history, "[--device D] [--topic FILTER] [--since T] [--until T]\n"
	  "          [--status accepted|duplicate|all] [--limit N] [--json]" },
	{ "consumers", cmd_consumers, "[--json] | consumers delete NAME\n"
	  "  consumers reset NAME --to ID|--live|--oldest" },
	{ "publish", cmd_publish, "TOPIC PAYLOAD [--qos 0|1] [--retain] [--escaped]" },
	{ "inject", cmd_publish, "TOPIC PAYLOAD [--qos 0|1] [--retain] [--escaped]" },
	{ "outbox", cmd_outbox, "[--status queued|sent|failed|all] [--limit N] [--json]" },
	{ "tail", cmd_tail, "[--consumer NAME [--no-ack]] [--filter F] [--from stored|live|ID] [--json]\n"
	  "       [--exec CMD] [--once]" },
	{ "status", cmd_status, "[--json]" },
	{ "stats", cmd_stats, "[--json]" },
	{ "check-config", cmd_check_config, "" },
	{ "store", cmd_store, "ack-corruption" },
};
#define NCOMMANDS (sizeof(ctl_commands) / sizeof(ctl_commands[0]))

#define USAGE_GLOBAL "[-c FILE] [--db PATH] [--socket PATH] [--utc]"
#define USAGE_NOTES \
	"Global options may stand anywhere. Times print in local time with the offset,\n" \
	"in UTC with --utc; JSON is always UTC. T is ISO 8601 (2026-11-25T18:00:00Z,\n" \
	"2026-12-01T21:00:00+01:00, 2026-11-25), today, yesterday or an age (90s, 2h, 7d).\n" \
	"Exit status: 0 ok, 1 database or socket error,\n" \
	"64 usage, 66 no history database, 69 cmdrelayd unreachable, 77 permission denied,\n" \
	"78 configuration error. See cmdrelayctl(1).\n"

void
ctl_usage(int status)
{
	FILE *out = status ? stderr : stdout;

	fprintf(out, "usage: cmdrelayctl " USAGE_GLOBAL " COMMAND [OPTIONS]\ncommands:\n");
	for (size_t i = 0; i < NCOMMANDS; i++)
		fprintf(out, "  %s %s\n", ctl_commands[i].name, ctl_commands[i].args);
	fputs(USAGE_NOTES, out);
	exit(status);
}

static void __attribute__((noreturn))
ctl_command_usage(const struct ctl_command *c)
{
	printf("usage: cmdrelayctl " USAGE_GLOBAL " %s%s%s\n" USAGE_NOTES, c->name, *c->args ? " " : "",
	    c->args);
	exit(0);
}

void
ctl_die(int status, const char *fmt, ...)
{
	va_list ap;

	fputs("cmdrelayctl: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(status);
}

static const struct config *
ctl_config(struct ctl *ctl)
{
	char err[CONFIG_ERR_MAX];

	/* Only check-config needs the secrets; the rest must work for users who
	 * may read the history or the socket but not broker.password_file. */
	if (ctl->cfg == NULL && (ctl->check_secrets ? config_load : config_load_public)(ctl->config_file,
	    &ctl->cfg, err, sizeof(err)) == -1)
		ctl_die(EX_CONFIG_STATUS, "%s", err);
	return ctl->cfg;
}

const char *
ctl_history_path(struct ctl *ctl)
{
	return ctl->db_path ? ctl->db_path : ctl_config(ctl)->store.path;
}

const char *
ctl_socket_path(struct ctl *ctl)
{
	return ctl->socket_path ? ctl->socket_path : ctl_config(ctl)->socket.path;
}

/* mqtt_match(filter, topic): MQTT wildcard matching for SQL. */
static void
sql_mqtt_match(sqlite3_context *ctx, int argc, sqlite3_value **argv)
{
	const char *filter = (const char *)sqlite3_value_text(argv[0]);
	const char *topic = (const char *)sqlite3_value_text(argv[1]);

	(void)argc;
	sqlite3_result_int(ctx, filter && topic && topic_matches(filter, topic));
}

sqlite3 *
ctl_open_history(struct ctl *ctl)
{
	const char *path = ctl_history_path(ctl);
	sqlite3 *db;

	if (access(path, F_OK) == -1)
		ctl_die(EX_NOINPUT_STATUS, "%s: %s (is cmdrelayd configured with this store.path?)",
		    path, strerror(errno));
	if (sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL) != SQLITE_OK)
		ctl_die(1, "%s: %s", path, sqlite3_errmsg(db));
	sqlite3_busy_timeout(db, 2000);
	sqlite3_create_function(db, "mqtt_match", 2, SQLITE_UTF8 | SQLITE_DETERMINISTIC, NULL,
	    sql_mqtt_match, NULL, NULL);
	return db;
}

/* "today" and "yesterday": the local midnight that began the day. */
static bool
parse_day(const char *text, int64_t *out_ms)
{
	if (strcmp(text, "today") != 0 && strcmp(text, "yesterday") != 0)
		return false;
	*out_ms = store_local_midnight((int64_t)time(NULL) * 1000, -(text[0] == 'y'));
	return true;
}

static int
two_digits(const char *p)
{
	return p[0] >= '0' && p[0] <= '9' && p[1] >= '0' && p[1] <= '9' ? (p[0] - '0') * 10 + p[1] - '0' : -1;
}

/* "Z", "+01:00", "-0530", "+02" after a time: seconds east of UTC. */
static bool
parse_offset(const char *p, long *east)
{
	int sign = *p == '-' ? -1 : 1, h, m = 0;

	if (*p == 'Z') {
		*east = 0;
		return p[1] == '\0';
	}
	if ((*p != '+' && *p != '-') || (h = two_digits(p + 1)) < 0 || h > 23)
		return false;
	p += 3;
	if (*p == ':')
		p++;
	if (*p != '\0' && ((m = two_digits(p)) < 0 || m > 59 || p[2] != '\0'))
		return false;
	*east = sign * (h * 3600L + m * 60L);
	return true;
}

/*
 * "2h", "7d" before now, "today", "yesterday", or ISO 8601 as history prints
 * it (2026-11-25T18:24:44.123Z; seconds and fraction optional), with "Z" or
 * an offset (+01:00); a date or time without either is UTC.
 */
bool
ctl_parse_time(const char *text, int64_t *out_ms)
{
	static const char *const formats[] = {
		"%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d",
	};
	int64_t age;

	if (parse_duration_ms(text, &age) == 0) {
		*out_ms = (int64_t)time(NULL) * 1000 - age;
		return true;
	}
	if (parse_day(text, out_ms))
		return true;
	for (size_t i = 0; i < sizeof(formats) / sizeof(formats[0]); i++) {
		struct tm tm = { 0 }, back;
		const char *end = strptime(text, formats[i], &tm);
		int64_t ms = 0;
		long east = 0;
		time_t secs;

		if (end == NULL)
			continue;
		if (*end == '.' && i < 2) {
			int digits = 0;
			for (end++; *end >= '0' && *end <= '9'; end++, digits++)
				if (digits < 3)
					ms = ms * 10 + (*end - '0');
			if (digits == 0)
				continue;
			for (; digits < 3; digits++)
				ms *= 10;
		}
		if (*end != '\0' && (i == 3 || !parse_offset(end, &east)))
			continue;
		/* timegm() would turn 2026-02-30 into March 2: refuse what it moved. */
		back = tm;
		secs = timegm(&back);
		gmtime_r(&secs, &back);
		if (back.tm_mday != tm.tm_mday || back.tm_mon != tm.tm_mon || back.tm_hour != tm.tm_hour)
			return false;
		*out_ms = ((int64_t)secs - east) * 1000 + ms;
		return true;
	}
	return false;
}

void
ctl_time(const struct ctl *ctl, int64_t unix_ms, char *buf, size_t len)
{
	time_t secs = (time_t)(unix_ms / 1000);
	struct tm tm;
	long east;
	size_t n;

	if (ctl->utc) {
		wire_time(unix_ms, buf, len);
		return;
	}
	localtime_r(&secs, &tm);
	n = strftime(buf, len, "%Y-%m-%dT%H:%M:%S", &tm);
	east = tm.tm_gmtoff;
	snprintf(buf + n, len - n, ".%03d%c%02ld:%02ld", (int)(unix_ms % 1000), east < 0 ? '-' : '+',
	    labs(east) / 3600, labs(east) % 3600 / 60);
}

const char *
ctl_wire_time(const struct ctl *ctl, const char *iso, char *buf, size_t len)
{
	int64_t ms;

	if (iso == NULL || !ctl_parse_time(iso, &ms))
		return iso ? iso : "-";
	ctl_time(ctl, ms, buf, len);
	return buf;
}

static long
parse_limit(const char *arg)
{
	char *end;
	long limit;

	errno = 0;
	limit = strtol(arg, &end, 10);
	if (errno || *end || end == arg || limit < 1 || limit > HISTORY_MAX_LIMIT)
		ctl_die(EX_USAGE_STATUS, "--limit: '%s' is not a number from 1 to %d", arg, HISTORY_MAX_LIMIT);
	return limit;
}

/* One history row, as a table line or JSON. */
static void
history_row(const struct ctl *ctl, FILE *out, sqlite3_stmt *s, bool json)
{
	const char *row_topic = (const char *)sqlite3_column_text(s, 2);
	const unsigned char *payload = sqlite3_column_blob(s, 3);
	int plen = sqlite3_column_bytes(s, 3);
	char when[CTL_TIME_MAX];

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
		fprintf(out, "%-6lld %-*s %-14s %-9s %-15s %-6s %-3d %-3d ",
		    (long long)sqlite3_column_int64(s, 0), CTL_TIME_WIDTH, when,
		    sqlite3_column_type(s, 10) == SQLITE_NULL ? "-" : (const char *)sqlite3_column_text(s, 10),
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
	if (sqlite3_prepare_v2(db, "SELECT min(id), max(id) FROM (SELECT id FROM messages"
	    HISTORY_WHERE " ORDER BY id DESC LIMIT ?6)", -1, &s, NULL) != SQLITE_OK)
		ctl_die(1, "%s: %s", ctl_history_path(ctl), sqlite3_errmsg(db));
	history_bind(s, f);
	sqlite3_bind_int64(s, 6, limit);
	if (sqlite3_step(s) == SQLITE_ROW && sqlite3_column_type(s, 0) != SQLITE_NULL) {
		*first = sqlite3_column_int64(s, 0);
		*last = sqlite3_column_int64(s, 1);
	}
	sqlite3_finalize(s);
}

static int
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
	const char *device = NULL, *topic = NULL, *status = "all";
	int64_t since = 0, until = INT64_MAX;
	long limit = 100, rows = 0;
	bool json = false;
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
		case 'S':
			if (strcmp(optarg, "accepted") && strcmp(optarg, "duplicate") && strcmp(optarg, "all"))
				ctl_die(EX_USAGE_STATUS, "--status: '%s' is not accepted, duplicate or all", optarg);
			status = optarg;
			break;
		case 'l':
			limit = parse_limit(optarg);
			break;
		case 'j':
			json = true;
			break;
		default:
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
	rc = sqlite3_prepare_v2(db,
	    "SELECT id, received_at, topic, payload, qos, retain, dup, status,"
	    " reason, duplicate_of, device FROM messages"
	    HISTORY_WHERE " AND id BETWEEN ?6 AND ?7 ORDER BY id LIMIT ?8",
	    -1, &s, NULL);
	if (rc != SQLITE_OK)
		ctl_die(1, "%s: %s", ctl_history_path(ctl), sqlite3_errmsg(db));
	filter = (struct history_filter){ device, topic, status, since, until };
	history_bind(s, &filter);
	history_range(ctl, db, &filter, limit, &first, &last);
	if (!json)
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
			history_row(ctl, out, s, json);
		}
		if (rc != SQLITE_DONE)
			ctl_die(1, "%s: %s", ctl_history_path(ctl), sqlite3_errmsg(db));
		rows += n;
		sqlite3_reset(s);	/* the read transaction ends here */
		fclose(out);
		fwrite(buf, 1, buflen, stdout);
		free(buf);
	}
	sqlite3_finalize(s);
	if (rows == limit) {
		/* a cut that says nothing reads as "that is all there is" */
		if (sqlite3_prepare_v2(db, "SELECT count(*) - ?6 FROM messages" HISTORY_WHERE, -1, &s,
		    NULL) != SQLITE_OK)
			ctl_die(1, "%s: %s", ctl_history_path(ctl), sqlite3_errmsg(db));
		history_bind(s, &filter);
		sqlite3_bind_int64(s, 6, limit);
		if (sqlite3_step(s) == SQLITE_ROW && sqlite3_column_int64(s, 0) > 0)
			fprintf(stderr, "cmdrelayctl: %lld more rows match; use --limit N (up to %d) or "
			    "--since\n", (long long)sqlite3_column_int64(s, 0), HISTORY_MAX_LIMIT);
		sqlite3_finalize(s);
	}
	sqlite3_close(db);
	return 0;
}

static int
cmd_outbox(struct ctl *ctl, int argc, char *argv[])
{
	static const struct option opts[] = {
		{ "status", required_argument, NULL, 'S' },
		{ "limit", required_argument, NULL, 'l' },
		{ "json", no_argument, NULL, 'j' },
		{ NULL, 0, NULL, 0 },
	};
	const char *status = "all";
	bool json = false;
	long limit = 100;
	sqlite3_stmt *s;
	sqlite3 *db;
	int ch, rc;

	optind = 0;	/* 0: GNU getopt starts afresh, options may follow operands */
	while ((ch = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (ch) {
		case 'S':
			if (strcmp(optarg, "queued") && strcmp(optarg, "sent") && strcmp(optarg, "failed") &&
			    strcmp(optarg, "all"))
				ctl_die(EX_USAGE_STATUS, "--status: '%s' is not queued, sent, failed or all", optarg);
			status = optarg;
			break;
		case 'l':
			limit = parse_limit(optarg);
			break;
		case 'j':
			json = true;
			break;
		default:
			ctl_usage(EX_USAGE_STATUS);
		}
	}
	if (optind != argc)
		ctl_usage(EX_USAGE_STATUS);
	db = ctl_open_history(ctl);
	if (sqlite3_prepare_v2(db, "SELECT * FROM (SELECT id, queued_at, topic, payload, qos, retain,"
	    " status, sent_at, attempts, origin FROM outbox WHERE ?1 = 'all' OR status = ?1"
	    " ORDER BY id DESC LIMIT ?2) ORDER BY id", -1, &s, NULL) != SQLITE_OK)
		ctl_die(1, "%s: %s", ctl_history_path(ctl), sqlite3_errmsg(db));
	sqlite3_bind_text(s, 1, status, -1, SQLITE_STATIC);
	sqlite3_bind_int64(s, 2, limit);
	if (!json)
		printf("%-6s %-*s %-6s %-*s %-3s %-3s %-8s %s\n", "ID", CTL_TIME_WIDTH, "QUEUED", "STATUS",
		    CTL_TIME_WIDTH, "SENT",
		    "QOS", "RET", "ATTEMPTS", "TOPIC / PAYLOAD");
	while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
		const unsigned char *payload = sqlite3_column_blob(s, 3);
		int plen = sqlite3_column_bytes(s, 3);
		char queued[CTL_TIME_MAX], sent[CTL_TIME_MAX] = "-";
		/* JSON in UTC, as the socket protocol has it; the table for people */
		const struct ctl *as = json ? &(const struct ctl){ .utc = true } : ctl;

		ctl_time(as, sqlite3_column_int64(s, 1), queued, sizeof(queued));
		if (sqlite3_column_type(s, 7) != SQLITE_NULL)
			ctl_time(as, sqlite3_column_int64(s, 7), sent, sizeof(sent));
		if (json) {
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
		ctl_die(1, "%s: %s", ctl_history_path(ctl), sqlite3_errmsg(db));
	sqlite3_finalize(s);
	sqlite3_close(db);
	return 0;
}

static int
cmd_check_config(struct ctl *ctl, int argc, char *argv[])
{
	(void)argv;
	if (argc != 1)
		ctl_usage(EX_USAGE_STATUS);
	ctl->check_secrets = true;
	ctl_config(ctl);
	printf("%s: configuration OK\n", ctl->config_file);
	return 0;
}

/*
 * Takes the global options out of argv wherever they stand (before or after
 * the subcommand and its options) and returns what is left; "--" ends them.
 */
static int
ctl_take_globals(struct ctl *ctl, int argc, char *argv[])
{
	static const struct {
		const char *name;	/* "-c" also takes -cFILE, the others --NAME=VALUE */
		size_t field;		/* the const char * in struct ctl it sets */
	} globals[] = {
		{ "-c", offsetof(struct ctl, config_file) },
		{ "--db", offsetof(struct ctl, db_path) },
		{ "--socket", offsetof(struct ctl, socket_path) },
	};
	int out = 1, i;

	for (i = 1; i < argc && strcmp(argv[i], "--") != 0; i++) {
		size_t g, len;
		for (g = 0; g < sizeof(globals) / sizeof(globals[0]); g++) {
			len = strlen(globals[g].name);
			if (strncmp(argv[i], globals[g].name, len) == 0 &&
			    (argv[i][len] == '\0' || argv[i][len] == '=' || (g == 0 && argv[i][len] != '\0')))
				break;
		}
		if (g == sizeof(globals) / sizeof(globals[0])) {
			if (strcmp(argv[i], "--utc") == 0) {
				ctl->utc = true;
				continue;
			}
			if (strcmp(argv[i], "--version") == 0) {
				printf("cmdrelayctl %s\n", CMDRELAY_VERSION);
				exit(0);
			}
			argv[out++] = argv[i];
			continue;
		}
		const char **field = (const char **)((char *)ctl + globals[g].field);
		if (argv[i][len] != '\0')
			*field = argv[i] + len + (argv[i][len] == '=');
		else if (i + 1 < argc)
			*field = argv[++i];
		else {
			fprintf(stderr, "cmdrelayctl: %s needs an argument\n", globals[g].name);
			ctl_usage(EX_USAGE_STATUS);
		}
	}
	for (; i < argc; i++)
		argv[out++] = argv[i];
	argv[out] = NULL;
	return out;
}

int
main(int argc, char *argv[])
{
	struct ctl ctl = { .config_file = DEFAULT_CONFIG };

	argc = ctl_take_globals(&ctl, argc, argv);
	if (argc < 2)
		ctl_usage(EX_USAGE_STATUS);
	if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "help") == 0)
		ctl_usage(0);
	for (size_t i = 0; i < NCOMMANDS; i++) {
		if (strcmp(argv[1], ctl_commands[i].name) == 0) {
			int rc;
			for (int a = 2; a < argc && strcmp(argv[a], "--") != 0; a++)
				if (strcmp(argv[a], "--help") == 0 || strcmp(argv[a], "-h") == 0)
					ctl_command_usage(&ctl_commands[i]);
			rc = ctl_commands[i].fn(&ctl, argc - 1, argv + 1);
			config_free(ctl.cfg);
			return rc;
		}
	}
	fprintf(stderr, "cmdrelayctl: unknown command '%s'\n", argv[1]);
	ctl_usage(EX_USAGE_STATUS);
}
