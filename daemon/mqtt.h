/*
 * The broker connection: libmosquitto driven by our event loop, with
 * PUBACKs held back until the caller has committed what it read (G1).
 */
#ifndef CMDRELAY_MQTT_H
#define CMDRELAY_MQTT_H

#include <stdbool.h>
#include <stddef.h>

#include "config.h"
#include "dedup.h"
#include "event.h"

/*
 * At most this many mosquitto_loop_read() calls go into one read pass, and
 * so into one transaction. Each call reads one packet and one more per
 * message libmosquitto holds in flight (lib/loop.c ignores max_packets):
 * with uplink publications outstanding, a pass may hold more packets.
 */
#define MQTT_MAX_BATCH 1024

struct mqtt;

struct mqtt_handler {
	void (*connected)(void *arg, bool session_present);
	void (*disconnected)(void *arg, const char *why);
	/*
	 * Before a read pass: 0 to read (a transaction may be open: commit or
	 * abort follows the pass, messages or not), -1 while the history is
	 * locked by another writer: nothing is read, so nothing waits for a
	 * PUBACK, and the pass is tried again from a timer.
	 */
	int (*ready)(void *arg);
	/* One PUBLISH of the current read pass; -1 fails the pass. */
	int (*message)(void *arg, const struct delivery *d);
	/*
	 * End of a read pass that delivered messages: commit them. The PUBACKs
	 * leave only after it returned 0; on -1 the connection is dropped
	 * without them, so the broker keeps and redelivers the messages.
	 */
	int (*commit)(void *arg);
	/* The pass failed: discard what message() staged. */
	void (*abort)(void *arg);
	void (*subscribed)(void *arg, int mid, bool granted);
	void (*unsubscribed)(void *arg, int mid);
	/*
	 * The broker answered mqtt_barrier(): it has received every packet,
	 * PUBACKs included, that we sent on this connection before it.
	 */
	void (*barrier)(void *arg);
	/* A publication of ours is done: PUBACK (QoS 1) or written (QoS 0). */
	void (*published)(void *arg, int mid);
	void *arg;
};

/* Checks that the running libmosquitto is one whose DUP flag we can read. */
int mqtt_library_check(char *err, size_t errlen);
/* False once a PUBLISH came whose DUP flag libmosquitto did not tell. */
bool mqtt_dup_readable(const struct mqtt *m);

struct mqtt *mqtt_new(struct event_loop *loop, const struct config *cfg,
    const struct mqtt_handler *handler, char *err, size_t errlen);
void mqtt_free(struct mqtt *m);

void mqtt_start(struct mqtt *m);
/* A reloaded config that mqtt_same_broker() says needs no new connection. */
void mqtt_set_config(struct mqtt *m, const struct config *cfg);
bool mqtt_same_broker(const struct config *a, const struct config *b);
/* Sends DISCONNECT and what is queued; returns when written or failed. */
void mqtt_stop(struct mqtt *m);
bool mqtt_is_connected(const struct mqtt *m);
const char *mqtt_last_error(const struct mqtt *m);
/* "mqttv5" or "mqttv311": the protocol of the connection, or of the next attempt. */
const char *mqtt_protocol(const struct mqtt *m);
/* The broker.hosts entry in use, or tried next while disconnected. */
const struct config_endpoint *mqtt_endpoint(const struct mqtt *m);
/* "host:port: why" of the endpoint last failed over from; "" if none. */
const char *mqtt_left(const struct mqtt *m);

/*
 * From a handler callback: close the connection without the queued PUBACKs
 * once the current read pass ends; why stays the last error.
 */
void mqtt_abort(struct mqtt *m, const char *why);
int mqtt_subscribe(struct mqtt *m, const char *filter, int qos, int *mid);
int mqtt_unsubscribe(struct mqtt *m, const char *filter, int *mid);
/* Asks the broker for a barrier; -1 when not connected or one is in flight. */
int mqtt_barrier(struct mqtt *m);
enum mqtt_publish_result {
	MQTT_PUBLISH_OK,
	MQTT_PUBLISH_LATER,	/* not now (no connection, no memory) */
	MQTT_PUBLISH_NEVER,	/* libmosquitto refuses this message */
};
enum mqtt_publish_result mqtt_publish(struct mqtt *m, const char *topic, const void *payload,
    size_t len, int qos, bool retain, int *mid);

#endif
