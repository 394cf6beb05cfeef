/*
 * The broker session: which filters it holds (SUBSCRIBE/UNSUBSCRIBE against
 * the config, G8), the messages it may redeliver, and whether it was lost.
 */
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "relay_internal.h"

void
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
void
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
int
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
void
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

void
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

void
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
