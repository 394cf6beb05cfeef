/*
 * Getting and keeping a broker connection: CONNECT (MQTT 5, 3.1.1, or auto
 * with its fallback), CONNACK and what it says of the session, disconnects,
 * the reconnect backoff and failover across broker.hosts.
 */
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include <mosquitto.h>
#include <mqtt_protocol.h>

#include "log.h"
#include "mqtt_internal.h"

/* A connection that lasted this long resets the reconnect backoff (see on_disconnect). */
#define STABLE_CONNECTION_MS 10000
/*
 * How long a stop (reload, shutdown) blocks the loop to let the last PUBACKs
 * and the DISCONNECT out to a broker that reads slowly. What does not leave
 * in time the broker redelivers, and the dedup knows it (broker_unacked).
 */

/*
 * With several endpoints a lost or failed connection moves on to the next
 * (the same client id, so a clustered broker resumes the session); the
 * backoff runs across them, so a dead cluster is not hammered.
 */
static void
mqtt_fail_over(struct mqtt *m)
{
	const struct config_endpoint *from = mqtt_ep(m);

	if (m->cfg->broker.nhosts < 2)
		return;
	snprintf(m->left, sizeof(m->left), "%s:%d: %s", from->host, (int)from->port, m->last_error);
	m->endpoint = (m->endpoint + 1) % m->cfg->broker.nhosts;
	log_warnx("failing over from %s:%d to %s:%d: %s", from->host, (int)from->port, mqtt_ep(m)->host,
	    (int)mqtt_ep(m)->port, m->last_error);
}

/* Exponential backoff with jitter: a random delay in [d/2, d]. */
static uint64_t
mqtt_backoff_ms(struct mqtt *m)
{
	uint64_t d = (uint64_t)m->cfg->broker.reconnect_min_ms;
	uint32_t r = 0;

	for (unsigned i = 0; i < m->attempt && d < (uint64_t)m->cfg->broker.reconnect_max_ms; i++)
		d *= 2;
	if (d > (uint64_t)m->cfg->broker.reconnect_max_ms)
		d = (uint64_t)m->cfg->broker.reconnect_max_ms;
	if (getrandom(&r, sizeof(r), GRND_NONBLOCK) != sizeof(r))
		r = (uint32_t)rand();
	m->attempt++;
	return d / 2 + r % (d / 2 + 1);
}

static void
mqtt_schedule_reconnect(struct mqtt *m)
{
	uint64_t delay;

	/*
	 * Only a connection that lasted resets the backoff: one that fails
	 * right after CONNACK (the history cannot commit) must back off too.
	 */
	if (m->connected_at_ms && event_now_ms() - m->connected_at_ms >= STABLE_CONNECTION_MS)
		m->attempt = 0;
	m->connected_at_ms = 0;
	delay = mqtt_backoff_ms(m);
	mqtt_fail_over(m);

	m->state = MQTT_IDLE;
	log_info("reconnecting to %s:%d in %llu ms", mqtt_ep(m)->host,
	    (int)mqtt_ep(m)->port, (unsigned long long)delay);
	event_timer_arm(m->loop, &m->reconnect_timer, delay);
}

void
mqtt_on_connect(struct mosquitto *mosq, void *arg, int rc, int flags)
{
	struct mqtt *m = arg;

	(void)mosq;
	if (rc != 0) {
		mqtt_set_error(m, "broker refused the connection: %s", m->v5 ? mosquitto_reason_string(rc) :
		    mosquitto_connack_string(rc));
		m->refused = true;
		m->refused_rc = rc;
		log_errx("%s", m->last_error);
		return;		/* libmosquitto closes; on_disconnect follows */
	}
	m->state = MQTT_CONNECTED;
	m->connected_at_ms = event_now_ms();
	if (m->v311_retry && !m->v5_refused) {
		m->v5_refused = true;
		log_warnx("%s:%d refused MQTT 5 and took MQTT 3.1.1 (broker.protocol auto): using MQTT 3.1.1 "
		    "from now on, with the broker's own window", mqtt_ep(m)->host, (int)mqtt_ep(m)->port);
	}
	m->v311_retry = false;
	m->barrier_mid = 0;
	m->barrier_subscribed = false;
	m->last_error[0] = '\0';
	log_info("connected to %s:%d as %s (session present: %s)", mqtt_ep(m)->host,
	    (int)mqtt_ep(m)->port, m->cfg->broker.client_id, (flags & 1) ? "yes" : "no");
	m->h.connected(m->h.arg, flags & 1);
}

/* MQTT 5 says why in a reason code and maybe a reason string: log both. */
void
mqtt_log_reason(struct mqtt *m, const char *what, int rc, const mosquitto_property *props)
{
	char *reason = NULL;

	mosquitto_property_read_string(props, MQTT_PROP_REASON_STRING, &reason, false);
	if (rc != 0 || reason)
		log_warnx("%s:%d: %s: reason code %d (%s)%s%s", mqtt_ep(m)->host, (int)mqtt_ep(m)->port,
		    what, rc, mosquitto_reason_string(rc), reason ? ": " : "", reason ? reason : "");
	free(reason);
}

void
mqtt_on_connect_v5(struct mosquitto *mosq, void *arg, int rc, int flags, const mosquitto_property *props)
{
	struct mqtt *m = arg;
	uint16_t theirs = 65535;	/* absent: no limit but the packet ids' */

	(void)mosq;
	(void)flags;
	mqtt_log_reason(m, "CONNACK", rc, props);
	if (rc != 0 || !m->v5)
		return;
	mosquitto_property_read_int16(props, MQTT_PROP_RECEIVE_MAXIMUM, &theirs, false);
	log_info("MQTT 5: the broker sends us up to %d unacknowledged messages (broker.receive_maximum) "
	    "and takes up to %u from us (CONNACK Receive Maximum)", (int)m->cfg->broker.receive_maximum,
	    (unsigned)theirs);
}

/*
 * clean_start = 0 keeps an MQTT 5 session only for its expiry interval.
 * libmosquitto 2.0 has no asynchronous connect with properties, but keeps
 * those of a connect for every reconnect: a connect with port -1 stores
 * them (none for 3.1.1, which refuses any) and fails before it touches the
 * network.
 */
int
mqtt_set_protocol(struct mqtt *m, bool v5)
{
	mosquitto_property *props = NULL;
	int rc = MOSQ_ERR_SUCCESS;

	m->v5 = v5;
	mosquitto_int_option(m->mosq, MOSQ_OPT_PROTOCOL_VERSION, v5 ? MQTT_PROTOCOL_V5 : MQTT_PROTOCOL_V311);
	if (v5)
		rc = mosquitto_property_add_int32(&props, MQTT_PROP_SESSION_EXPIRY_INTERVAL,
		    (uint32_t)(m->cfg->broker.session_expiry_ms / 1000));
	if (rc == MOSQ_ERR_SUCCESS)
		rc = mosquitto_connect_bind_v5(m->mosq, m->cfg->broker.host, -1, (int)m->cfg->broker.keepalive,
		    NULL, props);
	mosquitto_property_free_all(&props);
	return rc == MOSQ_ERR_INVAL ? MOSQ_ERR_SUCCESS : rc;
}

/*
 * broker.protocol auto: a broker without MQTT 5 (RabbitMQ 3.10) closes the
 * connection on its CONNECT without a CONNACK (measured), or answers with
 * "unsupported protocol version". Then 3.1.1 is tried at once, on the same
 * endpoint, with the same client id and clean_session = 0: the same
 * durable session. Only a 3.1.1 CONNACK settles it; a failed retry goes
 * back to MQTT 5 with the usual backoff, so a dead broker is not taken for
 * one without MQTT 5.
 */
static bool
mqtt_try_v311_now(struct mqtt *m, int rc)
{
	/* A 3.1.1-only broker's CONNACK (return code 1) does not parse as MQTT 5. */
	bool refused_v5 = m->refused ? rc == MQTT_RC_UNSUPPORTED_PROTOCOL_VERSION :
	    rc == MOSQ_ERR_CONN_LOST || rc == MOSQ_ERR_MALFORMED_PACKET || rc == MOSQ_ERR_PROTOCOL;

	if (!m->proto_auto || m->v5_refused || m->state != MQTT_CONNECTING)
		return false;
	if (!m->v5 || !refused_v5) {
		m->v311_retry = false;
		if (!m->v5 && mqtt_set_protocol(m, true) != MOSQ_ERR_SUCCESS)
			log_warnx("MQTT 5 again: out of memory; staying with MQTT 3.1.1");
		return false;
	}
	log_info("%s:%d: no CONNACK to MQTT 5 (%s); trying MQTT 3.1.1 with the same session (broker.protocol auto)",
	    mqtt_ep(m)->host, (int)mqtt_ep(m)->port, m->last_error);
	if (mqtt_set_protocol(m, false) != MOSQ_ERR_SUCCESS)
		return false;
	m->v311_retry = true;
	m->state = MQTT_IDLE;
	event_timer_arm(m->loop, &m->reconnect_timer, 0);
	return true;
}

void
mqtt_on_disconnect_v5(struct mosquitto *mosq, void *arg, int rc, const mosquitto_property *props)
{
	(void)mosq;
	/* Without a DISCONNECT from the broker rc is libmosquitto's error, logged by on_disconnect. */
	if (rc >= MQTT_RC_UNSPECIFIED || props)
		mqtt_log_reason(arg, "DISCONNECT", rc, props);
}

void
mqtt_on_disconnect(struct mosquitto *mosq, void *arg, int rc)
{
	struct mqtt *m = arg;
	const char *why = rc == 0 ? "disconnected" : m->lib_error[0] ? m->lib_error : mosquitto_strerror(rc);

	(void)mosq;
	if (m->state == MQTT_STOPPED)
		return;
	/*
	 * A connection we dropped ourselves keeps the reason we gave, a refused
	 * one the broker's; any other loss is new news, also while connecting.
	 */
	if (!m->dropping && !m->refused)
		mqtt_set_error(m, "connection lost: %s", why);
	log_warnx("%s:%d: %s", mqtt_ep(m)->host, (int)mqtt_ep(m)->port, m->last_error);
	if (mqtt_try_v311_now(m, m->refused ? m->refused_rc : rc))
		return;
	mqtt_schedule_reconnect(m);
	m->h.disconnected(m->h.arg, m->last_error);
}

/* A connect that failed, in libmosquitto's words if it had any, then the next try. */
static void
mqtt_connect_failed(struct mqtt *m, int rc)
{
	if (m->lib_error[0])
		mqtt_set_error(m, "cannot connect: %s", m->lib_error);
	else
		mqtt_set_error(m, "cannot connect: %s", rc == MOSQ_ERR_ERRNO ? strerror(errno) :
		    mosquitto_strerror(rc));
	log_warnx("%s:%d: %s", mqtt_ep(m)->host, (int)mqtt_ep(m)->port, m->last_error);
	mqtt_schedule_reconnect(m);
	m->h.disconnected(m->h.arg, m->last_error);
}

/*
 * libmosquitto closes the socket of a failed TLS handshake itself and
 * calls no disconnect callback; without this the relay would wait forever.
 */
void
mqtt_check_connect_failed(struct mqtt *m, int rc)
{
	if (m->state == MQTT_CONNECTING && mosquitto_socket(m->mosq) < 0)
		mqtt_connect_failed(m, rc);
}

void
mqtt_on_reconnect_timer(void *arg)
{
	struct mqtt *m = arg;
	int rc;

	m->state = MQTT_CONNECTING;
	m->lib_error[0] = '\0';
	m->refused = false;
	if (m->started && m->connect_endpoint == m->endpoint)
		rc = mosquitto_reconnect_async(m->mosq);
	else
		rc = mosquitto_connect_async(m->mosq, mqtt_ep(m)->host, (int)mqtt_ep(m)->port,
		    (int)m->cfg->broker.keepalive);
	if (rc == MOSQ_ERR_SUCCESS) {
		m->started = true;
		m->connect_endpoint = m->endpoint;
		return;
	}
	mqtt_connect_failed(m, rc);
}


bool
mqtt_same_broker(const struct config *a, const struct config *b)
{
	const char *const sa[] = { a->broker.host, a->broker.client_id, a->broker.barrier_topic, a->broker.username,
		a->broker.password, a->broker.tls_ca_file, a->broker.tls_cert_file, a->broker.tls_key_file };
	const char *const sb[] = { b->broker.host, b->broker.client_id, b->broker.barrier_topic, b->broker.username,
		b->broker.password, b->broker.tls_ca_file, b->broker.tls_cert_file, b->broker.tls_key_file };

	for (size_t i = 0; i < sizeof(sa) / sizeof(sa[0]); i++)
		if ((sa[i] == NULL) != (sb[i] == NULL) || (sa[i] && strcmp(sa[i], sb[i]) != 0))
			return false;
	if (a->broker.nhosts != b->broker.nhosts)
		return false;
	for (size_t i = 0; i < a->broker.nhosts; i++)
		if (strcmp(a->broker.hosts[i].host, b->broker.hosts[i].host) != 0 ||
		    a->broker.hosts[i].port != b->broker.hosts[i].port)
			return false;
	return a->broker.port == b->broker.port && a->broker.keepalive == b->broker.keepalive &&
	    strcmp(a->broker.protocol, b->broker.protocol) == 0 &&
	    a->broker.session_expiry_ms == b->broker.session_expiry_ms &&
	    a->broker.receive_maximum == b->broker.receive_maximum;
}
