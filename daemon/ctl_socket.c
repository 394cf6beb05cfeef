/* cmdrelayctl subcommands that talk to the running daemon over its socket. */
#include <errno.h>
#include <grp.h>
#include <stdbool.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "ctl.h"
#include "wire.h"

int
ctl_connect_socket(const char *path)
{
	struct sockaddr_un sun = { .sun_family = AF_UNIX };
	int fd, saved;

	if (strlen(path) >= sizeof(sun.sun_path)) {
		errno = ENAMETOOLONG;
		return -1;
	}
	memcpy(sun.sun_path, path, strlen(path) + 1);
	if ((fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0)) == -1)
		return -1;
	if (connect(fd, (struct sockaddr *)&sun, sizeof(sun)) == -1) {
		saved = errno;
		close(fd);
		errno = saved;
		return -1;
	}
	return fd;
}

/*
 * A socket the file mode keeps us out of is no "not running": say so, and
 * which group lets one in (socket.mode is 0660 root or cmdrelay's group).
 */
void
ctl_socket_refused(const char *path, int err)
{
	struct group *gr;
	struct stat st;

	if (err != EACCES && err != EPERM)
		return;
	if (stat(path, &st) == 0 && (gr = getgrgid(st.st_gid)) != NULL)
		ctl_die(EX_NOPERM_STATUS, "cannot connect to %s: %s; join the group '%s' "
		    "(usermod -aG %s USER, then log in again)", path, strerror(err), gr->gr_name, gr->gr_name);
	ctl_die(EX_NOPERM_STATUS, "cannot connect to %s: %s (its directory or file mode keeps you out)",
	    path, strerror(err));
}

FILE *
ctl_open_daemon(struct ctl *ctl, int *fd)
{
	const char *path = ctl_socket_path(ctl);
	FILE *in;

	if ((*fd = ctl_connect_socket(path)) == -1) {
		int err = errno;
		ctl_socket_refused(path, err);
		ctl_die(EX_UNAVAILABLE_STATUS, "cannot connect to %s: %s (is cmdrelayd running?)", path,
		    strerror(err));
	}
	if ((in = fdopen(dup(*fd), "r")) == NULL)
		ctl_die(1, "fdopen: %s", strerror(errno));
	return in;
}

void
ctl_send_json(int fd, json_t *msg)
{
	char *text = json_dumps(msg, JSON_COMPACT);

	json_decref(msg);
	if (text == NULL)
		ctl_die(1, "out of memory");
	if (dprintf(fd, "%s\n", text) < 0)
		ctl_die(1, "writing to cmdrelayd: %s", strerror(errno));
	free(text);
}

json_t *
ctl_read_json(FILE *in)
{
	static char *line;
	static size_t cap;
	json_error_t jerr;
	json_t *msg;

	if (getline(&line, &cap, in) == -1)
		ctl_die(1, "cmdrelayd closed the connection");
	if ((msg = json_loads(line, 0, &jerr)) == NULL || !json_is_object(msg))
		ctl_die(1, "cmdrelayd sent a line that is not a JSON object: %s", jerr.text);
	return msg;
}

/* The daemon's reply as it came, in its key order; one line with JSON_COMPACT. */
static void
print_reply(const json_t *reply, size_t flags)
{
	char *text = json_dumps(reply, flags | JSON_PRESERVE_ORDER);

	if (text == NULL)
		ctl_die(1, "out of memory");
	puts(text);
	free(text);
}

/* When the daemon is down, the history still knows the totals. */
static json_t *
stats_from_history(struct ctl *ctl)
{
	sqlite3 *db = ctl_open_history(ctl);
	struct store_day today;
	sqlite3_stmt *s;
	json_t *reply, *consumers;

	/* Objects are made only once nothing can exit any more: no leak at exit. */
	if (sqlite3_prepare_v2(db, "SELECT count(*), coalesce(sum(status = 'accepted'), 0),"
	    " coalesce(sum(reason = 'retained_replay'), 0), coalesce(sum(reason = 'redelivery'), 0)"
	    " FROM messages", -1, &s, NULL) != SQLITE_OK || sqlite3_step(s) != SQLITE_ROW)
		ctl_die_history(ctl, db);
	reply = json_pack("{s:s, s:s}", "type", "stats", "source", "history (cmdrelayd is not running)");
	json_object_set_new(reply, "received", json_integer(sqlite3_column_int64(s, 0)));
	json_object_set_new(reply, "accepted", json_integer(sqlite3_column_int64(s, 1)));
	json_object_set_new(reply, "duplicates", json_pack("{s:I, s:I}",
	    "retained_replay", (json_int_t)sqlite3_column_int64(s, 2),
	    "redelivery", (json_int_t)sqlite3_column_int64(s, 3)));
	sqlite3_finalize(s);
	if (store_day_count(db, (int64_t)time(NULL) * 1000, &today) == -1) {
		json_decref(reply);
		ctl_die_history(ctl, db);
	}
	json_object_set_new(reply, "today", wire_day(&today));
	if (sqlite3_prepare_v2(db, "SELECT consumer, filter, acked_id, lag FROM consumer_lag ORDER BY consumer",
	    -1, &s, NULL) != SQLITE_OK) {
		json_decref(reply);
		ctl_die_history(ctl, db);
	}
	consumers = json_array();
	while (sqlite3_step(s) == SQLITE_ROW)
		json_array_append_new(consumers, json_pack("{s:s, s:s, s:I, s:I, s:b}",
		    "name", (const char *)sqlite3_column_text(s, 0),
		    "filter", (const char *)sqlite3_column_text(s, 1),
		    "acked_id", (json_int_t)sqlite3_column_int64(s, 2),
		    "lag", (json_int_t)sqlite3_column_int64(s, 3), "connected", 0));
	sqlite3_finalize(s);
	sqlite3_close(db);
	json_object_set_new(reply, "consumers", consumers);
	return reply;
}

int
cmd_stats(struct ctl *ctl, int argc, char *argv[])
{
	const char *path;
	json_t *reply;
	bool json = false;
	int fd;

	if (argc == 2 && strcmp(argv[1], "--json") == 0)
		json = true;	/* one line, for scripts; without it indented for people */
	else if (argc != 1)
		ctl_usage(EX_USAGE_STATUS);
	path = ctl_socket_path(ctl);
	if ((fd = ctl_connect_socket(path)) == -1) {
		int err = errno;
		ctl_socket_refused(path, err);
		/* --socket alone names no history: no config to fall back on */
		if (ctl->socket_path && ctl->db_path == NULL)
			ctl_die(EX_UNAVAILABLE_STATUS, "cannot connect to %s: %s (is cmdrelayd running? "
			    "--db PATH reads the history instead)", path, strerror(err));
		fprintf(stderr, "cmdrelayctl: cannot connect to %s (%s); reading the history instead\n",
		    path, strerror(err));
		reply = stats_from_history(ctl);
	} else {
		FILE *in = fdopen(dup(fd), "r");
		if (in == NULL)
			ctl_die(1, "fdopen: %s", strerror(errno));
		ctl_send_json(fd, json_pack("{s:s}", "op", "stats"));
		reply = ctl_read_json(in);
		json_object_set_new(reply, "source", json_string("cmdrelayd"));
		fclose(in);
		close(fd);
	}
	print_reply(reply, json ? JSON_COMPACT : JSON_INDENT(2));
	json_decref(reply);
	return 0;
}

void
ctl_die_refused(json_t *reply)
{
	json_t *message = json_object_get(reply, "message");

	/* The relay's message may quote our bytes back: rendered like a payload. */
	fprintf(stderr, "cmdrelayctl: cmdrelayd refused it: %s: ", json_string_value(json_object_get(reply, "code")));
	ctl_render(stderr, json_string_value(message), json_string_length(message), 0);
	fputc('\n', stderr);
	json_decref(reply);
	exit(1);
}

int
cmd_publish(struct ctl *ctl, int argc, char *argv[])
{
	static const struct option opts[] = {
		{ "retain", no_argument, NULL, 'r' },
		{ "qos", required_argument, NULL, 'q' },
		{ "escaped", no_argument, NULL, 'e' },
		{ NULL, 0, NULL, 0 },
	};
	json_t *msg, *reply, *topic, *payload;
	const char *type, *encoding;
	unsigned char *bytes;
	size_t len;
	bool escaped = false, retain = false, inject = strcmp(argv[0], "inject") == 0;	/* inject: the same, inward */
	int qos = 1;
	FILE *in;
	int ch, fd;

	optind = 0;	/* 0: GNU getopt starts afresh, options may follow operands */
	while ((ch = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (ch) {
		case 'r':
			retain = true;
			break;
		case 'q':
			if (strcmp(optarg, "0") != 0 && strcmp(optarg, "1") != 0)
				ctl_die(EX_USAGE_STATUS, "--qos: '%s' is not 0 or 1", optarg);
			qos = optarg[0] - '0';
			break;
		case 'e':
			escaped = true;
			break;
		default:
			ctl_usage(EX_USAGE_STATUS);
		}
	}
	if (argc - optind != 2)
		ctl_usage(EX_USAGE_STATUS);
	if ((topic = json_string(argv[optind])) == NULL)
		ctl_die(EX_USAGE_STATUS, "TOPIC must be UTF-8");
	json_decref(topic);
	/* --escaped: PAYLOAD as history and tail show it (\\, \xNN), so that a shown payload goes back as it was. */
	len = strlen(argv[optind + 1]);
	if ((bytes = malloc(len + 1)) == NULL)
		ctl_die(1, "out of memory");
	memcpy(bytes, argv[optind + 1], len);
	if (escaped && ctl_unescape(argv[optind + 1], bytes, &len) == -1)
		ctl_die(EX_USAGE_STATUS, "--escaped: PAYLOAD has a bad escape at byte %zu ('%.4s'); "
		    "only \\\\ and \\xNN are escapes", len + 1, argv[optind + 1] + len);
	in = ctl_open_daemon(ctl, &fd);
	/* A payload that is not UTF-8 travels as base64. */
	payload = wire_payload(bytes, len, &encoding);
	free(bytes);
	msg = json_pack("{s:s, s:s, s:o, s:s, s:i, s:b}", "op", inject ? "inject" : "publish",
	    "topic", argv[optind],
	    "payload", payload, "encoding", encoding, "qos", qos, "retain", retain);
	ctl_send_json(fd, msg);
	reply = ctl_read_json(in);
	type = json_string_value(json_object_get(reply, "type"));
	if (type && strcmp(type, inject ? "injected" : "queued") == 0) {
		printf(inject ? "injected as #%" JSON_INTEGER_FORMAT "\n" : "queued as outbox #%" JSON_INTEGER_FORMAT "\n",
		    json_integer_value(json_object_get(reply, "id")));
		json_decref(reply);
		return 0;
	}
	ctl_die_refused(reply);
}

static json_int_t
status_int(json_t *obj, const char *key)
{
	return json_integer_value(json_object_get(obj, key));
}

/* "3d 4h", "2h 5m", "12m 3s", "40s": the two largest units are enough. */
static void
status_age(json_int_t secs, char *buf, size_t len)
{
	static const struct {
		json_int_t secs;
		char unit;
	} units[] = { { 86400, 'd' }, { 3600, 'h' }, { 60, 'm' }, { 1, 's' } };
	size_t i;

	for (i = 0; i + 1 < sizeof(units) / sizeof(units[0]) && secs < units[i].secs; i++)
		;
	if (i + 1 == sizeof(units) / sizeof(units[0]))
		snprintf(buf, len, "%llds", (long long)secs);
	else
		snprintf(buf, len, "%lld%c %lld%c", (long long)(secs / units[i].secs), units[i].unit,
		    (long long)(secs % units[i].secs / units[i + 1].secs), units[i + 1].unit);
}

/* label, then text rendered for a terminal ("none" when NULL). */
static void
status_line(const char *label, json_t *text)
{
	fputs(label, stdout);
	if (text)
		ctl_render(stdout, json_string_value(text), json_string_length(text), 0);
	else
		fputs("none", stdout);
	putchar('\n');
}

/* The daemon's answer to "is it connected, since when, to what", for people. */
static void
status_print(const struct ctl *ctl, json_t *st)
{
	json_t *broker = json_object_get(st, "broker"), *dups = json_object_get(st, "duplicates");
	json_t *today = json_object_get(st, "today");
	json_t *consumers = json_object_get(st, "consumers"), *c;
	const char *err = json_string_value(json_object_get(broker, "last_error"));
	json_int_t connected = 0, behind = 0, lag = 0;
	char up[32], started[CTL_TIME_MAX], since[CTL_TIME_MAX], midnight[CTL_TIME_MAX];
	size_t i;

	json_array_foreach(consumers, i, c) {
		connected += json_is_true(json_object_get(c, "connected"));
		behind += status_int(c, "lag") > 0;
		lag += status_int(c, "lag");
	}
	status_age(status_int(st, "uptime_seconds"), up, sizeof(up));
	printf("cmdrelayd %s, up %s (started %s)\n", json_string_value(json_object_get(st, "version")), up,
	    ctl_wire_time(ctl, json_string_value(json_object_get(st, "started_at")), started, sizeof(started)));
	if (json_is_true(json_object_get(broker, "connected")))
		printf("broker:    connected to %s:%lld (%s) since %s, session %s\n",
		    json_string_value(json_object_get(broker, "host")), (long long)status_int(broker, "port"),
		    json_string_value(json_object_get(broker, "protocol")),
		    ctl_wire_time(ctl, json_string_value(json_object_get(broker, "connected_since")), since,
		    sizeof(since)),
		    json_is_true(json_object_get(broker, "session_present")) ? "present" : "new");
	else
		printf("broker:    DISCONNECTED from %s:%lld\n", json_string_value(json_object_get(broker, "host")),
		    (long long)status_int(broker, "port"));
	printf("client id: %s\n", json_string_value(json_object_get(broker, "client_id")));
	printf("today:       %lld received, %lld accepted, %lld duplicates, %lld possible repeats "
	    "(since %s)\n", (long long)status_int(today, "received"), (long long)status_int(today, "accepted"),
	    (long long)status_int(today, "duplicates"), (long long)status_int(today, "possible_repeats"),
	    ctl_wire_time(ctl, json_string_value(json_object_get(today, "since")), midnight, sizeof(midnight)));
	printf("since start: %lld received, %lld accepted, %lld retained replays, %lld redeliveries, "
	    "%lld commit failures\n", (long long)status_int(st, "received"), (long long)status_int(st, "accepted"),
	    (long long)status_int(dups, "retained_replay"), (long long)status_int(dups, "redelivery"),
	    (long long)status_int(st, "commit_failures"));
	printf("consumers: %lld named, %lld connected, %lld behind (%lld commands unacknowledged); "
	    "%lld socket connections\n", (long long)json_array_size(consumers), (long long)connected,
	    (long long)behind, (long long)lag, (long long)status_int(st, "connections"));
	printf("history:   %lld bytes\n", (long long)status_int(st, "database_bytes"));
	if (json_is_true(json_object_get(st, "store_corrupt")))
		printf("HISTORY CORRUPT: nothing is acknowledged; restart cmdrelayd to recover it\n");
	if (status_int(st, "store_corruptions") > 0)
		status_line("CORRUPTION RECOVERED (cmdrelayctl store ack-corruption when seen): ",
		    json_object_get(st, "store_corruption"));
	/* The broker's words (an MQTT 5 reason string) may carry anything. */
	status_line("last error: ", err && *err ? json_object_get(broker, "last_error") : NULL);
}

int
cmd_status(struct ctl *ctl, int argc, char *argv[])
{
	bool json = argc == 2 && strcmp(argv[1], "--json") == 0;
	json_t *reply;
	FILE *in;
	int fd;

	if (argc != 1 && !json)
		ctl_usage(EX_USAGE_STATUS);
	in = ctl_open_daemon(ctl, &fd);
	ctl_send_json(fd, json_pack("{s:s}", "op", "stats"));
	reply = ctl_read_json(in);
	fclose(in);
	close(fd);
	if (json)
		print_reply(reply, JSON_COMPACT);
	else
		status_print(ctl, reply);
	json_decref(reply);
	return 0;
}
