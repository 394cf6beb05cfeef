/*
 * cmdrelayctl tail: follows commands on the socket for people and shell
 * scripts. A named cursor moves only past what reached the reader: a line
 * written, flushed and (into a pipe) taken by the other end, or an --exec
 * command that exited 0. It outlives relay restarts unless --once.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "ctl.h"
#include "wire.h"

/* Reconnect backoff: quick after a restart, at most one try every 5 s. */
#define TAIL_RETRY_MIN_MS 100
#define TAIL_RETRY_MAX_MS 5000
/* How often a full pipe is looked at: a reader taking lines is seen within this. */
#define TAIL_DRAIN_MAX_MS 50

struct tail {
	const struct ctl *ctl;
	const char *name, *filter, *from, *exec;
	bool json, ack, once;
	bool resume;		/* last is known: later connections start there */
	int64_t last;		/* the last id handled: where to resume, what not to redo */
};

static void
tail_sleep_ms(long ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };

	nanosleep(&ts, NULL);
}

static int
tail_send(int fd, json_t *msg)
{
	char *text = json_dumps(msg, JSON_COMPACT);
	int rc;

	json_decref(msg);
	if (text == NULL)
		ctl_die(1, "out of memory");
	rc = dprintf(fd, "%s\n", text) < 0 ? -1 : 0;
	free(text);
	return rc;
}

/* A JSON string for a terminal; the payload of a command by its encoding. */
static void
tail_render(FILE *out, json_t *str, const char *encoding)
{
	size_t len = json_string_length(str), n;
	unsigned char *bytes;

	if (encoding == NULL || strcmp(encoding, "base64") != 0) {
		ctl_render(out, json_string_value(str), len, 0);
		return;
	}
	if ((bytes = malloc(len / 4 * 3 + 1)) == NULL)
		ctl_die(1, "out of memory");
	if (wire_base64_decode(json_string_value(str), len, bytes, len / 4 * 3, &n) == 0)
		ctl_render(out, bytes, n, 0);
	else
		ctl_render(out, json_string_value(str), len, 0);	/* the relay's, as it came */
	free(bytes);
}

static void
tail_print(const struct tail *t, json_t *cmd)
{
	json_t *payload = json_object_get(cmd, "payload"), *topic = json_object_get(cmd, "topic");
	const char *enc = json_string_value(json_object_get(cmd, "encoding"));
	char buf[CTL_TIME_MAX];
	const char *when = ctl_wire_time(t->ctl, json_string_value(json_object_get(cmd, "received_at")),
	    buf, sizeof(buf));

	printf("%-6" JSON_INTEGER_FORMAT " ", json_integer_value(json_object_get(cmd, "id")));
	ctl_render(stdout, when, strlen(when), 0);
	putchar(' ');
	tail_render(stdout, topic, NULL);
	putchar(' ');
	tail_render(stdout, payload, enc);
	putchar('\n');
}

/* Into a pipe, a line is handed over once the reader took it out: 0, or -1 (EPIPE) when it left. */
static int
tail_wait_taken(void)
{
	struct stat st;
	long delay = 1;
	int unread;

	if (fstat(STDOUT_FILENO, &st) == -1 || !S_ISFIFO(st.st_mode))
		return 0;
	for (;;) {
		struct pollfd p = { .fd = STDOUT_FILENO };

		if (ioctl(STDOUT_FILENO, FIONREAD, &unread) == -1 || unread == 0)
			return 0;
		if (poll(&p, 1, 0) == 1 && (p.revents & POLLERR)) {
			errno = EPIPE;
			return -1;
		}
		tail_sleep_ms(delay);
		delay = delay * 2 > TAIL_DRAIN_MAX_MS ? TAIL_DRAIN_MAX_MS : delay * 2;
	}
}

/* CMD with the command's JSON on stdin (and CMDRELAY_ID); its exit status. */
static int
tail_exec(const struct tail *t, json_t *cmd)
{
	char *text = json_dumps(cmd, JSON_COMPACT | JSON_PRESERVE_ORDER), id[32];
	int fds[2], status;
	pid_t pid;

	if (text == NULL || pipe(fds) == -1)
		ctl_die(1, "--exec: %s", text ? strerror(errno) : "out of memory");
	snprintf(id, sizeof(id), "%" JSON_INTEGER_FORMAT, json_integer_value(json_object_get(cmd, "id")));
	fflush(stdout);
	if ((pid = fork()) == -1)
		ctl_die(1, "--exec: fork: %s", strerror(errno));
	if (pid == 0) {
		dup2(fds[0], STDIN_FILENO);
		close(fds[0]);
		close(fds[1]);
		signal(SIGPIPE, SIG_DFL);
		setenv("CMDRELAY_ID", id, 1);
		execl("/bin/sh", "sh", "-c", t->exec, (char *)NULL);
		_exit(127);
	}
	close(fds[0]);
	/* A CMD that does not read its input is judged by its exit status alone. */
	(void)!dprintf(fds[1], "%s\n", text);
	close(fds[1]);
	free(text);
	while (waitpid(pid, &status, 0) == -1)
		if (errno != EINTR)
			ctl_die(1, "--exec: waitpid: %s", strerror(errno));
	return status;
}

/* Hands one command over; exits without acking when that failed. */
static void
tail_handle(struct tail *t, json_t *cmd)
{
	json_int_t id = json_integer_value(json_object_get(cmd, "id"));
	int status;

	if (t->exec) {
		if ((status = tail_exec(t, cmd)) != 0) {
			json_decref(cmd);	/* nothing held at exit: the sanitizer run checks for leaks */
			ctl_die(1, "--exec: '%s' %s %d on #%" JSON_INTEGER_FORMAT "; not acknowledged, "
			    "it comes again on the next start", t->exec,
			    WIFEXITED(status) ? "exited" : "was killed by signal",
			    WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status), id);
		}
		return;
	}
	if (t->json) {
		char *text = json_dumps(cmd, JSON_COMPACT | JSON_PRESERVE_ORDER);
		if (text == NULL)
			ctl_die(1, "out of memory");
		puts(text);
		free(text);
	} else {
		tail_print(t, cmd);
	}
	if (fflush(stdout) == EOF || ferror(stdout) || (t->name && t->ack && tail_wait_taken() == -1)) {
		int err = errno;

		json_decref(cmd);	/* nothing held at exit: the sanitizer run checks for leaks */
		ctl_die(1, "writing to stdout: %s; #%" JSON_INTEGER_FORMAT " not acknowledged",
		    strerror(err), id);
	}
}

static void
tail_die_on_error(json_t *msg)
{
	const char *type = json_string_value(json_object_get(msg, "type"));
	json_t *message = json_object_get(msg, "message");

	if (type == NULL || strcmp(type, "error") != 0)
		return;
	fprintf(stderr, "cmdrelayctl: cmdrelayd says %s: ", json_string_value(json_object_get(msg, "code")));
	/* The relay's message may quote a client's bytes: escaped too. */
	tail_render(stderr, message, NULL);
	fputc('\n', stderr);
	json_decref(msg);
	exit(1);
}

/* --no-ack peeks: where the cursor is and what it follows, from the stats op. */
static void
tail_peek_start(struct tail *t, int fd, FILE *in, char **line, size_t *cap)
{
	json_t *reply, *c;
	size_t i;

	if (tail_send(fd, json_pack("{s:s}", "op", "stats")) == -1 || getline(line, cap, in) == -1)
		ctl_die(1, "cmdrelayd closed the connection");
	if ((reply = json_loads(*line, 0, NULL)) == NULL)
		ctl_die(1, "cmdrelayd sent a line that is not JSON");
	tail_die_on_error(reply);
	json_array_foreach(json_object_get(reply, "consumers"), i, c) {
		if (strcmp(json_string_value(json_object_get(c, "name")), t->name) == 0) {
			t->filter = strdup(json_string_value(json_object_get(c, "filter")));
			t->last = json_integer_value(json_object_get(c, "acked_id"));
			t->resume = true;
			json_decref(reply);
			return;
		}
	}
	json_decref(reply);
	ctl_die(1, "--no-ack: cmdrelayd has no consumer %s", t->name);
}

/* One connection; returns when the relay went away, exits on anything else. */
static void
tail_session(struct tail *t, int fd)
{
	FILE *in = fdopen(dup(fd), "r");
	char *line = NULL;
	size_t cap = 0;
	json_t *hello = json_pack("{s:s}", "op", "hello");

	if (in == NULL || hello == NULL)
		ctl_die(1, "fdopen: %s", strerror(errno));
	if (t->name && !t->ack && !t->resume)
		tail_peek_start(t, fd, in, &line, &cap);
	if (t->name && t->ack)
		json_object_set_new(hello, "consumer", json_string(t->name));
	if (t->filter)
		json_object_set_new(hello, "filter", json_string(t->filter));
	/* A named cursor resumes where the relay has it; a tail or a peek where we were. */
	if (t->resume)
		json_object_set_new(hello, "from", t->name && t->ack ? json_string("stored") :
		    json_integer(t->last));
	else if (t->from && (strcmp(t->from, "stored") == 0 || strcmp(t->from, "live") == 0))
		json_object_set_new(hello, "from", json_string(t->from));
	else if (t->from)
		json_object_set_new(hello, "from", json_integer(strtoll(t->from, NULL, 10)));
	if (tail_send(fd, hello) == -1)
		goto out;
	while (getline(&line, &cap, in) != -1) {
		json_t *msg = json_loads(line, 0, NULL);
		const char *type = json_string_value(json_object_get(msg, "type"));
		json_int_t id = json_integer_value(json_object_get(msg, "id"));

		if (msg == NULL)
			ctl_die(1, "cmdrelayd sent a line that is not JSON");
		tail_die_on_error(msg);
		if (type && strcmp(type, "welcome") == 0) {
			if (!t->resume)
				t->last = json_integer_value(json_object_get(msg, "resume_after"));
			t->resume = true;
			fprintf(stderr, "cmdrelayctl: following %s%s after #%" JSON_INTEGER_FORMAT "%s\n",
			    t->name ? "as consumer " : "live", t->name ? t->name : "",
			    json_integer_value(json_object_get(msg, "resume_after")),
			    t->name && !t->ack ? " (not acknowledging)" : "");
		} else if (type && strcmp(type, "command") == 0) {
			/* Sent again after a reconnect but handled already: only the ack is missing. */
			if (id > t->last || !t->name || !t->ack)
				tail_handle(t, msg);
			t->last = id > t->last ? id : t->last;
			if (t->name && t->ack &&
			    tail_send(fd, json_pack("{s:s, s:I}", "op", "ack", "id", id)) == -1) {
				json_decref(msg);
				break;
			}
		}
		json_decref(msg);
	}
out:
	free(line);
	fclose(in);
}

int
cmd_tail(struct ctl *ctl, int argc, char *argv[])
{
	static const struct option opts[] = {
		{ "consumer", required_argument, NULL, 'n' },
		{ "filter", required_argument, NULL, 'f' },
		{ "from", required_argument, NULL, 'F' },
		{ "json", no_argument, NULL, 'j' },
		{ "no-ack", no_argument, NULL, 'N' },
		{ "exec", required_argument, NULL, 'e' },
		{ "once", no_argument, NULL, 'o' },
		{ NULL, 0, NULL, 0 },
	};
	struct tail t = { .ctl = ctl, .ack = true };
	const char *path;
	long delay = TAIL_RETRY_MIN_MS;
	bool connected = false;
	int ch, fd;

	optind = 0;	/* 0: GNU getopt starts afresh, options may follow operands */
	while ((ch = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		char *end;
		long long id;

		switch (ch) {
		case 'n':
			t.name = optarg;
			break;
		case 'f':
			t.filter = optarg;
			break;
		case 'F':
			errno = 0;
			id = strtoll(optarg, &end, 10);
			if (strcmp(optarg, "stored") != 0 && strcmp(optarg, "live") != 0 &&
			    (errno != 0 || *end != '\0' || end == optarg || id < 0))
				ctl_die(EX_USAGE_STATUS, "--from: '%s' is not stored, live or a history id", optarg);
			t.from = optarg;
			break;
		case 'j':
			t.json = true;
			break;
		case 'N':
			t.ack = false;
			break;
		case 'e':
			t.exec = optarg;
			break;
		case 'o':
			t.once = true;
			break;
		default:
			ctl_usage(EX_USAGE_STATUS);
		}
	}
	if (optind != argc)
		ctl_usage(EX_USAGE_STATUS);
	if (!t.ack && (t.name == NULL || t.filter || t.from))
		ctl_die(EX_USAGE_STATUS, "--no-ack needs --consumer and takes its filter and position");
	/* A closed stdout or --exec input must be an error we see, not a signal that kills us. */
	signal(SIGPIPE, SIG_IGN);
	path = ctl_socket_path(ctl);
	for (;;) {
		if ((fd = ctl_connect_socket(path)) == -1) {
			int err = errno;

			ctl_socket_refused(path, err);
			if (!connected || t.once)
				ctl_die(EX_UNAVAILABLE_STATUS, "cannot connect to %s: %s (is cmdrelayd running?)",
				    path, strerror(err));
		} else {
			connected = true;
			delay = TAIL_RETRY_MIN_MS;
			tail_session(&t, fd);
			close(fd);
			if (t.once)
				ctl_die(1, "cmdrelayd closed the connection");
			fprintf(stderr, "cmdrelayctl: cmdrelayd went away; reconnecting\n");
		}
		tail_sleep_ms(delay);
		delay = delay * 2 > TAIL_RETRY_MAX_MS ? TAIL_RETRY_MAX_MS : delay * 2;
	}
}
