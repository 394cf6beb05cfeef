/* What the cmdrelayctl subcommands share. */
#ifndef CMDRELAY_CTL_H
#define CMDRELAY_CTL_H

#include <stdbool.h>

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
};

void ctl_usage(int status) __attribute__((noreturn));
void ctl_die(int status, const char *fmt, ...) __attribute__((noreturn, format(printf, 2, 3)));
const char *ctl_history_path(struct ctl *ctl);
const char *ctl_socket_path(struct ctl *ctl);
/* The history, read-only; exits with a clear message when it is missing. */
sqlite3 *ctl_open_history(struct ctl *ctl);

int cmd_tail(struct ctl *ctl, int argc, char *argv[]);
int cmd_stats(struct ctl *ctl, int argc, char *argv[]);
int cmd_status(struct ctl *ctl, int argc, char *argv[]);
int cmd_publish(struct ctl *ctl, int argc, char *argv[]);

#endif
