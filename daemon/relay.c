#include "relay.h"

#include <inttypes.h>
#include <limits.h>
#include <sys/stat.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dedup.h"
#include "log.h"
#include "mqtt.h"
#include "store.h"
#include "topic.h"
#include "uplink.h"
#include "version.h"
#include "wire.h"

#define PENDING_MAX (2 * CONFIG_MAX_SUBSCRIPTIONS)

/* A SUBSCRIBE or UNSUBSCRIBE waiting for the broker's answer. */
struct pending_sub {
	int mid;
	bool unsubscribe;
	int qos;
	char *filter;
};

struct relay {
	struct event_loop *loop;
	const struct config *cfg;
	struct store *store;
	struct mqtt *mqtt;
	struct uplink *uplink;
	struct topic_pattern *pattern;
	struct dedup_state dedup;
	char session_key[512];
	bool in_txn;
	uint64_t busy_since_ms;	/* another writer holds the history; 0: not */
	struct relay_counters total, staged;
	uint64_t last_commit_us;
	int64_t staged_row, committed_row;	/* the newest row in, and after, the transaction */
	int64_t barrier_row;	/* the newest row whose PUBACK the barrier in flight covers */
	int64_t answered_row;	/* the newest row the last answered barrier covered */
	int64_t confirmed_row;	/* answered, not yet written; 0: nothing to write */
	int64_t confirmed_connection;	/* the connection that sent those PUBACKs */
	int64_t connection;	/* the current connection's number in the history */
	struct event_timer confirm_timer;
	struct pending_sub pending[PENDING_MAX];
	size_t npending;
	void (*status_fn)(void *arg);
	void *status_arg;
	void (*commit_fn)(void *arg);
	void *commit_arg;
	/* for stats and status: since when, and how the broker took us */
	uint64_t started_mono_ms, started_wall_ms, connected_wall_ms;
	bool session_present;
	uint64_t session_lost;	/* connects on which the broker had dropped our session */
	bool session_lost_now;	/* the last connect was one of them: shown until a clean one */
	struct store_day today;	/* since the local midnight, injected commands included */
};

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

/* Recounts today's counts from the history when the local day is not the one counted; true then. */
static bool
relay_today_recount(struct relay *r)
{
	int64_t now = (int64_t)event_wall_ms();

	if (now >= r->today.since_ms && now < r->today.until_ms)
		return false;
	if (store_today(r->store, now, &r->today) == -1)
		log_warnx("history: %s; today's counts start at 0", store_errmsg(r->store));
	return true;
}

/* A commit of c: into today's counts (the recount of a new day has it already). */
static void
relay_today_add(struct relay *r, const struct relay_counters *c)
{
	if (relay_today_recount(r))
		return;
	r->today.received += c->received;
	for (int i = 0; i < DEDUP_NREASONS; i++)
		*(dedup_reasons[i].accepted ? &r->today.accepted : &r->today.duplicates) += c->by_reason[i];
	r->today.possible_repeats += c->by_reason[DEDUP_POSSIBLE_REPEAT];
}

/* The history's size on disk: the database and its WAL. */
static int64_t
relay_file_bytes(const char *db)
{
	char wal[PATH_MAX];
	struct stat st;
	int64_t total = 0;

	snprintf(wal, sizeof(wal), "%s-wal", db);
	if (stat(db, &st) == 0)
		total += st.st_size;
	if (stat(wal, &st) == 0)
		total += st.st_size;
	return total;
}

void
relay_stats(struct relay *r, json_t *obj)
{
	bool connected = mqtt_is_connected(r->mqtt);
	char started[40], since[40];
	const struct config_endpoint *e = mqtt_endpoint(r->mqtt);
	json_t *dups = json_object(), *hosts = json_array();
	uint64_t accepted = 0;
	char hp[300];

	for (size_t i = 0; i < r->cfg->broker.nhosts; i++) {
		snprintf(hp, sizeof(hp), "%s:%d", r->cfg->broker.hosts[i].host, (int)r->cfg->broker.hosts[i].port);
		json_array_append_new(hosts, json_string(hp));
	}

	wire_time((int64_t)r->started_wall_ms, started, sizeof(started));
	wire_time((int64_t)r->connected_wall_ms, since, sizeof(since));
	json_object_set_new(obj, "version", json_string(CMDRELAY_VERSION));
	json_object_set_new(obj, "started_at", json_string(started));
	json_object_set_new(obj, "uptime_seconds",
	    json_integer((json_int_t)((event_now_ms() - r->started_mono_ms) / 1000)));
	json_object_set_new(obj, "broker", json_pack("{s:s, s:i, s:s, s:s, s:b, s:s?, s:o?, s:s, s:o, s:s?}",
	    "host", e->host, "port", (int)e->port,
	    "protocol", r->cfg->broker.protocol, "client_id", r->cfg->broker.client_id,
	    "connected", connected, "connected_since", connected ? since : NULL,
	    "session_present", connected ? json_boolean(r->session_present) : NULL,
	    "last_error", mqtt_last_error(r->mqtt), "hosts", hosts,
	    "left", *mqtt_left(r->mqtt) ? mqtt_left(r->mqtt) : NULL));
	for (int i = 0; i < DEDUP_NREASONS; i++) {
		if (dedup_reasons[i].accepted)
			accepted += r->total.by_reason[i];
		else
			json_object_set_new(dups, dedup_reasons[i].stats_name,
			    json_integer((json_int_t)r->total.by_reason[i]));
	}
	relay_today_recount(r);
	json_object_set_new(obj, "today", wire_day(&r->today));
	json_object_set_new(obj, "received", json_integer((json_int_t)r->total.received));
	json_object_set_new(obj, "accepted", json_integer((json_int_t)accepted));
	json_object_set_new(obj, "possible_repeats",
	    json_integer((json_int_t)r->total.by_reason[DEDUP_POSSIBLE_REPEAT]));
	json_object_set_new(obj, "duplicates", dups);
	json_object_set_new(obj, "oversized", json_integer((json_int_t)r->total.oversized));
	json_object_set_new(obj, "session_lost", json_integer((json_int_t)r->session_lost));
	json_object_set_new(obj, "commit_failures", json_integer((json_int_t)r->total.commit_failures));
	json_object_set_new(obj, "last_commit_seconds", json_real((double)r->last_commit_us / 1e6));
	json_object_set_new(obj, "database_bytes", json_integer((json_int_t)relay_file_bytes(r->cfg->store.path)));
	json_object_set_new(obj, "wal_bytes", json_integer((json_int_t)store_wal_bytes(r->cfg->store.path)));
	json_object_set_new(obj, "store_corrupt", json_boolean(store_corrupt(r->store)));
	json_object_set_new(obj, "store_corruptions", json_integer((json_int_t)store_corruptions(r->store)));
	json_object_set_new(obj, "store_corruption", json_string(store_corruption(r->store)));
	uplink_stats(r->uplink, obj);
}

/* Appends to the STATUS= line; what does not fit is cut, the alarms in front kept. */
static void __attribute__((format(printf, 4, 5)))
relay_status_append(char *buf, size_t len, size_t *n, const char *fmt, ...)
{
	va_list ap;
	int added;

	if (*n + 1 >= len)
		return;
	va_start(ap, fmt);
	added = vsnprintf(buf + *n, len - *n, fmt, ap);
	va_end(ap);
	if (added > 0)
		*n = *n + (size_t)added < len ? *n + (size_t)added : len - 1;
}

void
relay_status(struct relay *r, char *buf, size_t len)
{
	const struct config_endpoint *e = mqtt_endpoint(r->mqtt);
	const char *err = mqtt_last_error(r->mqtt);
	bool connected = mqtt_is_connected(r->mqtt);
	char since[40];
	size_t n = 0;

	buf[0] = '\0';
	if (store_corrupt(r->store) || store_corruptions(r->store) > 0)
		relay_status_append(buf, len, &n, "%s; ", store_corrupt(r->store) ?
		    "HISTORY CORRUPT, nothing is acknowledged" :
		    "history recovered from corruption (cmdrelayctl store ack-corruption)");
	if (connected)
		relay_status_append(buf, len, &n, "connected to %s:%d", e->host, (int)e->port);
	else
		relay_status_append(buf, len, &n, "disconnected%s %s:%d%s%s%s",
		    r->cfg->broker.nhosts > 1 ? ", trying" : " from", e->host,
		    (int)e->port, *err ? " (" : "", err, *err ? ")" : "");
	if (*mqtt_left(r->mqtt))
		relay_status_append(buf, len, &n, "; left %s", mqtt_left(r->mqtt));
	if (connected) {
		wire_time((int64_t)r->connected_wall_ms, since, sizeof(since));
		relay_status_append(buf, len, &n, "; since %s, session %s", since,
		    r->session_present ? "present" : "new");
	}
	if (r->session_lost_now)
		relay_status_append(buf, len, &n, "; SESSION LOST: commands queued while away may be lost");
	if (store_wal_bytes(r->cfg->store.path) > STORE_WAL_PINNED)
		relay_status_append(buf, len, &n, "; WAL %" PRId64 " MiB: a reader pins it",
		    store_wal_bytes(r->cfg->store.path) >> 20);
	relay_today_recount(r);
	relay_status_append(buf, len, &n, "; today %" PRIu64 " accepted, %" PRIu64 " duplicates, %" PRIu64
	    " possible repeats; since start %" PRIu64 " received, %" PRIu64 " accepted",
	    r->today.accepted, r->today.duplicates, r->today.possible_repeats, r->total.received,
	    r->total.by_reason[DEDUP_NEW] + r->total.by_reason[DEDUP_POSSIBLE_REPEAT]);
}

static void
relay_pending_clear(struct relay *r)
{
	for (size_t i = 0; i < r->npending; i++)
		free(r->pending[i].filter);
	r->npending = 0;
}

static void
relay_pending_add(struct relay *r, bool unsubscribe, const char *filter, int qos)
{
	struct pending_sub *p = &r->pending[r->npending];
	int rc;

	if (r->npending == PENDING_MAX || (p->filter = strdup(filter)) == NULL) {
		log_warnx("%s: too many subscription changes at once", filter);
		return;
	}
	p->unsubscribe = unsubscribe;
	p->qos = qos;
	rc = unsubscribe ? mqtt_unsubscribe(r->mqtt, filter, &p->mid) :
	    mqtt_subscribe(r->mqtt, filter, qos, &p->mid);
	if (rc == -1) {
		free(p->filter);
		return;
	}
	log_info("%s %s", unsubscribe ? "unsubscribing from" : "subscribing to", filter);
	r->npending++;
}

static struct pending_sub *
relay_pending_take(struct relay *r, int mid, struct pending_sub *out)
{
	for (size_t i = 0; i < r->npending; i++) {
		if (r->pending[i].mid == mid) {
			*out = r->pending[i];
			/* kept in the order sent: the last one for a filter decides */
			memmove(&r->pending[i], &r->pending[i + 1],
			    (r->npending - i - 1) * sizeof(r->pending[0]));
			r->npending--;
			return out;
		}
	}
	return NULL;
}

/*
 * What the broker will hold for filter once it has answered every request
 * in flight: the confirmed state (known) changed by the requests after it.
 */
static bool
relay_pending_outcome(const struct relay *r, const struct store_subscription *known, size_t nknown,
    const char *filter, int *qos)
{
	bool held = false;

	for (size_t j = 0; j < nknown && !held; j++)
		if (strcmp(known[j].filter, filter) == 0) {
			held = true;
			*qos = known[j].qos;
		}
	for (size_t i = 0; i < r->npending; i++)
		if (strcmp(r->pending[i].filter, filter) == 0) {
			held = !r->pending[i].unsubscribe;
			*qos = r->pending[i].qos;
		}
	return held;
}

/* Unsubscribes filter if it is not in the config and will be held. */
static void
relay_pending_drop_unwanted(struct relay *r, const struct store_subscription *known, size_t nknown,
    const char *filter)
{
	int mid, qos;

	for (size_t i = 0; i < r->cfg->nsubs; i++)
		if (strcmp(filter, r->cfg->subs[i].topic) == 0)
			return;
	if (!relay_pending_outcome(r, known, nknown, filter, &qos))
		return;
	/*
	 * RabbitMQ 3.10 answers UNSUBSCRIBE with UNSUBACK but keeps the
	 * binding when the filter was not subscribed on this connection
	 * (measured), so subscribe first; a retained replay that this
	 * brings is recorded and recognised like any other.
	 */
	if (mqtt_subscribe(r->mqtt, filter, qos, &mid) == 0)
		relay_pending_add(r, true, filter, 0);
}

static void
relay_report_if_settled(struct relay *r)
{
	if (r->npending == 0)
		log_info("subscriptions in place: %zu filters", r->cfg->nsubs);
}

/*
 * G8: a SUBSCRIBE makes the broker replay retained messages, so with a
 * session the broker kept we only send the difference to what it holds.
 * What it holds is what it confirmed (session_subscriptions) changed by the
 * requests still in flight: a reload within one round trip of the last one
 * must neither forget those nor lose their late answers.
 */
static void
relay_sync_subscriptions(struct relay *r, bool session_present)
{
	struct store_subscription *known = NULL;
	size_t nknown = 0, nsent;

	if (session_present && store_subscriptions_load(r->store, r->session_key, &known, &nknown) == -1) {
		log_warnx("%s; subscribing to every filter", store_errmsg(r->store));
		nknown = 0;
	}
	if (nknown == 0 && store_subscriptions_forget(r->store, r->session_key) == -1)
		log_warnx("%s", store_errmsg(r->store));
	for (size_t i = 0; i < r->cfg->nsubs; i++) {
		const struct config_subscription *s = &r->cfg->subs[i];
		int qos;
		if (!relay_pending_outcome(r, known, nknown, s->topic, &qos) || qos != s->qos)
			relay_pending_add(r, false, s->topic, (int)s->qos);
	}
	nsent = r->npending;	/* those added below are unsubscriptions */
	for (size_t j = 0; j < nknown; j++)
		relay_pending_drop_unwanted(r, known, nknown, known[j].filter);
	for (size_t i = 0; i < nsent; i++)
		if (!r->pending[i].unsubscribe)
			relay_pending_drop_unwanted(r, known, nknown, r->pending[i].filter);
	store_subscriptions_free(known, nknown);
	relay_report_if_settled(r);
}

/*
 * The messages an earlier connection may have left unacknowledged, as
 * candidates for this connection's redeliveries (dedup.h).
 * dedup.redelivery_window bounds how old one may be, on the age clock
 * (store.c), which wall-clock steps do not move; the rule needs no window.
 * A broker without our session (session-present = 0: a fresh one, one that
 * lost it, another endpoint sharing nothing) can resend none of them: they
 * are retired, and nothing is a redelivery on this connection.
 */
static int
relay_load_candidates(struct relay *r, bool session_present)
{
	struct dedup_candidate *cand = NULL;
	size_t n = 0;
	bool ids_kept = strcmp(r->cfg->broker.packet_ids, "kept") == 0 && mqtt_dup_readable(r->mqtt);

	if (!session_present ? store_unacked_retire(r->store) == -1 :
	    store_unacked_load(r->store, r->cfg->redelivery_window_ms, &cand, &n) == -1)
		return -1;
	if (dedup_connection_start(&r->dedup, ids_kept, cand, n) == -1) {
		log_errx("out of memory");
		return -1;
	}
	if (n)
		log_info("%zu messages of earlier connections may come again (packet ids %s)", n,
		    ids_kept ? "kept" : "renumbered");
	return 0;
}

/*
 * Subscriptions the broker confirmed under this session key prove that it
 * had a session for us; session-present = 0 then means the broker threw it
 * away (restart without persistence, expiry, a lost node), and with it what
 * it had queued. Nothing else would tell the operator.
 */
static void
relay_check_session(struct relay *r, bool session_present)
{
	struct store_subscription *known = NULL;
	size_t nknown = 0;

	r->session_lost_now = false;
	if (session_present)
		return;
	if (store_subscriptions_load(r->store, r->session_key, &known, &nknown) == -1) {
		log_warnx("%s", store_errmsg(r->store));
		return;
	}
	store_subscriptions_free(known, nknown);
	if (nknown == 0)
		return;
	r->session_lost++;
	r->session_lost_now = true;
	log_warnx("broker %s:%d has no session for %s although it held one with %zu subscriptions: "
	    "commands queued for us while we were away may be lost; subscribing again",
	    mqtt_endpoint(r->mqtt)->host, (int)mqtt_endpoint(r->mqtt)->port, r->cfg->broker.client_id, nknown);
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

static void
relay_on_subscribed(void *arg, int mid, bool granted)
{
	struct relay *r = arg;
	struct pending_sub p;

	if (relay_pending_take(r, mid, &p) == NULL)
		return;
	if (!granted)
		log_errx("broker refused the subscription to %s", p.filter);
	else if (store_subscription_set(r->store, p.filter, p.qos) == -1)
		log_warnx("%s", store_errmsg(r->store));
	free(p.filter);
	relay_report_if_settled(r);
}

static void
relay_on_unsubscribed(void *arg, int mid)
{
	struct relay *r = arg;
	struct pending_sub p;

	if (relay_pending_take(r, mid, &p) == NULL)
		return;
	if (store_subscription_del(r->store, p.filter) == -1)
		log_warnx("%s", store_errmsg(r->store));
	free(p.filter);
	relay_report_if_settled(r);
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
