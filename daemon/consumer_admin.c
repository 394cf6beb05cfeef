/*
 * The socket ops that are not a consumer's stream: stats, publish (the
 * uplink outbox), consumer (delete or reset a cursor), inject and store.
 */
#include <inttypes.h>
#include <stdio.h>
#include <unistd.h>

#include "consumer_internal.h"
#include "log.h"
#include "topic.h"
#include "wire.h"

struct stats_ctx {
	struct consumers *cs;
	json_t *list;
};

static int
consumer_add_stats(const struct store_consumer *sc, void *arg)
{
	struct stats_ctx *ctx = arg;
	struct name_search search = { .name = sc->name };
	json_t *entry;
	char since[40];

	server_foreach(ctx->cs->server, consumer_match_name, &search);
	entry = json_pack("{s:s, s:s, s:I, s:I, s:b, s:b}", "name", sc->name, "filter", sc->filter,
	    "acked_id", (json_int_t)sc->acked_id, "lag", (json_int_t)sc->lag, "lag_exact", sc->lag_exact,
	    "connected", search.found);
	if (entry && search.found) {
		wire_time(search.since_ms, since, sizeof(since));
		json_object_set_new(entry, "pid", json_integer(search.pid));
		json_object_set_new(entry, "connected_since", json_string(since));
	}
	json_array_append_new(ctx->list, entry);
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
	cs->hooks.stats(reply, cs->hooks.arg);
	json_object_set_new(reply, "connections", json_integer((json_int_t)server_connections(cs->server)));
	json_object_set_new(reply, "cursors_expired", json_integer((json_int_t)cs->cursors_expired));
	if (store_consumers(cs->store, consumer_add_stats, &ctx) == -1)
		log_warnx("stats: %s", store_errmsg(cs->store));
	json_object_set_new(reply, "consumers", ctx.list);
	return reply;
}

void
consumer_op_stats(struct client *cl, const struct request *req)
{
	json_t *reply = consumers_stats(cl->cs);

	(void)req;
	if (reply == NULL) {
		consumer_send_error(cl, "internal", "out of memory");
		return;
	}
	consumer_send_json(cl, reply);
}

static bool
consumer_uplink_allowed(const struct config *cfg, const char *topic)
{
	for (size_t i = 0; i < cfg->uplink.nallow; i++)
		if (topic_matches(cfg->uplink.allow[i], topic))
			return true;
	return false;
}

/* The message is committed to the outbox before we say "queued". */
void
consumer_op_publish(struct client *cl, const struct request *req)
{
	const struct outbox_msg msg = {
		.topic = req->publish.topic,
		.payload = req->publish.payload,
		.payloadlen = req->publish.payloadlen,
		.qos = req->publish.qos,
		.retain = req->publish.retain,
	};
	char origin[128];
	int64_t id;
	int rc;

	if (!consumer_uplink_allowed(cl->cs->cfg, msg.topic)) {
		consumer_send_error(cl, "not_allowed", "publish: %.256s is not in uplink.allow", msg.topic);
		return;
	}
	snprintf(origin, sizeof(origin), "%s uid %d pid %d", cl->mode == CLIENT_NAMED ? cl->name : "-",
	    (int)conn_uid(cl->conn), (int)conn_pid(cl->conn));
	rc = store_outbox_add(cl->cs->store, &msg, origin, cl->cs->cfg->uplink.max_queued, &id);
	if (rc == -2) {
		consumer_send_error(cl, "outbox_full", "publish: %" PRId64 " messages wait to be sent "
		    "(uplink.max_queued); try again later", cl->cs->cfg->uplink.max_queued);
		return;
	}
	if (rc == -1) {
		log_warnx("publish: %s", store_errmsg(cl->cs->store));
		consumer_send_error(cl, "storage", "publish: the outbox cannot be written now; try again");
		return;
	}
	consumer_send_json(cl, json_pack("{s:s, s:I}", "type", "queued", "id", (json_int_t)id));
	cl->cs->hooks.queued(cl->cs->hooks.arg);
}

/* Deleting or moving a cursor under a connected consumer would race its acks: refused. */
void
consumer_op_cursor(struct client *cl, const struct request *req)
{
	struct name_search search = { .name = req->name };
	int64_t acked_id;
	int rc;

	server_foreach(cl->cs->server, consumer_match_name, &search);
	if (search.found) {
		consumer_send_error(cl, "consumer_busy", "consumer %s is connected (pid %d); stop it first",
		    req->name, (int)search.pid);
		return;
	}
	rc = store_consumer_set(cl->cs->store, req->name, req->cursor_delete ? NULL : &req->start,
	    &acked_id);
	if (rc == -2) {
		consumer_send_error(cl, "no_consumer", "there is no consumer %s", req->name);
		return;
	}
	if (rc == -3) {
		consumer_send_error(cl, "bad_request", "consumer: #%" PRId64 " is beyond the newest command",
		    req->start.id);
		return;
	}
	if (rc == -1) {
		log_warnx("consumer %s: %s", req->name, store_errmsg(cl->cs->store));
		consumer_send_error(cl, "storage", "the history cannot be written now; try again");
		return;
	}
	log_info("consumer %s %s by uid %d pid %d", req->name, req->cursor_delete ? "deleted" : "reset",
	    (int)conn_uid(cl->conn), (int)conn_pid(cl->conn));
	consumer_send_json(cl, req->cursor_delete ?
	    json_pack("{s:s, s:s, s:b}", "type", "consumer", "consumer", req->name, "deleted", 1) :
	    json_pack("{s:s, s:s, s:I}", "type", "consumer", "consumer", req->name,
	    "acked_id", (json_int_t)acked_id));
}

/* Only root and the daemon's own user may make up commands: consumers act on them. */
void
consumer_op_inject(struct client *cl, const struct request *req)
{
	const struct delivery d = {
		.topic = req->publish.topic,
		.payload = req->publish.payload,
		.payloadlen = req->publish.payloadlen,
		.qos = req->publish.qos,
		.retain = req->publish.retain,
		.received_at_ms = (int64_t)event_wall_ms(),
	};
	uid_t uid = conn_uid(cl->conn);
	int64_t row;
	int rc;

	if (uid != 0 && uid != geteuid()) {
		consumer_send_error(cl, "not_allowed", "inject: only root or uid %d may inject", (int)geteuid());
		return;
	}
	if ((rc = cl->cs->hooks.inject(&d, &row, cl->cs->hooks.arg)) == -2) {
		consumer_send_error(cl, "busy", "inject: a broker batch is being committed; try again");
		return;
	}
	if (rc == -1) {
		log_warnx("inject: %s", store_errmsg(cl->cs->store));
		consumer_send_error(cl, "storage", "inject: the history cannot be written now; try again");
		return;
	}
	log_info("injected #%" PRId64 " on %.256s by uid %d pid %d", row, d.topic, (int)uid,
	    (int)conn_pid(cl->conn));
	consumer_send_json(cl, json_pack("{s:s, s:I}", "type", "injected", "id", (json_int_t)row));
}

/* The alarm is for the admins: root and the daemon's own user clear it. */
void
consumer_op_store_ack(struct client *cl, const struct request *req)
{
	uid_t uid = conn_uid(cl->conn);
	int64_t n = store_corruptions(cl->cs->store);

	(void)req;
	if (uid != 0 && uid != geteuid()) {
		consumer_send_error(cl, "not_allowed", "store: only root or uid %d may acknowledge",
		    (int)geteuid());
		return;
	}
	if (store_corruption_ack(cl->cs->store) == -1) {
		log_warnx("store: %s", store_errmsg(cl->cs->store));
		consumer_send_error(cl, "storage", "store: the history cannot be written now; try again");
		return;
	}
	if (n > 0)
		log_info("history corruption alarm acknowledged by uid %d pid %d", (int)uid,
		    (int)conn_pid(cl->conn));
	consumer_send_json(cl, json_pack("{s:s, s:I}", "type", "store", "acknowledged", (json_int_t)n));
}
