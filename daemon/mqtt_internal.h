/*
 * What the files of the mqtt module share: mqtt.c (the libmosquitto object,
 * the read pass, deliveries, subscriptions, the barrier, publishing) and
 * mqtt_connect.c (connecting, CONNACK, the protocol and its fallback,
 * disconnects, backoff and failover). Nothing else includes it.
 */
#ifndef CMDRELAY_MQTT_INTERNAL_H
#define CMDRELAY_MQTT_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <mosquitto.h>

#include "config.h"
#include "event.h"
#include "mqtt.h"

enum mqtt_state {
	MQTT_IDLE,		/* waiting for the reconnect timer */
	MQTT_CONNECTING,	/* TCP and CONNECT under way */
	MQTT_CONNECTED,		/* CONNACK accepted */
	MQTT_STOPPED,
};

struct mqtt {
	struct mosquitto *mosq;
	bool v5;		/* the protocol of this connection or attempt */
	bool proto_auto;	/* broker.protocol auto: MQTT 5, else 3.1.1 */
	bool v311_retry;	/* this attempt follows a refused MQTT 5 CONNECT */
	bool v5_refused;	/* auto settled on 3.1.1 for this process */
	struct event_loop *loop;
	const struct config *cfg;
	struct mqtt_handler h;
	enum mqtt_state state;
	bool started;		/* mosquitto_connect_async succeeded once */
	int watched_fd;
	unsigned attempt;	/* connects since the last one that lasted */
	uint64_t connected_at_ms;	/* of the current connection; 0: none */
	struct event_timer reconnect_timer;
	struct event_timer misc_timer;
	struct event_timer storage_timer;	/* a refused read pass is tried again */
	uint64_t storage_retry_ms;	/* its delay now; 0: reading */
	size_t batch_messages;
	bool batch_failed;
	bool dropping;		/* closing unacknowledged: ignore what is still read */
	bool refused;		/* this attempt's CONNACK said no: last_error says why */
	int refused_rc;		/* and its return or reason code */
	char publish_log_prefix[300];	/* "Client <client_id>" */
	struct {
		bool valid;
		int dup, qos, retain, mid;
	} logged;		/* the fields of the last PUBLISH libmosquitto logged */
	bool dup_unreadable;	/* a PUBLISH came without its log line */
	int barrier_mid;	/* the barrier request in flight; 0: none */
	bool barrier_subscribed;	/* on this connection: the next barrier unsubscribes */
	const char *abort_reason;	/* drop the connection when the read pass ends */
	char last_error[256];
	char lib_error[256];	/* libmosquitto's last error or warning message */
	size_t endpoint;	/* broker.hosts[]: the one in use or tried next */
	size_t connect_endpoint;	/* the one libmosquitto was last given */
	char left[512];		/* "host:port: why" of the endpoint last failed over from */
};

/* mqtt.c */
const struct config_endpoint *mqtt_ep(const struct mqtt *m);
void mqtt_set_error(struct mqtt *m, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* mqtt_connect.c */
void mqtt_check_connect_failed(struct mqtt *m, int rc);
void mqtt_log_reason(struct mqtt *m, const char *what, int rc, const mosquitto_property *props);
int mqtt_set_protocol(struct mqtt *m, bool v5);
void mqtt_on_connect(struct mosquitto *mosq, void *arg, int rc, int flags);
void mqtt_on_connect_v5(struct mosquitto *mosq, void *arg, int rc, int flags, const mosquitto_property *props);
void mqtt_on_disconnect(struct mosquitto *mosq, void *arg, int rc);
void mqtt_on_disconnect_v5(struct mosquitto *mosq, void *arg, int rc, const mosquitto_property *props);
void mqtt_on_reconnect_timer(void *arg);

#endif
