/* What the cmdrelayctl subcommands share. */
#ifndef CMDRELAY_CTL_H
#define CMDRELAY_CTL_H

#include <stdbool.h>
#include <stdint.h>

#include <stdio.h>

#include <jansson.h>
#include <sqlite3.h>

#include "config.h"

#define EX_USAGE_STATUS 64
#define EX_NOINPUT_STATUS 66
#define EX_UNAVAILABLE_STATUS 69
#define EX_NOPERM_STATUS 77	/* sysexits.h EX_NOPERM */

struct ctl {
	const char *config_file;
	const char *db_path;		/* --db, else store.path */
	const char *socket_path;	/* --socket, else socket.path */
	struct config *cfg;		/* loaded when first needed */
	bool check_secrets;		/* load the password and TLS files too */
	bool utc;			/* --utc: times for people in UTC, not local time */
};

/* Room for a time as people see it: 2026-12-02T03:04:05.123+01:00. */
#define CTL_TIME_MAX 40
/* TIME_WIDTH characters: the table column that holds one. */
#define CTL_TIME_WIDTH 29

void ctl_usage(int status) __attribute__((noreturn));
void ctl_die(int status, const char *fmt, ...) __attribute__((noreturn, format(printf, 2, 3)));
const char *ctl_history_path(struct ctl *ctl);
const char *ctl_socket_path(struct ctl *ctl);
/* The history, read-only; exits with a clear message when it is missing. */
sqlite3 *ctl_open_history(struct ctl *ctl);
/* The history refused a statement: its path and SQLite's message, exit status 1. */
void ctl_die_history(struct ctl *ctl, sqlite3 *db) __attribute__((noreturn));
/* A statement on the history, or ctl_die_history(). */
sqlite3_stmt *ctl_prepare(struct ctl *ctl, sqlite3 *db, const char *sql);

/* T of --since/--until (ISO 8601, today, yesterday, an age) as Unix ms; false when it is none. */
bool ctl_parse_time(const char *text, int64_t *out_ms);
/* A time for people: local with its offset, or UTC (Z) with --utc. JSON stays UTC. */
void ctl_time(const struct ctl *ctl, int64_t unix_ms, char *buf, size_t len);
/* The same for a time the daemon sent (UTC ISO 8601); shown as it came when it is none. */
const char *ctl_wire_time(const struct ctl *ctl, const char *iso, char *buf, size_t len);

/* Connects to the consumer socket; -1 (errno set) when nobody listens. */
int ctl_connect_socket(const char *path);
/*
 * Bytes from outside (payloads, topics, broker and relay texts) for a
 * terminal, the one human rendering: UTF-8 as it is, \ as \\, and C0, DEL,
 * C1 and bytes that are not UTF-8 as \xNN. width > 0: at most width
 * characters, cut with "..." when longer.
 */
int ctl_render(FILE *out, const void *bytes, size_t len, int width);	/* characters shown */
/* That rendering read back into out (strlen(text) bytes of room); -1 and *outlen the offset of a bad escape. */
int ctl_unescape(const char *text, unsigned char *out, size_t *outlen);

/* Exits with EX_NOPERM and the group to join when err says the socket's mode kept us out. */
void ctl_socket_refused(const char *path, int err);
/* The daemon's socket, for writing (fd) and reading lines (returned); exits when it is not there. */
FILE *ctl_open_daemon(struct ctl *ctl, int *fd);
/* Sends msg (and drops the reference); exits when that fails. */
void ctl_send_json(int fd, json_t *msg);
/* One reply line as JSON; exits when the daemon closed or sent garbage. */
json_t *ctl_read_json(FILE *in);
/* An error reply: its code and message, exit status 1. */
void ctl_die_refused(json_t *reply) __attribute__((noreturn));

int cmd_history(struct ctl *ctl, int argc, char *argv[]);
int cmd_outbox(struct ctl *ctl, int argc, char *argv[]);
int cmd_consumers(struct ctl *ctl, int argc, char *argv[]);
int cmd_tail(struct ctl *ctl, int argc, char *argv[]);
int cmd_stats(struct ctl *ctl, int argc, char *argv[]);
int cmd_status(struct ctl *ctl, int argc, char *argv[]);
int cmd_publish(struct ctl *ctl, int argc, char *argv[]);
int cmd_store(struct ctl *ctl, int argc, char *argv[]);

#endif
