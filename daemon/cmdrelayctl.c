/* cmdrelayctl: ask the history what the relay received. */
#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <getopt.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <sqlite3.h>

#include "config.h"
#include "ctl.h"
#include "topic.h"
#include "version.h"

#define DEFAULT_CONFIG "/etc/cmdrelay/cmdrelay.yaml"
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

void
ctl_die_history(struct ctl *ctl, sqlite3 *db)
{
	ctl_die(1, "%s: %s", ctl_history_path(ctl), sqlite3_errmsg(db));
}

sqlite3_stmt *
ctl_prepare(struct ctl *ctl, sqlite3 *db, const char *sql)
{
	sqlite3_stmt *s;

	if (sqlite3_prepare_v2(db, sql, -1, &s, NULL) != SQLITE_OK)
		ctl_die_history(ctl, db);
	return s;
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
