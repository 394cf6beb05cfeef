#include "consumer.h"

#include <ctype.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <mosquitto.h>

#include "log.h"
#include "server.h"
#include "topic.h"
#include "wire.h"

#define FETCH_BATCH 64
/* An anonymous tail with this much unread output is closed, not waited for. */
#define TAIL_MAX_QUEUED (1024 * 1024)

enum client_mode {
	CLIENT_NEW,
	CLIENT_NAMED,
	CLIENT_TAIL,
};

struct client {
	struct consumers *cs;
	struct conn *conn;
	enum client_mode mode;
	char name[CONSUMER_NAME_MAX + 1];
	char filter[CONSUMER_FILTER_MAX + 1];
	int64_t sent_id;	/* the last command id sent (the tail's cursor) */
	int64_t acked_id;
	int64_t *inflight;	/* ring of sent, unacknowledged ids; socket.window long */
	size_t head, count;
};

struct consumers {
	const struct config *cfg;
	struct store *store;
	struct server *server;
	consumers_stats_fn *stats;
	void *stats_arg;
};

static void __attribute__((format(printf, 3, 4)))
send_error(struct client *cl, const char *code, const char *fmt, ...)
{
	char message[512];
	json_t *reply;
	char *line;
	size_t len;
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(message, sizeof(message), fmt, ap);
	va_end(ap);
	reply = json_pack("{s:s, s:s, s:s}", "type", "error", "code", code, "message", message);
	if (reply && (line = wire_line(reply, &len)) != NULL) {
		conn_send(cl->conn, line, len);
		free(line);
	}
	json_decref(reply);
	log_info("consumer %s (pid %d): %s: %s", cl->mode == CLIENT_NAMED ? cl->name : "-",
	    (int)conn_pid(cl->conn), code, message);
}

static void
send_json(struct client *cl, json_t *value)
{
	char *line;
	size_t len;

	if (value && (line = wire_line(value, &len)) != NULL) {
		conn_send(cl->conn, line, len);
		free(line);
	}
	json_decref(value);
}

static int
send_named(const struct stored_command *c, void *arg)
{
	struct client *cl = arg;
	size_t window = (size_t)cl->cs->cfg->socket.window;

	send_json(cl, wire_command(c));
	cl->inflight[(cl->head + cl->count) % window] = c->id;
	cl->count++;
	cl->sent_id = c->id;
	return 0;
}

static int
send_tail(const struct stored_command *c, void *arg)
{
	struct client *cl = arg;

	cl->sent_id = c->id;
	if (topic_matches(cl->filter, c->topic))
		send_json(cl, wire_command(c));
	return 0;
}

/*
 * Reads from the history what the client may have now: a named consumer up
 * to its window, as long as its socket keeps up; a tail everything new.
 * Unsent commands stay in the database, not in memory (G5).
 */
static void
fill(struct client *cl)
{
	struct store *st = cl->cs->store;
	size_t window = (size_t)cl->cs->cfg->socket.window;
	int n, want;

	if (cl->mode == CLIENT_NAMED) {
		while (cl->count < window && conn_queued(cl->conn) < SERVER_OUT_LOW_WATER) {
			want = (int)(window - cl->count < FETCH_BATCH ? window - cl->count : FETCH_BATCH);
			if ((n = store_fetch(st, cl->filter, cl->sent_id, want, send_named, cl)) < want)
				break;
		}
	} else if (cl->mode == CLIENT_TAIL) {
		do {
			n = store_fetch(st, NULL, cl->sent_id, FETCH_BATCH, send_tail, cl);
			if (conn_queued(cl->conn) > TAIL_MAX_QUEUED) {
				send_error(cl, "slow_consumer", "the tail fell %d bytes behind; closing",
				    TAIL_MAX_QUEUED);
				conn_close(cl->conn);
				return;
			}
		} while (n == FETCH_BATCH);
	} else {
		return;
	}
	if (n < 0)
		log_warnx("consumer %s: %s", cl->mode == CLIENT_NAMED ? cl->name : "tail",
		    store_errmsg(st));
}

static bool
valid_name(const char *name)
{
	size_t len = strlen(name);

	if (len == 0 || len > CONSUMER_NAME_MAX)
		return false;
	for (const char *p = name; *p; p++)
		if (!isalnum((unsigned char)*p) && !strchr("._-", *p))
			return false;
	return true;
}

struct name_search {
	const char *name;
	const struct client *except;
	bool found;
};

static void
match_name(struct conn *c, void *state, void *arg)
{
	struct client *cl = state;
	struct name_search *s = arg;

	(void)c;
	if (cl != s->except && cl->mode == CLIENT_NAMED && strcmp(cl->name, s->name) == 0)
		s->found = true;
}

/* Checks that msg has only the given keys; names the first other one. */
static const char *
unknown_key(json_t *msg, const char *const *allowed)
{
	const char *key;
	json_t *value;

	json_object_foreach(msg, key, value) {
		bool ok = false;
		for (const char *const *a = allowed; *a && !ok; a++)
			ok = strcmp(*a, key) == 0;
		if (!ok)
			return key;
	}
	return NULL;
}

static void
op_hello(struct client *cl, json_t *msg)
{
	static const char *const keys[] = { "op", "consumer", "filter", "from", NULL };
	json_t *jname = json_object_get(msg, "consumer"), *jfilter = json_object_get(msg, "filter");
	json_t *jfrom = json_object_get(msg, "from");
	const char *filter = "#", *bad;
	struct store_start start = { .from = jname ? STORE_FROM_STORED : STORE_FROM_LIVE };
	int64_t resume_after;

	if (cl->mode != CLIENT_NEW)
		return send_error(cl, "already_started", "hello was already said on this connection");
	if ((bad = unknown_key(msg, keys)) != NULL)
		return send_error(cl, "bad_request", "hello: unknown field \"%s\"", bad);
	if (jname && (!json_is_string(jname) || !valid_name(json_string_value(jname))))
		return send_error(cl, "bad_request", "hello: consumer must be 1 to %d of A-Z a-z 0-9 . _ -",
		    CONSUMER_NAME_MAX);
	if (jfilter) {
		filter = json_string_value(jfilter);
		if (filter == NULL || strlen(filter) == 0 || strlen(filter) > CONSUMER_FILTER_MAX ||
		    mosquitto_sub_topic_check(filter) != MOSQ_ERR_SUCCESS)
			return send_error(cl, "bad_request", "hello: filter must be an MQTT topic filter "
			    "of at most %d bytes", CONSUMER_FILTER_MAX);
	}
	if (jfrom && json_is_string(jfrom) && strcmp(json_string_value(jfrom), "live") == 0)
		start.from = STORE_FROM_LIVE;
	else if (jfrom && json_is_string(jfrom) && strcmp(json_string_value(jfrom), "stored") == 0 && jname)
		start.from = STORE_FROM_STORED;
	else if (jfrom && json_is_integer(jfrom) && json_integer_value(jfrom) >= 0)
		start = (struct store_start){ STORE_FROM_ID, json_integer_value(jfrom) };
	else if (jfrom)
		return send_error(cl, "bad_request", "hello: from must be %s\"live\" or a history id",
		    jname ? "\"stored\", " : "");
	snprintf(cl->filter, sizeof(cl->filter), "%s", filter);

	if (jname) {
		struct name_search search = { json_string_value(jname), cl, false };
		server_foreach(cl->cs->server, match_name, &search);
		if (search.found) {
			send_error(cl, "consumer_busy", "consumer %s is connected already", search.name);
			conn_close(cl->conn);
			return;
		}
		if (store_consumer_open(cl->cs->store, search.name, filter, &start, &resume_after) == -1) {
			log_warnx("consumer %s: %s", search.name, store_errmsg(cl->cs->store));
			return send_error(cl, "storage", "the history cannot be written now; try again");
		}
		snprintf(cl->name, sizeof(cl->name), "%s", search.name);
		cl->mode = CLIENT_NAMED;
	} else {
		resume_after = start.from == STORE_FROM_ID ? start.id : store_last_id(cl->cs->store);
		if (resume_after < 0)
			return send_error(cl, "storage", "the history cannot be read now; try again");
		cl->mode = CLIENT_TAIL;
	}
	cl->sent_id = cl->acked_id = resume_after;
	log_info("consumer %s (pid %d uid %d): filter %s, resuming after #%" PRId64,
	    cl->mode == CLIENT_NAMED ? cl->name : "(tail)", (int)conn_pid(cl->conn),
	    (int)conn_uid(cl->conn), cl->filter, resume_after);
	send_json(cl, json_pack("{s:s, s:i, s:o, s:I}", "type", "welcome", "version", 1,
	    "consumer", cl->mode == CLIENT_NAMED ? json_string(cl->name) : json_null(),
	    "resume_after", (json_int_t)resume_after));
	fill(cl);
}

static void
op_ack(struct client *cl, json_t *msg)
{
	static const char *const keys[] = { "op", "id", NULL };
	json_t *jid = json_object_get(msg, "id");
	size_t window = (size_t)cl->cs->cfg->socket.window;
	const char *bad;
	int64_t id;

	if (cl->mode != CLIENT_NAMED)
		return send_error(cl, "not_named", "ack needs a hello with a consumer name first");
	if ((bad = unknown_key(msg, keys)) != NULL)
		return send_error(cl, "bad_request", "ack: unknown field \"%s\"", bad);
	if (!json_is_integer(jid) || json_integer_value(jid) < 0)
		return send_error(cl, "bad_request", "ack: id must be a history id");
	id = json_integer_value(jid);
	if (id > cl->sent_id)
		return send_error(cl, "ack_unknown", "ack of #%" PRId64 ", but the last command sent "
		    "is #%" PRId64, id, cl->sent_id);
	if (id <= cl->acked_id)
		return;		/* cumulative: already done */
	if (store_consumer_ack(cl->cs->store, cl->name, id) == -1) {
		log_warnx("consumer %s: %s", cl->name, store_errmsg(cl->cs->store));
		return send_error(cl, "storage", "the ack could not be stored; send it again");
	}
	cl->acked_id = id;
	while (cl->count > 0 && cl->inflight[cl->head] <= id) {
		cl->head = (cl->head + 1) % window;
		cl->count--;
	}
	fill(cl);
}

struct stats_ctx {
	struct consumers *cs;
	json_t *list;
};

static int
add_consumer_stats(const struct store_consumer *sc, void *arg)
{
	struct stats_ctx *ctx = arg;
	struct name_search search = { sc->name, NULL, false };

	server_foreach(ctx->cs->server, match_name, &search);
	json_array_append_new(ctx->list, json_pack("{s:s, s:s, s:I, s:I, s:b}",
	    "name", sc->name, "filter", sc->filter, "acked_id", (json_int_t)sc->acked_id,
	    "lag", (json_int_t)sc->lag, "connected", search.found));
	return 0;
}

json_t *
consumers_stats(struct consumers *cs)
{
	struct stats_ctx ctx = { cs, json_array() };
	json_t *reply = json_pack("{s:s}", "type", "stats");

	if (reply == NULL || ctx.list == NULL) {
		json_decref(reply);
		json_decref(ctx.list);
		return NULL;
	}
	cs->stats(reply, cs->stats_arg);
	json_object_set_new(reply, "connections", json_integer((json_int_t)server_connections(cs->server)));
	if (store_consumers(cs->store, add_consumer_stats, &ctx) == -1)
		log_warnx("stats: %s", store_errmsg(cs->store));
	json_object_set_new(reply, "consumers", ctx.list);
	return reply;
}

static void
op_stats(struct client *cl, json_t *msg)
{
	json_t *reply = consumers_stats(cl->cs);

	(void)msg;
	if (reply == NULL)
		return send_error(cl, "internal", "out of memory");
	send_json(cl, reply);
}

static void
on_line(struct conn *c, void *state, char *line, size_t len, void *arg)
{
	static const struct {
		const char *name;
		void (*fn)(struct client *, json_t *);
	} ops[] = {
		{ "hello", op_hello },
		{ "ack", op_ack },
		{ "stats", op_stats },
	};
	struct client *cl = state;
	json_error_t jerr;
	json_t *msg;
	const char *op;

	(void)c;
	(void)arg;
	msg = json_loadb(line, len, JSON_REJECT_DUPLICATES, &jerr);
	if (msg == NULL || !json_is_object(msg)) {
		if (msg == NULL)
			send_error(cl, "bad_json", "not JSON (%s, column %d); closing", jerr.text, jerr.column);
		else
			send_error(cl, "bad_json", "a line must be a JSON object; closing");
		json_decref(msg);
		conn_close(cl->conn);
		return;
	}
	if ((op = json_string_value(json_object_get(msg, "op"))) == NULL) {
		send_error(cl, "bad_request", "the object has no \"op\" string");
	} else {
		size_t i;
		for (i = 0; i < sizeof(ops) / sizeof(ops[0]); i++) {
			if (strcmp(ops[i].name, op) == 0) {
				ops[i].fn(cl, msg);
				break;
			}
		}
		if (i == sizeof(ops) / sizeof(ops[0]))
			send_error(cl, "unknown_op", "unknown op \"%.64s\" (hello, ack, stats)", op);
	}
	json_decref(msg);
}

static void *
on_open(struct conn *c, void *arg)
{
	struct consumers *cs = arg;
	struct client *cl = calloc(1, sizeof(*cl));

	if (cl == NULL || (cl->inflight = calloc((size_t)cs->cfg->socket.window, sizeof(int64_t))) == NULL) {
		free(cl);
		return NULL;
	}
	cl->cs = cs;
	cl->conn = c;
	return cl;
}

static void
on_drained(struct conn *c, void *state, void *arg)
{
	(void)c;
	(void)arg;
	fill(state);
}

static void
on_close(struct conn *c, void *state, void *arg)
{
	struct client *cl = state;

	(void)arg;
	log_info("consumer %s (pid %d) disconnected", cl->mode == CLIENT_NAMED ? cl->name : "-",
	    (int)conn_pid(c));
	free(cl->inflight);
	free(cl);
}

static void
notify_one(struct conn *c, void *state, void *arg)
{
	(void)c;
	(void)arg;
	fill(state);
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
	server_foreach(cs->server, notify_one, NULL);
}

size_t
consumers_connected(const struct consumers *cs)
{
	return server_connections(cs->server);
}

struct consumers *
consumers_new(struct event_loop *loop, const struct config *cfg, struct store *store,
    consumers_stats_fn *stats, void *stats_arg, char *err, size_t errlen)
{
	struct consumers *cs = calloc(1, sizeof(*cs));
	struct server_handler h = {
		.open = on_open, .line = on_line, .drained = on_drained, .close = on_close,
	};

	if (cs == NULL) {
		snprintf(err, errlen, "out of memory");
		return NULL;
	}
	cs->cfg = cfg;
	cs->store = store;
	cs->stats = stats;
	cs->stats_arg = stats_arg;
	h.arg = cs;
	if ((cs->server = server_new(loop, cfg, &h, err, errlen)) == NULL) {
		free(cs);
		return NULL;
	}
	return cs;
}

void
consumers_free(struct consumers *cs)
{
	if (cs == NULL)
		return;
	server_free(cs->server);
	free(cs);
}
