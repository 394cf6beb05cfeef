#include "relay.h"
#include "relay_internal.h"

#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"



static void
relay_status_changed(struct relay *r)
{
	if (r->status_fn)
		r->status_fn(r->status_arg);
}

void
relay_on_status_change(struct relay *r, void (*fn)(void *arg), void *arg)
{
	r->status_fn = fn;
	r->status_arg = arg;
}

void
relay_on_commit(struct relay *r, void (*fn)(void *arg), void *arg)
{
	r->commit_fn = fn;
	r->commit_arg = arg;
}

struct store *
relay_store(struct relay *r)
{
	return r->store;
}
















static void
relay_on_connected(void *arg, bool session_present)
{
	struct relay *r = arg;

	r->barrier_row = 0;
	dedup_state_clear(&r->dedup);
	/* Without its own number, redeliveries on it could not be matched. */
	if ((r->connection = store_connection_start(r->store)) == -1 ||
	    relay_load_candidates(r, session_present) == -1) {
		log_errx("history: %s", store_errmsg(r->store));
		mqtt_abort(r->mqtt, "could not read the history's unacknowledged messages; dropped it");
		return;
	}
	r->connected_wall_ms = event_wall_ms();
	r->session_present = session_present;
	relay_check_session(r, session_present);
	relay_sync_subscriptions(r, session_present);
	uplink_connected(r->uplink);
	relay_status_changed(r);
}

static void
relay_on_disconnected(void *arg, const char *why)
{
	struct relay *r = arg;

	(void)why;
	relay_pending_clear(r);	/* none of them is answered on the next connection */
	uplink_disconnected(r->uplink);
	relay_status_changed(r);
}



/* The barrier's news goes into the history with the next transaction. */
static int
relay_write_confirmed(struct relay *r)
{
	if (r->confirmed_row == 0)
		return 0;
	if (store_unacked_confirm(r->store, r->confirmed_connection, r->confirmed_row) == -1)
		return -1;
	r->confirmed_row = 0;
	event_timer_disarm(r->loop, &r->confirm_timer);
	return 0;
}

static int
relay_record(struct relay *r, const struct delivery *d, const struct dedup_verdict *v)
{
	struct topic_fields fields = { 0 };
	int64_t row;
	int rc;

	if (topic_fields_extract(r->pattern, d->topic, &fields) == -1) {
		log_errx("out of memory");
		return -1;
	}
	rc = store_insert(r->store, d, v, &fields, &row);
	topic_fields_clear(&fields);
	if (rc == -1)
		return -1;
	r->staged_row = row;
	if (d->qos > 0 && store_unacked_add(r->store, row, v, d->mid) == -1)
		return -1;
	if (v->run_ended && store_unacked_retire(r->store) == -1)
		return -1;
	return 0;
}

/*
 * A payload over store.max_payload is recorded without it and acknowledged
 * like any other delivery: kept, it would bloat every reader; refused, the
 * broker would send it again for ever. It is not handed to consumers.
 */
static int
relay_record_oversized(struct relay *r, const struct delivery *d, const struct dedup_verdict *v)
{
	struct delivery cut = *d;

	cut.payloadlen = 0;
	if (relay_record(r, &cut, v) == -1 ||
	    store_mark_oversize(r->store, r->staged_row, d->payloadlen) == -1)
		return -1;
	r->staged.oversized++;
	log_warnx("%s: #%" PRId64 ": payload of %zu bytes is over store.max_payload (%" PRId64
	    "); recorded without it, not delivered", d->topic, r->staged_row, d->payloadlen,
	    r->cfg->store.max_payload);
	return 0;
}

int
relay_inject(struct relay *r, const struct delivery *d, int64_t *row)
{
	const struct dedup_verdict fresh = { .reason = DEDUP_NEW };
	struct topic_fields fields = { 0 };
	int rc;

	/* A broker batch is open: its commit and PUBACKs come first. */
	if (r->in_txn)
		return -2;
	if (topic_fields_extract(r->pattern, d->topic, &fields) == -1)
		return -1;
	if ((rc = store_begin(r->store)) == 0 && (rc = store_insert(r->store, d, &fresh, &fields, row)) == 0 &&
	    (rc = store_mark_injected(r->store, *row)) == 0)
		rc = store_commit(r->store);
	if (rc == -1)
		store_rollback(r->store);
	topic_fields_clear(&fields);
	if (rc == 0) {
		const struct relay_counters one = { .received = 1, .by_reason[DEDUP_NEW] = 1 };
		relay_today_add(r, &one);
	}
	if (rc == 0 && r->commit_fn)
		r->commit_fn(r->commit_arg);
	return rc;
}

static int
relay_begin(struct relay *r)
{
	if (store_begin(r->store) == -1)
		return -1;
	r->in_txn = true;
	r->staged = (struct relay_counters){ 0 };
	return relay_write_confirmed(r);
}

/*
 * The transaction opens before the pass reads: a history locked by another
 * writer (an admin's sqlite3) holds reading back instead of failing the
 * messages read, which would cost the broker connection (G6).
 */
static int
relay_on_ready(void *arg)
{
	struct relay *r = arg;

	if (r->in_txn || relay_begin(r) == 0) {
		if (r->busy_since_ms)
			log_info("history: writable again after %" PRIu64 " ms; reading from the broker",
			    event_now_ms() - r->busy_since_ms);
		r->busy_since_ms = 0;
		return 0;
	}
	if (!store_busy(r->store))
		return 0;	/* on_message meets it too, and takes the G6 path */
	if (!r->busy_since_ms) {
		log_warnx("history: locked by another writer (%s); nothing is read from the broker, "
		    "so nothing waits for a PUBACK, until it is free", store_errmsg(r->store));
		r->busy_since_ms = event_now_ms();
	}
	return -1;
}

static int
relay_on_message(void *arg, const struct delivery *d)
{
	struct relay *r = arg;
	struct dedup_verdict v;

	if (!r->in_txn && relay_begin(r) == -1)
		goto fail;
	if (!mqtt_dup_readable(r->mqtt))
		r->dedup.ids_kept = false;
	if (dedup_decide(&r->dedup, store_dedup_source(r->store), d, &v) == -1 ||
	    (d->payloadlen > (size_t)r->cfg->store.max_payload ?
	    relay_record_oversized(r, d, &v) : relay_record(r, d, &v)) == -1)
		goto fail;
	r->staged.received++;
	r->staged.by_reason[v.reason]++;
	if (v.reason != DEDUP_NEW)
		log_debug("%s: %s of #%" PRId64, d->topic, dedup_reasons[v.reason].name, v.duplicate_of);
	return 0;
fail:
	log_errx("history: %s", store_errmsg(r->store));
	return -1;
}

static void
relay_on_abort(void *arg)
{
	struct relay *r = arg;

	if (!r->in_txn)
		return;
	store_rollback(r->store);
	r->in_txn = false;
	r->total.commit_failures++;
	relay_status_changed(r);
}

/*
 * After a commit, its PUBACKs are queued: a barrier behind them tells when
 * the broker has them, so that those rows stop being candidates. At most one
 * in flight; a commit during it is covered by the next.
 */
static void
relay_barrier(struct relay *r)
{
	if (r->barrier_row || r->committed_row == 0 || mqtt_barrier(r->mqtt) == -1)
		return;
	r->barrier_row = r->committed_row;
}

static void
relay_on_confirm_timer(void *arg)
{
	struct relay *r = arg;

	if (r->in_txn || r->confirmed_row == 0)
		return;
	if (store_begin(r->store) == -1 || relay_write_confirmed(r) == -1 ||
	    store_commit(r->store) == -1) {
		log_warnx("history: %s", store_errmsg(r->store));
		store_rollback(r->store);
	}
}

/*
 * Quiet after a barrier: write what it confirmed soon, so that a crash
 * then leaves no candidates that would be flagged for nothing.
 */
#define CONFIRM_IDLE_MS 200

static void
relay_on_barrier(void *arg)
{
	struct relay *r = arg;

	r->answered_row = r->confirmed_row = r->barrier_row;
	r->confirmed_connection = r->connection;
	r->barrier_row = 0;
	event_timer_arm(r->loop, &r->confirm_timer, CONFIRM_IDLE_MS);
	if (r->committed_row > r->answered_row)
		relay_barrier(r);
}

static int
relay_commit_batch(void *arg)
{
	struct relay *r = arg;

	uint64_t t0 = event_now_us();

	if (!r->in_txn)
		return 0;
	r->in_txn = false;
	if (store_commit(r->store) == -1) {
		log_errx("history: %s", store_errmsg(r->store));
		store_rollback(r->store);
		r->total.commit_failures++;
		relay_status_changed(r);
		return -1;
	}
	if (r->staged.received == 0)
		return 0;	/* a pass without messages: no PUBACKs to cover */
	r->last_commit_us = event_now_us() - t0;
	r->total.received += r->staged.received;
	for (int i = 0; i < DEDUP_NREASONS; i++)
		r->total.by_reason[i] += r->staged.by_reason[i];
	r->total.oversized += r->staged.oversized;
	relay_today_add(r, &r->staged);
	r->committed_row = r->staged_row;
	/* Not fatal: without the mark a crash only leaves more to flag. */
	if (store_puback_mark(r->store, r->connection, r->committed_row) == -1)
		log_warnx("history: %s", store_errmsg(r->store));
	relay_barrier(r);
	relay_status_changed(r);
	if (r->commit_fn)
		r->commit_fn(r->commit_arg);
	return 0;
}

static void
relay_on_published(void *arg, int mid)
{
	struct relay *r = arg;

	uplink_published(r->uplink, mid);
}

static const struct mqtt_handler *
relay_handler(struct relay *r)
{
	static struct mqtt_handler h = {
		.connected = relay_on_connected,
		.disconnected = relay_on_disconnected,
		.ready = relay_on_ready,
		.message = relay_on_message,
		.commit = relay_commit_batch,
		.abort = relay_on_abort,
		.subscribed = relay_on_subscribed,
		.unsubscribed = relay_on_unsubscribed,
		.published = relay_on_published,
		.barrier = relay_on_barrier,
	};

	h.arg = r;
	return &h;
}

static void
relay_set_config(struct relay *r, const struct config *cfg)
{
	r->cfg = cfg;
	snprintf(r->session_key, sizeof(r->session_key), "%s@%s:%d", cfg->broker.client_id,
	    cfg->broker.host, (int)cfg->broker.port);
}

int
relay_reload(struct relay *r, const struct config *cfg, char *err, size_t errlen)
{
	struct topic_pattern *pattern = topic_pattern_new(cfg->topic_fields, err, errlen);
	struct mqtt *fresh = NULL;

	if (pattern == NULL)
		return -1;
	if (!mqtt_same_broker(r->cfg, cfg) &&
	    (fresh = mqtt_new(r->loop, cfg, relay_handler(r), err, errlen)) == NULL) {
		topic_pattern_free(pattern);
		return -1;
	}
	topic_pattern_free(r->pattern);
	r->pattern = pattern;
	relay_set_config(r, cfg);
	if (fresh) {
		log_info("reload: broker settings changed; reconnecting");
		mqtt_stop(r->mqtt);
		mqtt_free(r->mqtt);
		relay_pending_clear(r);
		r->mqtt = fresh;
		uplink_attach(r->uplink, r->mqtt);
		mqtt_start(r->mqtt);
	} else {
		mqtt_set_config(r->mqtt, cfg);
		if (mqtt_is_connected(r->mqtt))
			relay_sync_subscriptions(r, true);
	}
	relay_status_changed(r);
	return 0;
}

struct relay *
relay_new(struct event_loop *loop, const struct config *cfg, char *err, size_t errlen)
{
	struct relay *r;

	if ((r = calloc(1, sizeof(*r))) == NULL) {
		snprintf(err, errlen, "out of memory");
		return NULL;
	}
	r->loop = loop;
	event_timer_init(&r->confirm_timer, relay_on_confirm_timer, r);
	r->started_mono_ms = event_now_ms();
	r->started_wall_ms = event_wall_ms();
	relay_set_config(r, cfg);
	if ((r->pattern = topic_pattern_new(cfg->topic_fields, err, errlen)) == NULL ||
	    (r->store = store_new(cfg->store.path,
	    strcmp(cfg->store.on_corruption, "recover") == 0, err, errlen)) == NULL ||
	    (r->mqtt = mqtt_new(loop, cfg, relay_handler(r), err, errlen)) == NULL ||
	    (r->uplink = uplink_new(r->store)) == NULL) {
		if (r->store && r->mqtt && !r->uplink)
			snprintf(err, errlen, "out of memory");
		relay_free(r);
		return NULL;
	}
	uplink_attach(r->uplink, r->mqtt);
	relay_today_recount(r);
	return r;
}

void
relay_free(struct relay *r)
{
	if (r == NULL)
		return;
	relay_pending_clear(r);
	event_timer_disarm(r->loop, &r->confirm_timer);
	dedup_state_clear(&r->dedup);
	mqtt_free(r->mqtt);
	uplink_free(r->uplink);
	store_free(r->store);
	topic_pattern_free(r->pattern);
	free(r);
}

void
relay_uplink_kick(struct relay *r)
{
	uplink_kick(r->uplink);
}

void
relay_start(struct relay *r)
{
	mqtt_start(r->mqtt);
}

void
relay_stop(struct relay *r)
{
	mqtt_stop(r->mqtt);
}
