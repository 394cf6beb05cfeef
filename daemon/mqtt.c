#include "mqtt.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>

#include <mosquitto.h>
#include <mqtt_protocol.h>

#include "log.h"

/*
 * The DUP flag of an incoming PUBLISH is in no public API of libmosquitto.
 * Its read path logs every PUBLISH, on our thread, right before on_message:
 * "Client <id> received PUBLISH (d<dup>, q<qos>, r<retain>, m<mid>, '<topic>', ..."
 * (lib/handle_publish.c, the same in 2.0.11 and 2.1.2). on_log keeps the
 * fields and on_message takes them when qos, retain and mid agree. A PUBLISH
 * without its line (another libmosquitto) is taken as DUP=1 and the
 * packet-id proof is given up (mqtt_dup_readable()): flagged, never dropped.
 */
#define PUBLISH_LOG_FORMAT " received PUBLISH (d%d, q%d, r%d, m%d, "

/* A connection that lasted this long resets the reconnect backoff (see on_disconnect). */
#define STABLE_CONNECTION_MS 10000
/*
 * How long a stop (reload, shutdown) blocks the loop to let the last PUBACKs
 * and the DISCONNECT out to a broker that reads slowly. What does not leave
 * in time the broker redelivers, and the dedup knows it (broker_unacked).
 */
#define MQTT_STOP_FLUSH_MS 1000
/*
 * Between read passes refused by a locked history: each try may wait out
 * the history's busy_timeout (100 ms), so the loop stays mostly free.
 */
#define STORAGE_RETRY_MIN_MS 50
#define STORAGE_RETRY_MAX_MS 1000

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

int
mqtt_library_check(char *err, size_t errlen)
{
	int major, minor, revision;

	/* 2.0 and 2.1 share the soname, the callbacks and the PUBLISH log line. */
	mosquitto_lib_version(&major, &minor, &revision);
	if (major != 2 || minor > 1) {
		snprintf(err, errlen, "libmosquitto %d.%d.%d is not supported: cmdrelayd needs "
		    "libmosquitto 2.0 or 2.1", major, minor, revision);
		return -1;
	}
	return 0;
}

bool
mqtt_dup_readable(const struct mqtt *m)
{
	return !m->dup_unreadable;
}

static void __attribute__((format(printf, 2, 3)))
set_error(struct mqtt *m, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(m->last_error, sizeof(m->last_error), fmt, ap);
	va_end(ap);
}

const char *
mqtt_protocol(const struct mqtt *m)
{
	return m->v5 ? "mqttv5" : "mqttv311";
}

const char *
mqtt_last_error(const struct mqtt *m)
{
	return m->last_error;
}

bool
mqtt_is_connected(const struct mqtt *m)
{
	return m->state == MQTT_CONNECTED;
}

static const struct config_endpoint *
ep(const struct mqtt *m)
{
	return &m->cfg->broker.hosts[m->endpoint];
}

const struct config_endpoint *
mqtt_endpoint(const struct mqtt *m)
{
	return ep(m);
}

const char *
mqtt_left(const struct mqtt *m)
{
	return m->left;
}

/*
 * With several endpoints a lost or failed connection moves on to the next
 * (the same client id, so a clustered broker resumes the session); the
 * backoff runs across them, so a dead cluster is not hammered.
 */
static void
fail_over(struct mqtt *m)
{
	const struct config_endpoint *from = ep(m);

	if (m->cfg->broker.nhosts < 2)
		return;
	snprintf(m->left, sizeof(m->left), "%s:%d: %s", from->host, (int)from->port, m->last_error);
	m->endpoint = (m->endpoint + 1) % m->cfg->broker.nhosts;
	log_warnx("failing over from %s:%d to %s:%d: %s", from->host, (int)from->port, ep(m)->host,
	    (int)ep(m)->port, m->last_error);
}

/* Exponential backoff with jitter: a random delay in [d/2, d]. */
static uint64_t
backoff_ms(struct mqtt *m)
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
schedule_reconnect(struct mqtt *m)
{
	uint64_t delay;

	/*
	 * Only a connection that lasted resets the backoff: one that fails
	 * right after CONNACK (the history cannot commit) must back off too.
	 */
	if (m->connected_at_ms && event_now_ms() - m->connected_at_ms >= STABLE_CONNECTION_MS)
		m->attempt = 0;
	m->connected_at_ms = 0;
	delay = backoff_ms(m);
	fail_over(m);

	m->state = MQTT_IDLE;
	log_info("reconnecting to %s:%d in %llu ms", ep(m)->host,
	    (int)ep(m)->port, (unsigned long long)delay);
	event_timer_arm(m->loop, &m->reconnect_timer, delay);
}

static void
on_connect(struct mosquitto *mosq, void *arg, int rc, int flags)
{
	struct mqtt *m = arg;

	(void)mosq;
	if (rc != 0) {
		set_error(m, "broker refused the connection: %s", m->v5 ? mosquitto_reason_string(rc) :
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
		    "from now on, with the broker's own window", ep(m)->host, (int)ep(m)->port);
	}
	m->v311_retry = false;
	m->barrier_mid = 0;
	m->barrier_subscribed = false;
	m->last_error[0] = '\0';
	log_info("connected to %s:%d as %s (session present: %s)", ep(m)->host,
	    (int)ep(m)->port, m->cfg->broker.client_id, (flags & 1) ? "yes" : "no");
	m->h.connected(m->h.arg, flags & 1);
}

/* MQTT 5 says why in a reason code and maybe a reason string: log both. */
static void
log_reason(struct mqtt *m, const char *what, int rc, const mosquitto_property *props)
{
	char *reason = NULL;

	mosquitto_property_read_string(props, MQTT_PROP_REASON_STRING, &reason, false);
	if (rc != 0 || reason)
		log_warnx("%s:%d: %s: reason code %d (%s)%s%s", ep(m)->host, (int)ep(m)->port,
		    what, rc, mosquitto_reason_string(rc), reason ? ": " : "", reason ? reason : "");
	free(reason);
}

static void
on_connect_v5(struct mosquitto *mosq, void *arg, int rc, int flags, const mosquitto_property *props)
{
	struct mqtt *m = arg;
	uint16_t theirs = 65535;	/* absent: no limit but the packet ids' */

	(void)mosq;
	(void)flags;
	log_reason(m, "CONNACK", rc, props);
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
static int
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
	    ep(m)->host, (int)ep(m)->port, m->last_error);
	if (mqtt_set_protocol(m, false) != MOSQ_ERR_SUCCESS)
		return false;
	m->v311_retry = true;
	m->state = MQTT_IDLE;
	event_timer_arm(m->loop, &m->reconnect_timer, 0);
	return true;
}

static void
on_disconnect_v5(struct mosquitto *mosq, void *arg, int rc, const mosquitto_property *props)
{
	(void)mosq;
	/* Without a DISCONNECT from the broker rc is libmosquitto's error, logged by on_disconnect. */
	if (rc >= MQTT_RC_UNSPECIFIED || props)
		log_reason(arg, "DISCONNECT", rc, props);
}

static void
on_subscribe_v5(struct mosquitto *mosq, void *arg, int mid, int count, const int *granted,
    const mosquitto_property *props)
{
	(void)mosq;
	(void)mid;
	for (int i = 0; i < count; i++)
		log_reason(arg, "SUBACK", granted[i] >= 0x80 ? granted[i] : 0, props);
}

static void
on_disconnect(struct mosquitto *mosq, void *arg, int rc)
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
		set_error(m, "connection lost: %s", why);
	log_warnx("%s:%d: %s", ep(m)->host, (int)ep(m)->port, m->last_error);
	if (mqtt_try_v311_now(m, m->refused ? m->refused_rc : rc))
		return;
	schedule_reconnect(m);
	m->h.disconnected(m->h.arg, m->last_error);
}

/* DUP as libmosquitto logged it just before calling on_message. */
static bool
publish_dup(struct mqtt *m, const struct mosquitto_message *msg)
{
	bool fits = m->logged.valid && m->logged.qos == msg->qos &&
	    m->logged.retain == (int)msg->retain && m->logged.mid == msg->mid;

	m->logged.valid = false;
	if (fits)
		return m->logged.dup != 0;
	if (!m->dup_unreadable)
		log_errx("libmosquitto did not log a PUBLISH it delivered: the DUP flag is unknown; "
		    "every repeat is now accepted and flagged possible_repeat");
	m->dup_unreadable = true;
	return true;
}

static void
on_message(struct mosquitto *mosq, void *arg, const struct mosquitto_message *msg)
{
	struct mqtt *m = arg;
	struct delivery d = {
		.topic = msg->topic,
		.payload = msg->payload,
		.payloadlen = (size_t)msg->payloadlen,
		.qos = msg->qos,
		.retain = msg->retain,
		.dup = publish_dup(m, msg),
		.mid = msg->qos > 0 ? msg->mid : 0,
		.received_at_ms = (int64_t)event_wall_ms(),
	};

	(void)mosq;
	if (m->batch_failed || m->dropping)
		return;
	m->batch_messages++;
	if (m->h.message(m->h.arg, &d) == -1)
		m->batch_failed = true;
}

/* True for the answer to the barrier in flight, which is then done. */
static bool
barrier_answered(struct mqtt *m, int mid)
{
	if (m->barrier_mid == 0 || mid != m->barrier_mid)
		return false;
	m->barrier_mid = 0;
	m->h.barrier(m->h.arg);
	return true;
}

static void
on_subscribe(struct mosquitto *mosq, void *arg, int mid, int count, const int *granted)
{
	struct mqtt *m = arg;

	(void)mosq;
	if (barrier_answered(m, mid))
		return;
	m->h.subscribed(m->h.arg, mid, count > 0 && granted[0] >= 0 && granted[0] <= 2);
}

static void
on_unsubscribe(struct mosquitto *mosq, void *arg, int mid)
{
	struct mqtt *m = arg;

	(void)mosq;
	if (barrier_answered(m, mid))
		return;
	m->h.unsubscribed(m->h.arg, mid);
}

static void
on_publish(struct mosquitto *mosq, void *arg, int mid)
{
	struct mqtt *m = arg;

	(void)mosq;
	m->h.published(m->h.arg, mid);
}

static bool
socket_has_data(int fd)
{
	int n = 0;

	return ioctl(fd, FIONREAD, &n) == 0 && n > 0;
}

/*
 * Closes the connection without sending what libmosquitto has queued (the
 * PUBACKs of uncommitted messages): after shutdown() nothing more leaves,
 * and the next read sees the end and runs the normal loss path.
 */
static void
drop_connection(struct mqtt *m, const char *why)
{
	int fd = mosquitto_socket(m->mosq);

	set_error(m, "%s", why);
	if (fd < 0)
		return;
	m->dropping = true;
	shutdown(fd, SHUT_RDWR);
	for (int i = 0; i < MQTT_MAX_BATCH && mosquitto_socket(m->mosq) >= 0; i++)
		mosquitto_loop_read(m->mosq, 1);
	m->dropping = false;
}

static int
read_pass(struct mqtt *m)
{
	int fd = mosquitto_socket(m->mosq), rc = MOSQ_ERR_SUCCESS;

	m->batch_messages = 0;
	m->batch_failed = false;
	if (m->h.ready(m->h.arg) == -1) {
		/* The socket is not watched meanwhile (before_sleep): its data waits in the kernel. */
		m->storage_retry_ms = m->storage_retry_ms ? m->storage_retry_ms * 2 : STORAGE_RETRY_MIN_MS;
		if (m->storage_retry_ms > STORAGE_RETRY_MAX_MS)
			m->storage_retry_ms = STORAGE_RETRY_MAX_MS;
		event_timer_arm(m->loop, &m->storage_timer, m->storage_retry_ms);
		return MOSQ_ERR_SUCCESS;
	}
	m->storage_retry_ms = 0;
	for (size_t i = 0; i < MQTT_MAX_BATCH; i++) {
		if ((rc = mosquitto_loop_read(m->mosq, 1)) != MOSQ_ERR_SUCCESS ||
		    mosquitto_socket(m->mosq) != fd || !socket_has_data(fd))
			break;
	}
	if (m->abort_reason) {
		const char *why = m->abort_reason;
		m->abort_reason = NULL;
		m->h.abort(m->h.arg);
		drop_connection(m, why);
		return rc;
	}
	if (m->batch_failed) {
		m->h.abort(m->h.arg);
		drop_connection(m, "could not store a message; dropped the connection unacknowledged");
	} else if (m->h.commit(m->h.arg) == -1) {
		drop_connection(m, "could not commit to the history; dropped the connection unacknowledged");
	}
	return rc;
}

/* A connect that failed, in libmosquitto's words if it had any, then the next try. */
static void
connect_failed(struct mqtt *m, int rc)
{
	if (m->lib_error[0])
		set_error(m, "cannot connect: %s", m->lib_error);
	else
		set_error(m, "cannot connect: %s", rc == MOSQ_ERR_ERRNO ? strerror(errno) :
		    mosquitto_strerror(rc));
	log_warnx("%s:%d: %s", ep(m)->host, (int)ep(m)->port, m->last_error);
	schedule_reconnect(m);
	m->h.disconnected(m->h.arg, m->last_error);
}

/*
 * libmosquitto closes the socket of a failed TLS handshake itself and
 * calls no disconnect callback; without this the relay would wait forever.
 */
static void
check_connect_failed(struct mqtt *m, int rc)
{
	if (m->state == MQTT_CONNECTING && mosquitto_socket(m->mosq) < 0)
		connect_failed(m, rc);
}

static void
on_io(int fd, short revents, void *arg)
{
	struct mqtt *m = arg;
	int rc = MOSQ_ERR_SUCCESS;

	(void)fd;
	if (revents & (POLLIN | POLLHUP | POLLERR))
		rc = read_pass(m);
	if (mosquitto_socket(m->mosq) >= 0 && mosquitto_want_write(m->mosq))
		rc = mosquitto_loop_write(m->mosq, 1);
	check_connect_failed(m, rc);
}

/* libmosquitto's own errors (TLS, certificates) name the cause: keep the last. */
static void
on_log(struct mosquitto *mosq, void *arg, int level, const char *text)
{
	struct mqtt *m = arg;

	(void)mosq;
	if (level == MOSQ_LOG_DEBUG) {
		size_t n = strlen(m->publish_log_prefix);
		/* Other lines (the PUBACK it queues) come between; they change nothing. */
		if (strncmp(text, m->publish_log_prefix, n) == 0 &&
		    sscanf(text + n, PUBLISH_LOG_FORMAT, &m->logged.dup, &m->logged.qos,
		    &m->logged.retain, &m->logged.mid) == 4)
			m->logged.valid = true;
		return;
	}
	if (level & (MOSQ_LOG_ERR | MOSQ_LOG_WARNING)) {
		static const char own[] = "Error: ";	/* how libmosquitto's own messages begin */
		size_t len, used = 0;

		log_debug("libmosquitto: %s", text);
		if (strncmp(text, own, sizeof(own) - 1) == 0)
			text += sizeof(own) - 1;
		len = strcspn(text, "\n");
		if (len > 0 && text[len - 1] == '.')
			len--;
		/*
		 * While connecting every one: the first says why (its own "host
		 * name verification failed"), OpenSSL's after it only "certificate
		 * verify failed". Later the last one is the news.
		 */
		if (m->state == MQTT_CONNECTING && m->lib_error[0])
			used = strlen(m->lib_error);
		snprintf(m->lib_error + used, sizeof(m->lib_error) - used, "%s%.*s", used ? "; " : "",
		    (int)len, text);
	}
}

/* Keeps the event loop watching whatever socket libmosquitto has now. */
static void
before_sleep(void *arg)
{
	struct mqtt *m = arg;
	int fd = mosquitto_socket(m->mosq);

	if (m->storage_timer.due_ms)
		fd = -1;	/* waiting for the history: not even POLLHUP, which would spin */
	if (fd != m->watched_fd && m->watched_fd >= 0)
		event_io_del(m->loop, m->watched_fd);
	m->watched_fd = fd;
	if (fd >= 0)
		event_io_set(m->loop, fd, POLLIN | (mosquitto_want_write(m->mosq) ? POLLOUT : 0),
		    on_io, m);
}

static void
on_misc_timer(void *arg)
{
	struct mqtt *m = arg;

	if (mosquitto_socket(m->mosq) >= 0)
		mosquitto_loop_misc(m->mosq);
	event_timer_arm(m->loop, &m->misc_timer, 1000);
}

/* before_sleep watches the socket again: a pass is tried when it is readable. */
static void
on_storage_timer(void *arg)
{
	(void)arg;
}

static void
on_reconnect_timer(void *arg)
{
	struct mqtt *m = arg;
	int rc;

	m->state = MQTT_CONNECTING;
	m->lib_error[0] = '\0';
	m->refused = false;
	if (m->started && m->connect_endpoint == m->endpoint)
		rc = mosquitto_reconnect_async(m->mosq);
	else
		rc = mosquitto_connect_async(m->mosq, ep(m)->host, (int)ep(m)->port,
		    (int)m->cfg->broker.keepalive);
	if (rc == MOSQ_ERR_SUCCESS) {
		m->started = true;
		m->connect_endpoint = m->endpoint;
		return;
	}
	connect_failed(m, rc);
}

static int
configure(struct mqtt *m, char *err, size_t errlen)
{
	const struct config *cfg = m->cfg;
	int rc;

	mosquitto_threaded_set(m->mosq, true);	/* queue packets; we write them */
	mosquitto_connect_with_flags_callback_set(m->mosq, on_connect);
	mosquitto_disconnect_callback_set(m->mosq, on_disconnect);
	mosquitto_message_callback_set(m->mosq, on_message);
	mosquitto_subscribe_callback_set(m->mosq, on_subscribe);
	mosquitto_unsubscribe_callback_set(m->mosq, on_unsubscribe);
	mosquitto_publish_callback_set(m->mosq, on_publish);
	mosquitto_log_callback_set(m->mosq, on_log);
	if (m->v5) {
		/* Sent in CONNECT; Mosquitto 2.0 takes it as its window as it is. */
		mosquitto_int_option(m->mosq, MOSQ_OPT_RECEIVE_MAXIMUM, (int)cfg->broker.receive_maximum);
		mosquitto_connect_v5_callback_set(m->mosq, on_connect_v5);
		mosquitto_disconnect_v5_callback_set(m->mosq, on_disconnect_v5);
		mosquitto_subscribe_v5_callback_set(m->mosq, on_subscribe_v5);
		if ((rc = mqtt_set_protocol(m, true)) != MOSQ_ERR_SUCCESS) {
			snprintf(err, errlen, "broker.session_expiry: %s", mosquitto_strerror(rc));
			return -1;
		}
	}
	if (cfg->broker.username &&
	    (rc = mosquitto_username_pw_set(m->mosq, cfg->broker.username, cfg->broker.password))) {
		snprintf(err, errlen, "broker.username: %s", mosquitto_strerror(rc));
		return -1;
	}
	if (cfg->broker.tls_ca_file) {
		rc = mosquitto_tls_set(m->mosq, cfg->broker.tls_ca_file, NULL,
		    cfg->broker.tls_cert_file, cfg->broker.tls_key_file, NULL);
		if (rc == MOSQ_ERR_SUCCESS)
			rc = mosquitto_tls_opts_set(m->mosq, 1, "tlsv1.2", NULL);
		if (rc != MOSQ_ERR_SUCCESS) {
			snprintf(err, errlen, "broker.tls: %s", mosquitto_strerror(rc));
			return -1;
		}
	}
	return 0;
}

struct mqtt *
mqtt_new(struct event_loop *loop, const struct config *cfg, const struct mqtt_handler *handler,
    char *err, size_t errlen)
{
	struct mqtt *m;

	if ((m = calloc(1, sizeof(*m))) == NULL) {
		snprintf(err, errlen, "out of memory");
		return NULL;
	}
	m->loop = loop;
	m->cfg = cfg;
	m->h = *handler;
	m->watched_fd = -1;
	m->state = MQTT_IDLE;
	event_timer_init(&m->reconnect_timer, on_reconnect_timer, m);
	event_timer_init(&m->misc_timer, on_misc_timer, m);
	event_timer_init(&m->storage_timer, on_storage_timer, m);
	m->proto_auto = strcmp(cfg->broker.protocol, "auto") == 0;
	m->v5 = m->proto_auto || strcmp(cfg->broker.protocol, "mqttv5") == 0;
	snprintf(m->publish_log_prefix, sizeof(m->publish_log_prefix), "Client %s", cfg->broker.client_id);
	/* clean_session = false: the broker keeps our queue while we are away. */
	if ((m->mosq = mosquitto_new(cfg->broker.client_id, false, m)) == NULL) {
		snprintf(err, errlen, "mosquitto_new: %s", strerror(errno));
		free(m);
		return NULL;
	}
	if (configure(m, err, errlen) == -1) {
		mqtt_free(m);
		return NULL;
	}
	event_set_before_sleep(loop, before_sleep, m);
	return m;
}

void
mqtt_free(struct mqtt *m)
{
	if (m == NULL)
		return;
	event_timer_disarm(m->loop, &m->reconnect_timer);
	event_timer_disarm(m->loop, &m->misc_timer);
	event_timer_disarm(m->loop, &m->storage_timer);
	if (m->watched_fd >= 0)
		event_io_del(m->loop, m->watched_fd);
	event_clear_before_sleep(m->loop, m);
	mosquitto_destroy(m->mosq);
	free(m);
}

void
mqtt_set_config(struct mqtt *m, const struct config *cfg)
{
	m->cfg = cfg;
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

void
mqtt_start(struct mqtt *m)
{
	event_timer_arm(m->loop, &m->reconnect_timer, 0);
	event_timer_arm(m->loop, &m->misc_timer, 1000);
}

void
mqtt_stop(struct mqtt *m)
{
	bool was_connected = m->state == MQTT_CONNECTED;
	uint64_t deadline, now;

	m->state = MQTT_STOPPED;
	event_timer_disarm(m->loop, &m->reconnect_timer);
	if (!was_connected || mosquitto_socket(m->mosq) < 0)
		return;
	/* Every read pass ended in a commit, so all queued PUBACKs may leave. */
	mosquitto_disconnect(m->mosq);
	deadline = event_now_ms() + MQTT_STOP_FLUSH_MS;
	while (mosquitto_socket(m->mosq) >= 0 && mosquitto_want_write(m->mosq) &&
	    (now = event_now_ms()) < deadline) {
		struct pollfd pfd = { .fd = mosquitto_socket(m->mosq), .events = POLLOUT };
		if (poll(&pfd, 1, (int)(deadline - now)) > 0 &&
		    mosquitto_loop_write(m->mosq, 1) != MOSQ_ERR_SUCCESS)
			break;
	}
}

void
mqtt_abort(struct mqtt *m, const char *why)
{
	m->abort_reason = why;
}

int
mqtt_subscribe(struct mqtt *m, const char *filter, int qos, int *mid)
{
	/*
	 * MQTT 5 Retain Handling 1: retained messages only for a subscription
	 * the session did not have, so the broker itself stops the replays.
	 */
	int rc = m->v5 ? mosquitto_subscribe_v5(m->mosq, mid, filter, qos, MQTT_SUB_OPT_SEND_RETAIN_NEW, NULL) :
	    mosquitto_subscribe(m->mosq, mid, filter, qos);

	if (rc != MOSQ_ERR_SUCCESS)
		log_warnx("SUBSCRIBE %s: %s", filter, mosquitto_strerror(rc));
	return rc == MOSQ_ERR_SUCCESS ? 0 : -1;
}

/*
 * SUBSCRIBE and UNSUBSCRIBE of barrier_topic in turn, QoS 0. Both brokers
 * handle a connection's packets in order: Mosquitto each at once, RabbitMQ
 * 3.10 by turning a PUBACK into a basic.ack cast to the channel and a
 * (UN)SUBSCRIBE into a bind or unbind call through the same channel, which
 * answers only after the casts before it. An UNSUBSCRIBE of a filter this
 * connection did not subscribe is answered at once by RabbitMQ, without the
 * channel: hence the pair. Nobody publishes there, so nothing arrives.
 */
int
mqtt_barrier(struct mqtt *m)
{
	const char *topic = m->cfg->broker.barrier_topic;
	int rc, mid;

	if (m->state != MQTT_CONNECTED || m->barrier_mid)
		return -1;
	rc = m->barrier_subscribed ? mosquitto_unsubscribe(m->mosq, &mid, topic) :
	    mosquitto_subscribe(m->mosq, &mid, topic, 0);
	if (rc != MOSQ_ERR_SUCCESS) {
		log_warnx("barrier on %s: %s", topic, mosquitto_strerror(rc));
		return -1;
	}
	m->barrier_subscribed = !m->barrier_subscribed;
	m->barrier_mid = mid;
	return 0;
}

int
mqtt_unsubscribe(struct mqtt *m, const char *filter, int *mid)
{
	int rc = mosquitto_unsubscribe(m->mosq, mid, filter);

	if (rc != MOSQ_ERR_SUCCESS)
		log_warnx("UNSUBSCRIBE %s: %s", filter, mosquitto_strerror(rc));
	return rc == MOSQ_ERR_SUCCESS ? 0 : -1;
}

enum mqtt_publish_result
mqtt_publish(struct mqtt *m, const char *topic, const void *payload, size_t len, int qos,
    bool retain, int *mid)
{
	int rc = mosquitto_publish(m->mosq, mid, topic, (int)len, payload, qos, retain);

	if (rc != MOSQ_ERR_SUCCESS)
		log_warnx("PUBLISH %s: %s", topic, mosquitto_strerror(rc));
	if (rc == MOSQ_ERR_SUCCESS)
		return MQTT_PUBLISH_OK;
	return rc == MOSQ_ERR_NO_CONN || rc == MOSQ_ERR_NOMEM ? MQTT_PUBLISH_LATER : MQTT_PUBLISH_NEVER;
}
