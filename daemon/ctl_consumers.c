/*
 * cmdrelayctl consumers: the named cursors from the history, and their
 * lifecycle (delete, reset) through the running daemon, which refuses it
 * while the consumer is connected and checks socket.allow like any client;
 * and store ack-corruption, which clears a recovered history's alarm.
 */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <jansson.h>

#include "ctl.h"

/* consumers delete NAME | consumers reset NAME --to ID|--live|--oldest */
static int
consumers_change(struct ctl *ctl, int argc, char *argv[])
{
	static const struct option opts[] = {
		{ "to", required_argument, NULL, 't' },
		{ "live", no_argument, NULL, 'l' },
		{ "oldest", no_argument, NULL, 'o' },
		{ NULL, 0, NULL, 0 },
	};
	bool reset = strcmp(argv[0], "reset") == 0;
	json_t *msg, *to = NULL, *reply;
	const char *type;
	FILE *in;
	int ch, fd;

	optind = 0;	/* 0: GNU getopt starts afresh, options may follow operands */
	while ((ch = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		char *end;
		long long id;

		if (!reset || to != NULL)
			ctl_usage(EX_USAGE_STATUS);
		switch (ch) {
		case 't':
			errno = 0;
			id = strtoll(optarg, &end, 10);
			if (errno != 0 || *end != '\0' || end == optarg || id < 0)
				ctl_die(EX_USAGE_STATUS, "--to: '%s' is not a history id", optarg);
			to = json_integer(id);
			break;
		case 'l':
			to = json_string("live");
			break;
		case 'o':
			to = json_string("oldest");
			break;
		default:
			ctl_usage(EX_USAGE_STATUS);
		}
	}
	if (argc - optind != 1 || (reset && to == NULL))
		ctl_usage(EX_USAGE_STATUS);
	in = ctl_open_daemon(ctl, &fd);
	msg = json_pack("{s:s, s:s, s:s}", "op", "consumer", "consumer", argv[optind],
	    "action", reset ? "reset" : "delete");
	if (to)
		json_object_set_new(msg, "to", to);
	ctl_send_json(fd, msg);
	reply = ctl_read_json(in);
	fclose(in);
	close(fd);
	type = json_string_value(json_object_get(reply, "type"));
	if (type && strcmp(type, "consumer") == 0) {
		if (reset)
			printf("consumer %s: acknowledged up to #%" JSON_INTEGER_FORMAT "\n", argv[optind],
			    json_integer_value(json_object_get(reply, "acked_id")));
		else
			printf("consumer %s deleted\n", argv[optind]);
		json_decref(reply);
		return 0;
	}
	ctl_die_refused(reply);
}

/* Clears the alarm of a recovered history (the daemon keeps it in meta until then). */
int
cmd_store(struct ctl *ctl, int argc, char *argv[])
{
	json_t *reply;
	const char *type;
	FILE *in;
	int fd;

	if (argc != 2 || strcmp(argv[1], "ack-corruption") != 0)
		ctl_usage(EX_USAGE_STATUS);
	in = ctl_open_daemon(ctl, &fd);
	ctl_send_json(fd, json_pack("{s:s, s:s}", "op", "store", "action", "ack-corruption"));
	reply = ctl_read_json(in);
	fclose(in);
	close(fd);
	type = json_string_value(json_object_get(reply, "type"));
	if (type && strcmp(type, "store") == 0) {
		printf("history corruption alarm acknowledged (%" JSON_INTEGER_FORMAT " recoveries)\n",
		    json_integer_value(json_object_get(reply, "acknowledged")));
		json_decref(reply);
		return 0;
	}
	ctl_die_refused(reply);
}

/* Who is connected, by consumer name, from the running daemon; an empty object without one. */
static json_t *
consumers_connected(struct ctl *ctl)
{
	json_t *by_name = json_object(), *reply, *c;
	FILE *in;
	size_t i;
	int fd;

	/* --db alone names a history, maybe a copy: no daemon to ask, no config to load. */
	if (ctl->db_path && ctl->socket_path == NULL && access(ctl->config_file, R_OK) == -1)
		return by_name;
	if ((fd = ctl_connect_socket(ctl_socket_path(ctl))) == -1)
		return by_name;
	if ((in = fdopen(dup(fd), "r")) == NULL)
		ctl_die(1, "fdopen: %s", strerror(errno));
	ctl_send_json(fd, json_pack("{s:s}", "op", "stats"));
	reply = ctl_read_json(in);
	fclose(in);
	close(fd);
	json_array_foreach(json_object_get(reply, "consumers"), i, c)
		if (json_is_true(json_object_get(c, "connected")))
			json_object_set_new(by_name, json_string_value(json_object_get(c, "name")),
			    json_pack("{s:O, s:O}", "pid", json_object_get(c, "pid"),
			    "since", json_object_get(c, "connected_since")));
	json_decref(reply);
	return by_name;
}

int
cmd_consumers(struct ctl *ctl, int argc, char *argv[])
{
	static const struct option opts[] = {
		{ "json", no_argument, NULL, 'j' },
		{ NULL, 0, NULL, 0 },
	};
	bool json = false;
	json_t *connected;
	sqlite3_stmt *s;
	sqlite3 *db;
	int ch, rc;

	if (argc > 1 && (strcmp(argv[1], "delete") == 0 || strcmp(argv[1], "reset") == 0))
		return consumers_change(ctl, argc - 1, argv + 1);
	optind = 0;	/* 0: GNU getopt starts afresh, options may follow operands */
	while ((ch = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		if (ch != 'j')
			ctl_usage(EX_USAGE_STATUS);
		json = true;
	}
	if (optind != argc)
		ctl_usage(EX_USAGE_STATUS);
	db = ctl_open_history(ctl);
	s = ctl_prepare(ctl, db, "SELECT l.consumer, l.filter, l.acked_id, l.lag,"
	    " strftime('%Y-%m-%dT%H:%M:%fZ', c.acked_at / 1000.0, 'unixepoch')"
	    " FROM consumer_lag l JOIN consumers c ON c.name = l.consumer ORDER BY l.consumer");
	connected = consumers_connected(ctl);
	if (!json)
		printf("%-20s %-36s %-8s %-8s %-*s %s\n", "CONSUMER", "FILTER", "ACKED", "LAG", CTL_TIME_WIDTH,
		    "LAST ACK", "CONNECTED");
	while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
		const char *name = (const char *)sqlite3_column_text(s, 0);
		const char *filter = (const char *)sqlite3_column_text(s, 1);
		const char *acked_at = (const char *)sqlite3_column_text(s, 4);
		json_t *conn = json_object_get(connected, name);

		if (json) {
			json_t *o = json_pack("{s:s, s:s, s:I, s:I, s:s*, s:O*}", "consumer", name,
			    "filter", filter, "acked_id", (json_int_t)sqlite3_column_int64(s, 2),
			    "lag", (json_int_t)sqlite3_column_int64(s, 3), "last_ack", acked_at,
			    "connected", conn);
			char *line = json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER);
			puts(line);
			free(line);
			json_decref(o);
		} else {
			char last[CTL_TIME_MAX], since[CTL_TIME_MAX];

			printf("%-20s %-36s %-8lld %-8lld %-*s ", name, filter,
			    (long long)sqlite3_column_int64(s, 2), (long long)sqlite3_column_int64(s, 3),
			    CTL_TIME_WIDTH, acked_at ? ctl_wire_time(ctl, acked_at, last, sizeof(last)) : "");
			if (conn)
				printf("pid %" JSON_INTEGER_FORMAT " since %s\n",
				    json_integer_value(json_object_get(conn, "pid")),
				    ctl_wire_time(ctl, json_string_value(json_object_get(conn, "since")), since,
				    sizeof(since)));
			else
				printf("-\n");
		}
	}
	if (rc != SQLITE_DONE)
		ctl_die_history(ctl, db);
	json_decref(connected);
	sqlite3_finalize(s);
	sqlite3_close(db);
	return 0;
}
