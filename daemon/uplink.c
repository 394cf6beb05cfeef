#include "uplink.h"

#include <inttypes.h>
#include <stdbool.h>
#include <stdlib.h>

#include "log.h"

struct handed {
	int mid;
	int64_t id;
};

struct uplink {
	struct store *store;
	struct mqtt *mqtt;
	bool connected;
	bool stalled;		/* a hand-over failed for now: wait for the next event */
	int64_t cursor;		/* the last outbox id handed to this connection object */
	struct handed inflight[UPLINK_WINDOW];
	size_t ninflight;
	uint64_t handed_total, sent_total;
};

struct uplink *
uplink_new(struct store *st)
{
	struct uplink *u = calloc(1, sizeof(*u));

	if (u)
		u->store = st;
	return u;
}

void
uplink_free(struct uplink *u)
{
	free(u);
}

void
uplink_attach(struct uplink *u, struct mqtt *m)
{
	/*
	 * libmosquitto re-sends what it was handed after a reconnect of the
	 * same object; a new object (or process) starts from the oldest queued
	 * row, so a publication may reach the broker twice, never not at all.
	 */
	u->mqtt = m;
	u->connected = false;
	u->cursor = 0;
	u->ninflight = 0;
}

static void
uplink_mark_sent(struct uplink *u, int64_t id)
{
	if (store_outbox_sent(u->store, id) == -1)
		log_warnx("uplink: #%" PRId64 " was sent but not marked: %s", id, store_errmsg(u->store));
	u->sent_total++;
}

static int
uplink_send_next(const struct outbox_msg *msg, void *arg)
{
	struct uplink *u = arg;
	int mid;

	/*
	 * libmosquitto writes QoS 0 at once but holds QoS 1 beyond its
	 * in-flight limit (the broker's Receive Maximum in MQTT 5), so a QoS 0
	 * handed over now could overtake them: it waits for their PUBACKs.
	 */
	if (msg->qos == 0 && u->ninflight > 0) {
		u->stalled = true;
		return -1;
	}
	switch (mqtt_publish(u->mqtt, msg->topic, msg->payload, msg->payloadlen, msg->qos, msg->retain,
	    &mid)) {
	case MQTT_PUBLISH_LATER:
		u->stalled = true;
		return -1;
	case MQTT_PUBLISH_NEVER:
		/* It can never go out; it must not hold up the rows behind it. */
		log_errx("uplink: outbox #%" PRId64 " to %s cannot be published; marked failed",
		    msg->id, msg->topic);
		u->cursor = msg->id;
		if (store_outbox_failed(u->store, msg->id) == -1)
			log_warnx("uplink: %s", store_errmsg(u->store));
		return 0;
	case MQTT_PUBLISH_OK:
		break;
	}
	u->cursor = msg->id;
	u->handed_total++;
	if (store_outbox_handed(u->store, msg->id) == -1)
		log_warnx("uplink: %s", store_errmsg(u->store));
	/* QoS 0 is at most once: handed over is as sent as it gets. */
	if (msg->qos == 0)
		uplink_mark_sent(u, msg->id);
	else
		u->inflight[u->ninflight++] = (struct handed){ mid, msg->id };
	return u->ninflight < UPLINK_WINDOW ? 0 : -1;
}

void
uplink_kick(struct uplink *u)
{
	int n;

	u->stalled = false;
	while (u->connected && !u->stalled && u->ninflight < UPLINK_WINDOW) {
		int want = (int)(UPLINK_WINDOW - u->ninflight);
		if ((n = store_outbox_next(u->store, u->cursor, want, uplink_send_next, u)) < 0)
			log_warnx("uplink: %s", store_errmsg(u->store));
		if (n < want)
			break;
	}
}

void
uplink_connected(struct uplink *u)
{
	u->connected = true;
	uplink_kick(u);
}

void
uplink_disconnected(struct uplink *u)
{
	u->connected = false;
}

void
uplink_published(struct uplink *u, int mid)
{
	for (size_t i = 0; i < u->ninflight; i++) {
		if (u->inflight[i].mid != mid)
			continue;
		uplink_mark_sent(u, u->inflight[i].id);
		u->inflight[i] = u->inflight[--u->ninflight];
		uplink_kick(u);
		return;
	}
}

void
uplink_stats(const struct uplink *u, json_t *obj)
{
	json_object_set_new(obj, "uplink", json_pack("{s:I, s:I, s:I}",
	    "handed", (json_int_t)u->handed_total, "sent", (json_int_t)u->sent_total,
	    "in_flight", (json_int_t)u->ninflight));
}
