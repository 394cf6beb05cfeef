/*
 * The consumer socket's clients: hello, ack, and the fan-out of committed
 * commands to named consumers (window, cursor, sent mark) and tails.
 */
#include "consumer.h"
#include "consumer_internal.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "log.h"
#include "request.h"
#include "server.h"
#include "topic.h"
#include "wire.h"

#define FETCH_BATCH 64
/* Errors logged per connection before the rest are only counted: a client may send nothing else. */
#define ERROR_LOG_BURST 10
/* ... and then one in this many, with the count. */
#define ERROR_LOG_EVERY 1000
/* How often unused cursors are looked for: socket.cursor_expiry is an hour at least. */
#define EXPIRY_INTERVAL_MS (60 * 1000)
/* Rows one consumer_fill() may walk: about a millisecond of SQLite, whatever matches. */
#define FILL_SCAN_MAX 4096
/* An anonymous tail with this much unread output is closed, not waited for. */
#define TAIL_MAX_QUEUED (1024 * 1024)
/* A fill the history refused (another program's lock, mostly) is tried again this soon. */
#define FILL_RETRY_MS 100

void
consumer_send_error(struct client *cl, const char *code, const char *fmt, ...)
{
	char message[512];
	json_t *reply;
	char *line;
	size_t len;
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(message, sizeof(message), fmt, ap);
	va_end(ap);
	if (strcmp(code, "storage") == 0 && store_busy(cl->cs->store))
		code = "storage_busy";	/* another program holds a lock: try again soon */
	else if (strcmp(code, "storage") == 0 && store_corrupt(cl->cs->store))
		code = "history_corrupt";	/* reconnect: the relay recovers and resumes the cursor */
	reply = json_pack("{s:s, s:s, s:s}", "type", "error", "code", code, "message", message);
	if (reply && (line = wire_line(reply, &len)) != NULL) {
		conn_send(cl->conn, line, len);
		free(line);
	}
	json_decref(reply);
	if (++cl->errors > ERROR_LOG_BURST && cl->errors % ERROR_LOG_EVERY != 0)
		return;
	log_info("consumer %s (pid %d): %s: %s (error %" PRIu64 " of this connection%s)",
	    cl->mode == CLIENT_NAMED ? cl->name : "-", (int)conn_pid(cl->conn), code, message,
	    cl->errors, cl->errors == ERROR_LOG_BURST ? "; from now on one in 1000 is logged" : "");
}

void
consumer_send_json(struct client *cl, json_t *value)
{
	char *line;
	size_t len;

	if (value && (line = wire_line(value, &len)) != NULL) {
		conn_send(cl->conn, line, len);
		free(line);
	}
	json_decref(value);
}

/* May the client be sent more now? */
static bool
consumer_has_room(const struct client *cl)
{
	size_t queued = conn_queued(cl->conn);

	if (cl->mode == CLIENT_NAMED)
		return cl->count < (size_t)cl->cs->cfg->socket.window && queued < SERVER_OUT_LOW_WATER;
	/* A replay is paced by the reader; a live tail is not waited for. */
	return cl->live ? queued <= TAIL_MAX_QUEUED : queued < SERVER_OUT_LOW_WATER;
}

static int
consumer_send_named(const struct stored_command *c, void *arg)
{
	struct client *cl = arg;
	size_t window = (size_t)cl->cs->cfg->socket.window;
	json_t *cmd = wire_command(c);

	if (cmd && c->id <= cl->sent_before)
		json_object_set_new(cmd, "redelivered", json_true());
	consumer_send_json(cl, cmd);
	cl->inflight[(cl->head + cl->count) % window] = c->id;
	cl->count++;
	cl->sent_id = c->id;
	return consumer_has_room(cl) ? 0 : -1;
}

static int
consumer_send_tail(const struct stored_command *c, void *arg)
{
	struct client *cl = arg;

	cl->sent_id = c->id;
	if (topic_matches(cl->filter, c->topic))
		consumer_send_json(cl, wire_command(c));
	return consumer_has_room(cl) ? 0 : -1;
}

/*
 * What a named consumer was sent leaves only once the history says so:
 * after any crash, a command sent again is known to be one. If that cannot
 * be written, nothing of this fill leaves, and the client is as before.
 */
static int
consumer_mark_sent(struct client *cl, int64_t sent_id, int64_t scanned_id, size_t count)
{
	/* The history's mark covers the hello's and everything before this fill. */
	int64_t marked = sent_id > cl->sent_before ? sent_id : cl->sent_before;
	int rc = cl->sent_id > marked ? store_consumer_sent(cl->cs->store, cl->name, cl->sent_id) : 0;

	conn_uncork(cl->conn, rc == -1);
	if (rc == -1) {
		cl->sent_id = sent_id;
		cl->scanned_id = scanned_id;
		cl->count = count;
	}
	return rc;
}

/*
 * Reads from the history what the client may have now: a named consumer up
 * to its window, as long as its socket keeps up; a tail everything new.
 * Unsent commands stay in the database, not in memory (G5). One call walks
 * at most FILL_SCAN_MAX rows, however few match: a cursor far behind
 * catches up a slice per loop turn, not at every commit.
 */
static void
consumer_fill(struct client *cl)
{
	struct store *st = cl->cs->store;
	size_t window = (size_t)cl->cs->cfg->socket.window, count = cl->count;
	bool named = cl->mode == CLIENT_NAMED;
	int64_t last, upto, budget = FILL_SCAN_MAX, sent_id = cl->sent_id, scanned_id = cl->scanned_id;
	int n = 0, want;

	if (cl->mode == CLIENT_NEW)
		return;
	if ((last = store_last_id(st)) < 0)
		goto fail;
	if (named)
		conn_cork(cl->conn);
	while (cl->scanned_id < last && budget > 0 && consumer_has_room(cl)) {
		upto = last - cl->scanned_id > budget ? cl->scanned_id + budget : last;
		want = named && window - cl->count < FETCH_BATCH ? (int)(window - cl->count) : FETCH_BATCH;
		if ((n = store_fetch(st, named ? cl->filter : NULL, cl->scanned_id, upto, want,
		    named ? consumer_send_named : consumer_send_tail, cl)) < 0)
			break;
		/* Cut short by the window or the socket: walked up to the last row sent. */
		if (n == want || !consumer_has_room(cl))
			upto = cl->sent_id;
		budget -= upto - cl->scanned_id;
		cl->scanned_id = upto;
	}
	if (named && consumer_mark_sent(cl, sent_id, scanned_id, count) == -1)
		n = -1;
	if (cl->mode == CLIENT_TAIL && cl->live && conn_queued(cl->conn) > TAIL_MAX_QUEUED) {
		consumer_send_error(cl, "slow_consumer", "the tail fell %d bytes behind; closing",
		    TAIL_MAX_QUEUED);
		conn_close(cl->conn);
		return;
	}
	if (n >= 0 && cl->scanned_id == last)
		cl->live = true;
	else if (n >= 0 && consumer_has_room(cl))
		event_timer_arm(cl->cs->loop, &cl->more, 0);
	if (n >= 0)
		return;
fail:
	log_warnx("consumer %s: %s", named ? cl->name : "tail", store_errmsg(st));
	if (!store_corrupt(st)) {
		event_timer_arm(cl->cs->loop, &cl->more, FILL_RETRY_MS);
		return;
	}
	consumer_send_error(cl, "storage", "the history is damaged (%s); reconnect: the relay recovers it and"
	    " resumes after your last ack", store_errmsg(st));
	conn_close(cl->conn);
}

static void
consumer_on_more(void *arg)
{
	consumer_fill(arg);
}

void
consumer_match_name(struct conn *c, void *state, void *arg)
{
	struct client *cl = state;
	struct name_search *s = arg;

	if (cl != s->except && cl->mode == CLIENT_NAMED && strcmp(cl->name, s->name) == 0) {
		s->found = true;
		s->pid = conn_pid(c);
		s->since_ms = cl->since_ms;
	}
}

static void
consumer_op_hello(struct client *cl, const struct request *req)
{
	int64_t resume_after;
	int rc;

	if (cl->mode != CLIENT_NEW) {
		consumer_send_error(cl, "already_started", "hello was already said on this connection");
		return;
	}
	snprintf(cl->filter, sizeof(cl->filter), "%s", req->filter);
	/* A cursor beyond the newest id would skip every command up to it. */
	if (req->start.from == STORE_FROM_ID) {
		int64_t newest = store_last_id(cl->cs->store);
		if (newest < 0) {
			consumer_send_error(cl, "storage", "the history cannot be read now; try again");
			return;
		}
		if (req->start.id > newest) {
			consumer_send_error(cl, "bad_request", "hello: from #%" PRId64 " is beyond the "
			    "newest command, #%" PRId64, req->start.id, newest);
			return;
		}
	}
	if (req->named) {
		struct name_search search = { .name = req->name, .except = cl };
		server_foreach(cl->cs->server, consumer_match_name, &search);
		if (search.found) {
			consumer_send_error(cl, "consumer_busy", "consumer %s is connected already", search.name);
			conn_close(cl->conn);
			return;
		}
		if ((rc = store_consumer_open(cl->cs->store, req->name, req->filter, &req->start,
		    cl->cs->cfg->socket.max_cursors, &resume_after, &cl->sent_before)) == -2) {
			consumer_send_error(cl, "too_many_cursors", "%" PRId64 " consumer names are known "
			    "(socket.max_cursors); reuse one, or have the admin remove one",
			    cl->cs->cfg->socket.max_cursors);
			conn_close(cl->conn);
			return;
		}
		if (rc == -1) {
			log_warnx("consumer %s: %s", search.name, store_errmsg(cl->cs->store));
			consumer_send_error(cl, "storage", "the history cannot be written now; try again");
			return;
		}
		snprintf(cl->name, sizeof(cl->name), "%s", search.name);
		cl->mode = CLIENT_NAMED;
	} else {
		resume_after = req->start.from == STORE_FROM_ID ? req->start.id :
		    store_last_id(cl->cs->store);
		if (resume_after < 0) {
			consumer_send_error(cl, "storage", "the history cannot be read now; try again");
			return;
		}
		cl->mode = CLIENT_TAIL;
	}
	cl->sent_id = cl->acked_id = cl->scanned_id = resume_after;
	cl->since_ms = (int64_t)event_wall_ms();
	log_info("consumer %s (pid %d uid %d): filter %s, resuming after #%" PRId64,
	    cl->mode == CLIENT_NAMED ? cl->name : "(tail)", (int)conn_pid(cl->conn),
	    (int)conn_uid(cl->conn), cl->filter, resume_after);
	consumer_send_json(cl, json_pack("{s:s, s:i, s:o, s:I}", "type", "welcome", "version", 1,
	    "consumer", cl->mode == CLIENT_NAMED ? json_string(cl->name) : json_null(),
	    "resume_after", (json_int_t)resume_after));
	consumer_fill(cl);
}

/* Whether id is one of the commands in flight (sent, unacknowledged). */
static bool
consumer_client_sent(const struct client *cl, int64_t id)
{
	size_t window = (size_t)cl->cs->cfg->socket.window;

	for (size_t i = 0; i < cl->count; i++)
		if (cl->inflight[(cl->head + i) % window] == id)
			return true;
	return false;
}

static void
consumer_op_ack(struct client *cl, const struct request *req)
{
	size_t window = (size_t)cl->cs->cfg->socket.window;
	int64_t id = req->ack_id;

	if (cl->mode != CLIENT_NAMED) {
		consumer_send_error(cl, "not_named", "ack needs a hello with a consumer name first");
		return;
	}
	if (id > cl->sent_id) {
		consumer_send_error(cl, "ack_unknown", "ack of #%" PRId64 ", but the last command sent "
		    "is #%" PRId64, id, cl->sent_id);
		return;
	}
	if (id <= cl->acked_id)
		return;		/* cumulative: already done */
	if (!consumer_client_sent(cl, id)) {
		consumer_send_error(cl, "ack_unknown", "ack of #%" PRId64 ", which was not sent to "
		    "this consumer", id);
		return;
	}
	if (store_consumer_ack(cl->cs->store, cl->name, id) == -1) {
		log_warnx("consumer %s: %s", cl->name, store_errmsg(cl->cs->store));
		consumer_send_error(cl, "storage", "the ack could not be stored; send it again");
		return;
	}
	cl->acked_id = id;
	while (cl->count > 0 && cl->inflight[cl->head] <= id) {
		cl->head = (cl->head + 1) % window;
		cl->count--;
	}
	consumer_fill(cl);
}

/* The handler of each op request.c parses; consumers_new() refuses a gap. */
static void (*const consumer_ops[REQUEST_NOPS])(struct client *, const struct request *) = {
	[REQUEST_HELLO] = consumer_op_hello,
	[REQUEST_ACK] = consumer_op_ack,
	[REQUEST_STATS] = consumer_op_stats,
	[REQUEST_PUBLISH] = consumer_op_publish,
	[REQUEST_CURSOR] = consumer_op_cursor,
	[REQUEST_INJECT] = consumer_op_inject,
	[REQUEST_STORE_ACK] = consumer_op_store_ack,
};

static void
consumer_on_line(struct conn *c, void *state, char *line, size_t len, void *arg)
{
	struct client *cl = state;
	struct request_error err;
	static struct request req;	/* 64 KiB: not on the stack */

	(void)c;
	(void)arg;
	if (request_parse(line, len, &req, &err) == -1) {
		consumer_send_error(cl, err.code, "%s", err.message);
		if (err.fatal)
			conn_close(cl->conn);
		return;
	}
	consumer_ops[req.op](cl, &req);
}

static void *
consumer_on_open(struct conn *c, void *arg)
{
	struct consumers *cs = arg;
	struct client *cl = calloc(1, sizeof(*cl));

	if (cl == NULL || (cl->inflight = calloc((size_t)cs->cfg->socket.window, sizeof(int64_t))) == NULL) {
		free(cl);
		return NULL;
	}
	cl->cs = cs;
	cl->conn = c;
	event_timer_init(&cl->more, consumer_on_more, cl);
	return cl;
}

static void
consumer_on_drained(struct conn *c, void *state, void *arg)
{
	(void)c;
	(void)arg;
	consumer_fill(state);
}

static void
consumer_on_close(struct conn *c, void *state, void *arg)
{
	struct client *cl = state;

	(void)arg;
	/* one that never said hello (a stats poll) was not logged at info either */
	(cl->mode == CLIENT_NEW ? log_debug : log_info)("consumer %s (pid %d) disconnected",
	    cl->mode == CLIENT_NAMED ? cl->name : "-", (int)conn_pid(c));
	event_timer_disarm(cl->cs->loop, &cl->more);
	free(cl->inflight);
	free(cl);
}

/* A client still catching up reaches the new rows on its own. */
static void
consumer_notify_one(struct conn *c, void *state, void *arg)
{
	struct client *cl = state;

	(void)c;
	(void)arg;
	if (cl->more.due_ms == 0)
		consumer_fill(cl);
}

static void
consumer_touch_connected(struct conn *c, void *state, void *arg)
{
	struct client *cl = state;
	struct consumers *cs = arg;

	(void)c;
	if (cl->mode == CLIENT_NAMED && store_consumer_touch(cs->store, cl->name) == -1)
		log_warnx("consumer %s: %s", cl->name, store_errmsg(cs->store));
}

static int
consumer_log_expired(const struct store_consumer *sc, void *arg)
{
	struct consumers *cs = arg;
	char when[40];

	wire_time(sc->updated_at_ms, when, sizeof(when));
	log_info("consumer %s: cursor (acknowledged up to #%" PRId64 ") unused since %s; removed "
	    "(socket.cursor_expiry)", sc->name, sc->acked_id, when);
	cs->cursors_expired++;
	return 0;
}

/* Connected cursors are in use; the others expire after socket.cursor_expiry without a hello or ack. */
static void
consumer_on_expiry(void *arg)
{
	struct consumers *cs = arg;

	server_foreach(cs->server, consumer_touch_connected, cs);
	if (store_consumers_expire(cs->store, (int64_t)event_wall_ms() - cs->cfg->socket.cursor_expiry_ms,
	    consumer_log_expired, cs) == -1)
		log_warnx("cursor expiry: %s", store_errmsg(cs->store));
	event_timer_arm(cs->loop, &cs->expiry_timer, EXPIRY_INTERVAL_MS);
}

void
consumers_set_config(struct consumers *cs, const struct config *cfg)
{
	cs->cfg = cfg;
	server_set_config(cs->server, cfg);
}

void
consumers_notify(struct consumers *cs)
{
	server_foreach(cs->server, consumer_notify_one, NULL);
}

struct consumers *
consumers_new(struct event_loop *loop, const struct config *cfg, struct store *store,
    const struct consumers_hooks *hooks, char *err, size_t errlen)
{
	struct consumers *cs = calloc(1, sizeof(*cs));
	struct server_handler h = {
		.open = consumer_on_open, .line = consumer_on_line, .drained = consumer_on_drained, .close = consumer_on_close,
	};

	if (cs == NULL) {
		snprintf(err, errlen, "out of memory");
		return NULL;
	}
	for (int i = 0; i < REQUEST_NOPS; i++) {
		if (consumer_ops[i] == NULL) {
			snprintf(err, errlen, "internal: socket op %s has no handler", request_op_name(i));
			free(cs);
			return NULL;
		}
	}
	cs->loop = loop;
	cs->cfg = cfg;
	cs->store = store;
	cs->hooks = *hooks;
	h.arg = cs;
	if ((cs->server = server_new(loop, cfg, &h, err, errlen)) == NULL) {
		free(cs);
		return NULL;
	}
	event_timer_init(&cs->expiry_timer, consumer_on_expiry, cs);
	event_timer_arm(loop, &cs->expiry_timer, 0);
	return cs;
}

void
consumers_free(struct consumers *cs)
{
	if (cs == NULL)
		return;
	event_timer_disarm(cs->loop, &cs->expiry_timer);
	server_free(cs->server);
	free(cs);
}
