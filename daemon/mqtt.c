#include "mqtt.h"
#include "mqtt_internal.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>

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

#define MQTT_STOP_FLUSH_MS 1000
/*
 * Between read passes refused by a locked history: each try may wait out
 * the history's busy_timeout (100 ms), so the loop stays mostly free.
 */
#define STORAGE_RETRY_MIN_MS 50
#define STORAGE_RETRY_MAX_MS 1000


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

void
mqtt_set_error(struct mqtt *m, const char *fmt, ...)
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

const struct config_endpoint *
mqtt_ep(const struct mqtt *m)
{
	return &m->cfg->broker.hosts[m->endpoint];
}

const struct config_endpoint *
mqtt_endpoint(const struct mqtt *m)
{
	return mqtt_ep(m);
}

const char *
mqtt_left(const struct mqtt *m)
{
	return m->left;
}










static void
mqtt_on_subscribe_v5(struct mosquitto *mosq, void *arg, int mid, int count, const int *granted,
    const mosquitto_property *props)
{
	(void)mosq;
	(void)mid;
	for (int i = 0; i < count; i++)
		mqtt_log_reason(arg, "SUBACK", granted[i] >= 0x80 ? granted[i] : 0, props);
}


/* DUP as libmosquitto logged it just before calling on_message. */
static bool
mqtt_publish_dup(struct mqtt *m, const struct mosquitto_message *msg)
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
mqtt_on_message(struct mosquitto *mosq, void *arg, const struct mosquitto_message *msg)
{
	struct mqtt *m = arg;
	struct delivery d = {
		.topic = msg->topic,
		.payload = msg->payload,
		.payloadlen = (size_t)msg->payloadlen,
		.qos = msg->qos,
		.retain = msg->retain,
		.dup = mqtt_publish_dup(m, msg),
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
mqtt_barrier_answered(struct mqtt *m, int mid)
{
	if (m->barrier_mid == 0 || mid != m->barrier_mid)
		return false;
	m->barrier_mid = 0;
	m->h.barrier(m->h.arg);
	return true;
}

static void
mqtt_on_subscribe(struct mosquitto *mosq, void *arg, int mid, int count, const int *granted)
{
	struct mqtt *m = arg;

	(void)mosq;
	if (mqtt_barrier_answered(m, mid))
		return;
	m->h.subscribed(m->h.arg, mid, count > 0 && granted[0] >= 0 && granted[0] <= 2);
}

static void
mqtt_on_unsubscribe(struct mosquitto *mosq, void *arg, int mid)
{
	struct mqtt *m = arg;

	(void)mosq;
	if (mqtt_barrier_answered(m, mid))
		return;
	m->h.unsubscribed(m->h.arg, mid);
}

static void
mqtt_on_publish(struct mosquitto *mosq, void *arg, int mid)
{
	struct mqtt *m = arg;

	(void)mosq;
	m->h.published(m->h.arg, mid);
}

static bool
mqtt_socket_has_data(int fd)
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
mqtt_drop_connection(struct mqtt *m, const char *why)
{
	int fd = mosquitto_socket(m->mosq);

	mqtt_set_error(m, "%s", why);
	if (fd < 0)
		return;
	m->dropping = true;
	shutdown(fd, SHUT_RDWR);
	for (int i = 0; i < MQTT_MAX_BATCH && mosquitto_socket(m->mosq) >= 0; i++)
		mosquitto_loop_read(m->mosq, 1);
	m->dropping = false;
}

static int
mqtt_read_pass(struct mqtt *m)
{
	int fd = mosquitto_socket(m->mosq), rc = MOSQ_ERR_SUCCESS;

	m->batch_messages = 0;
	m->batch_failed = false;
	if (m->h.ready(m->h.arg) == -1) {
		/* The socket is not watched meanwhile (mqtt_before_sleep): its data waits in the kernel. */
		m->storage_retry_ms = m->storage_retry_ms ? m->storage_retry_ms * 2 : STORAGE_RETRY_MIN_MS;
		if (m->storage_retry_ms > STORAGE_RETRY_MAX_MS)
			m->storage_retry_ms = STORAGE_RETRY_MAX_MS;
		event_timer_arm(m->loop, &m->storage_timer, m->storage_retry_ms);
		return MOSQ_ERR_SUCCESS;
	}
	m->storage_retry_ms = 0;
	for (size_t i = 0; i < MQTT_MAX_BATCH; i++) {
		if ((rc = mosquitto_loop_read(m->mosq, 1)) != MOSQ_ERR_SUCCESS ||
		    mosquitto_socket(m->mosq) != fd || !mqtt_socket_has_data(fd))
			break;
	}
	if (m->abort_reason) {
		const char *why = m->abort_reason;
		m->abort_reason = NULL;
		m->h.abort(m->h.arg);
		mqtt_drop_connection(m, why);
		return rc;
	}
	if (m->batch_failed) {
		m->h.abort(m->h.arg);
		mqtt_drop_connection(m, "could not store a message; dropped the connection unacknowledged");
	} else if (m->h.commit(m->h.arg) == -1) {
		mqtt_drop_connection(m, "could not commit to the history; dropped the connection unacknowledged");
	}
	return rc;
}



static void
mqtt_on_io(int fd, short revents, void *arg)
{
	struct mqtt *m = arg;
	int rc = MOSQ_ERR_SUCCESS;

	(void)fd;
	if (revents & (POLLIN | POLLHUP | POLLERR))
		rc = mqtt_read_pass(m);
	if (mosquitto_socket(m->mosq) >= 0 && mosquitto_want_write(m->mosq))
		rc = mosquitto_loop_write(m->mosq, 1);
	mqtt_check_connect_failed(m, rc);
}

/* libmosquitto's own errors (TLS, certificates) name the cause: keep the last. */
static void
mqtt_on_log(struct mosquitto *mosq, void *arg, int level, const char *text)
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
mqtt_before_sleep(void *arg)
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
		    mqtt_on_io, m);
}

static void
mqtt_on_misc_timer(void *arg)
{
	struct mqtt *m = arg;

	if (mosquitto_socket(m->mosq) >= 0)
		mosquitto_loop_misc(m->mosq);
	event_timer_arm(m->loop, &m->misc_timer, 1000);
}

/* before_sleep watches the socket again: a pass is tried when it is readable. */
static void
mqtt_on_storage_timer(void *arg)
{
	(void)arg;
}



static int
mqtt_configure(struct mqtt *m, char *err, size_t errlen)
{
	const struct config *cfg = m->cfg;
	int rc;

	mosquitto_threaded_set(m->mosq, true);	/* queue packets; we write them */
	mosquitto_connect_with_flags_callback_set(m->mosq, mqtt_on_connect);
	mosquitto_disconnect_callback_set(m->mosq, mqtt_on_disconnect);
	mosquitto_message_callback_set(m->mosq, mqtt_on_message);
	mosquitto_subscribe_callback_set(m->mosq, mqtt_on_subscribe);
	mosquitto_unsubscribe_callback_set(m->mosq, mqtt_on_unsubscribe);
	mosquitto_publish_callback_set(m->mosq, mqtt_on_publish);
	mosquitto_log_callback_set(m->mosq, mqtt_on_log);
	if (m->v5) {
		/* Sent in CONNECT; Mosquitto 2.0 takes it as its window as it is. */
		mosquitto_int_option(m->mosq, MOSQ_OPT_RECEIVE_MAXIMUM, (int)cfg->broker.receive_maximum);
		mosquitto_connect_v5_callback_set(m->mosq, mqtt_on_connect_v5);
		mosquitto_disconnect_v5_callback_set(m->mosq, mqtt_on_disconnect_v5);
		mosquitto_subscribe_v5_callback_set(m->mosq, mqtt_on_subscribe_v5);
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
	event_timer_init(&m->reconnect_timer, mqtt_on_reconnect_timer, m);
	event_timer_init(&m->misc_timer, mqtt_on_misc_timer, m);
	event_timer_init(&m->storage_timer, mqtt_on_storage_timer, m);
	m->proto_auto = strcmp(cfg->broker.protocol, "auto") == 0;
	m->v5 = m->proto_auto || strcmp(cfg->broker.protocol, "mqttv5") == 0;
	snprintf(m->publish_log_prefix, sizeof(m->publish_log_prefix), "Client %s", cfg->broker.client_id);
	/* clean_session = false: the broker keeps our queue while we are away. */
	if ((m->mosq = mosquitto_new(cfg->broker.client_id, false, m)) == NULL) {
		snprintf(err, errlen, "mosquitto_new: %s", strerror(errno));
		free(m);
		return NULL;
	}
	if (mqtt_configure(m, err, errlen) == -1) {
		mqtt_free(m);
		return NULL;
	}
	event_set_before_sleep(loop, mqtt_before_sleep, m);
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
