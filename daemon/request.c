#include "request.h"

#include <ctype.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include <jansson.h>
#include <mosquitto.h>

#include "wire.h"

static int __attribute__((format(printf, 4, 5)))
request_fail(struct request_error *err, const char *code, bool fatal, const char *fmt, ...)
{
	va_list ap;

	err->code = code;
	err->fatal = fatal;
	va_start(ap, fmt);
	vsnprintf(err->message, sizeof(err->message), fmt, ap);
	va_end(ap);
	return -1;
}

static bool
request_valid_name(const char *name)
{
	size_t len = strlen(name);

	if (len == 0 || len > REQUEST_NAME_MAX)
		return false;
	for (const char *p = name; *p; p++)
		if (!isalnum((unsigned char)*p) && !strchr("._-", *p))
			return false;
	return true;
}

/* The first key of msg that is not in allowed, or NULL. */
static const char *
request_unknown_key(json_t *msg, const char *const *allowed)
{
	const char *key;
	json_t *value;

	json_object_foreach(msg, key, value) {
		bool ok = false;
		for (const char *const *a = allowed; *a && !ok; a++)
			ok = strcmp(*a, key) == 0;
		if (!ok)
			return key;
	}
	return NULL;
}

typedef int request_parse_fn(json_t *msg, struct request *req, struct request_error *err);

static request_parse_fn request_parse_hello, request_parse_ack, request_parse_publish,
    request_parse_cursor, request_parse_store;

/* One row per op: adding one is a row here and its handler in consumer.c. */
static const struct request_entry {
	const char *name;
	request_parse_fn *parse;	/* NULL: the op takes any fields, and ignores them */
} request_ops[REQUEST_NOPS] = {
	[REQUEST_HELLO] = { "hello", request_parse_hello },
	[REQUEST_ACK] = { "ack", request_parse_ack },
	[REQUEST_STATS] = { "stats", NULL },
	[REQUEST_PUBLISH] = { "publish", request_parse_publish },
	[REQUEST_CURSOR] = { "consumer", request_parse_cursor },
	[REQUEST_INJECT] = { "inject", request_parse_publish },
	[REQUEST_STORE_ACK] = { "store", request_parse_store },
};

const char *
request_op_name(enum request_op op)
{
	return request_ops[op].name;
}

static int
request_parse_hello(json_t *msg, struct request *req, struct request_error *err)
{
	static const char *const keys[] = { "op", "consumer", "filter", "from", NULL };
	json_t *jname = json_object_get(msg, "consumer"), *jfilter = json_object_get(msg, "filter");
	json_t *jfrom = json_object_get(msg, "from");
	const char *s, *bad;

	if ((bad = request_unknown_key(msg, keys)) != NULL)
		return request_fail(err, "bad_request", false, "hello: unknown field \"%.64s\"", bad);
	if (jname) {
		if (!json_is_string(jname) || !request_valid_name(json_string_value(jname)))
			return request_fail(err, "bad_request", false,
			    "hello: consumer must be 1 to %d of A-Z a-z 0-9 . _ -", REQUEST_NAME_MAX);
		req->named = true;
		snprintf(req->name, sizeof(req->name), "%s", json_string_value(jname));
	}
	if (jfilter) {
		s = json_string_value(jfilter);
		if (s == NULL || strlen(s) == 0 || strlen(s) > REQUEST_FILTER_MAX ||
		    json_string_length(jfilter) != strlen(s) ||
		    mosquitto_validate_utf8(s, (int)strlen(s)) != MOSQ_ERR_SUCCESS ||
		    mosquitto_sub_topic_check(s) != MOSQ_ERR_SUCCESS)
			return request_fail(err, "bad_request", false,
			    "hello: filter must be an MQTT topic filter of at most %d bytes", REQUEST_FILTER_MAX);
		snprintf(req->filter, sizeof(req->filter), "%s", s);
	}
	req->start.from = req->named ? STORE_FROM_STORED : STORE_FROM_LIVE;
	if (jfrom == NULL)
		return 0;
	s = json_string_value(jfrom);
	if (s && strcmp(s, "live") == 0)
		req->start.from = STORE_FROM_LIVE;
	else if (s && strcmp(s, "stored") == 0 && req->named)
		req->start.from = STORE_FROM_STORED;
	else if (json_is_integer(jfrom) && json_integer_value(jfrom) >= 0)
		req->start = (struct store_start){ STORE_FROM_ID, json_integer_value(jfrom) };
	else
		return request_fail(err, "bad_request", false, "hello: from must be %s\"live\" or a history id",
		    req->named ? "\"stored\", " : "");
	return 0;
}

static int
request_parse_ack(json_t *msg, struct request *req, struct request_error *err)
{
	static const char *const keys[] = { "op", "id", NULL };
	json_t *jid = json_object_get(msg, "id");
	const char *bad;

	if ((bad = request_unknown_key(msg, keys)) != NULL)
		return request_fail(err, "bad_request", false, "ack: unknown field \"%.64s\"", bad);
	if (!json_is_integer(jid) || json_integer_value(jid) < 0)
		return request_fail(err, "bad_request", false, "ack: id must be a history id");
	req->ack_id = json_integer_value(jid);
	return 0;
}

/* {"op":"store","action":"ack-corruption"}: the only store action. */
static int
request_parse_store(json_t *msg, struct request *req, struct request_error *err)
{
	static const char *const keys[] = { "op", "action", NULL };
	const char *action = json_string_value(json_object_get(msg, "action"));
	const char *bad = request_unknown_key(msg, keys);

	(void)req;
	if (bad)
		return request_fail(err, "bad_request", false, "store: unknown field \"%.64s\"", bad);
	if (action == NULL || strcmp(action, "ack-corruption") != 0)
		return request_fail(err, "bad_request", false, "store: action must be \"ack-corruption\"");
	return 0;
}

/* {"op":"consumer","consumer":NAME,"action":"delete"} or "reset" with "to": an id, "live", "oldest". */
static int
request_parse_cursor(json_t *msg, struct request *req, struct request_error *err)
{
	static const char *const keys[] = { "op", "consumer", "action", "to", NULL };
	json_t *jname = json_object_get(msg, "consumer"), *jto = json_object_get(msg, "to");
	const char *action = json_string_value(json_object_get(msg, "action")), *to, *bad;

	if ((bad = request_unknown_key(msg, keys)) != NULL)
		return request_fail(err, "bad_request", false, "consumer: unknown field \"%.64s\"", bad);
	if (!json_is_string(jname) || !request_valid_name(json_string_value(jname)))
		return request_fail(err, "bad_request", false,
		    "consumer: consumer must be 1 to %d of A-Z a-z 0-9 . _ -", REQUEST_NAME_MAX);
	req->named = true;
	snprintf(req->name, sizeof(req->name), "%s", json_string_value(jname));
	if (action && strcmp(action, "delete") == 0 && jto == NULL) {
		req->cursor_delete = true;
		return 0;
	}
	if (action == NULL || strcmp(action, "reset") != 0)
		return request_fail(err, "bad_request", false,
		    "consumer: action must be \"delete\" or \"reset\" (with \"to\")");
	to = json_string_value(jto);
	if (to && strcmp(to, "live") == 0)
		req->start = (struct store_start){ .from = STORE_FROM_LIVE };
	else if (to && strcmp(to, "oldest") == 0)
		req->start = (struct store_start){ STORE_FROM_ID, 0 };
	else if (json_is_integer(jto) && json_integer_value(jto) >= 0)
		req->start = (struct store_start){ STORE_FROM_ID, json_integer_value(jto) };
	else
		return request_fail(err, "bad_request", false, "consumer: to must be a history id, \"live\" or \"oldest\"");
	return 0;
}

/* publish and inject: a message, and what its topic and payload must be. */
static int
request_parse_publish(json_t *msg, struct request *req, struct request_error *err)
{
	const char *op = request_op_name(req->op);
	static const char *const keys[] = { "op", "topic", "payload", "encoding", "qos", "retain", NULL };
	json_t *jtopic = json_object_get(msg, "topic"), *jpayload = json_object_get(msg, "payload");
	json_t *jenc = json_object_get(msg, "encoding"), *jqos = json_object_get(msg, "qos");
	json_t *jretain = json_object_get(msg, "retain");
	const char *topic = json_string_value(jtopic), *enc = jenc ? json_string_value(jenc) : "utf8";
	const char *bad;

	if ((bad = request_unknown_key(msg, keys)) != NULL)
		return request_fail(err, "bad_request", false, "%s: unknown field \"%.64s\"", op, bad);
	if (topic == NULL || strlen(topic) == 0 || strlen(topic) > REQUEST_TOPIC_MAX ||
	    json_string_length(jtopic) != strlen(topic) ||
	    mosquitto_validate_utf8(topic, (int)strlen(topic)) != MOSQ_ERR_SUCCESS ||
	    mosquitto_pub_topic_check(topic) != MOSQ_ERR_SUCCESS)
		return request_fail(err, "bad_request", false,
		    "%s: topic must be an MQTT topic without wildcards or control characters, "
		    "at most %d bytes", op, REQUEST_TOPIC_MAX);
	snprintf(req->publish.topic, sizeof(req->publish.topic), "%s", topic);
	if (!json_is_string(jpayload))
		return request_fail(err, "bad_request", false, "%s: payload must be a string", op);
	if (enc && strcmp(enc, "utf8") == 0) {
		if (json_string_length(jpayload) > REQUEST_PAYLOAD_MAX)
			return request_fail(err, "bad_request", false, "%s: payload too long", op);
		memcpy(req->publish.payload, json_string_value(jpayload), json_string_length(jpayload));
		req->publish.payloadlen = json_string_length(jpayload);
	} else if (enc && strcmp(enc, "base64") == 0) {
		if (wire_base64_decode(json_string_value(jpayload), json_string_length(jpayload),
		    req->publish.payload, sizeof(req->publish.payload), &req->publish.payloadlen) == -1)
			return request_fail(err, "bad_request", false, "%s: payload is not base64", op);
	} else {
		return request_fail(err, "bad_request", false, "%s: encoding must be \"utf8\" or \"base64\"", op);
	}
	req->publish.qos = 1;
	if (jqos && (!json_is_integer(jqos) || json_integer_value(jqos) < 0 || json_integer_value(jqos) > 1))
		return request_fail(err, "bad_request", false, "%s: qos must be 0 or 1", op);
	if (jqos)
		req->publish.qos = (int)json_integer_value(jqos);
	if (jretain && !json_is_boolean(jretain))
		return request_fail(err, "bad_request", false, "%s: retain must be true or false", op);
	req->publish.retain = jretain && json_is_true(jretain);
	return 0;
}

int
request_parse(const char *line, size_t len, struct request *req, struct request_error *err)
{
	json_error_t jerr;
	json_t *msg;
	const char *op;
	char names[128] = "";
	int rc, i;

	/* Field by field: zeroing the 64 KiB payload buffer for every ack costs. */
	req->named = false;
	req->name[0] = '\0';
	snprintf(req->filter, sizeof(req->filter), "#");
	req->start = (struct store_start){ .from = STORE_FROM_LIVE };
	req->ack_id = 0;
	req->cursor_delete = false;
	req->publish.topic[0] = '\0';
	req->publish.payloadlen = 0;
	/* Jansson rejects invalid UTF-8 and, with this flag, duplicate keys. */
	if ((msg = json_loadb(line, len, JSON_REJECT_DUPLICATES, &jerr)) == NULL)
		return request_fail(err, "bad_json", true, "not JSON (%s, column %d); closing", jerr.text, jerr.column);
	if (!json_is_object(msg))
		rc = request_fail(err, "bad_json", true, "a line must be a JSON object; closing");
	else if ((op = json_string_value(json_object_get(msg, "op"))) == NULL)
		rc = request_fail(err, "bad_request", false, "the object has no \"op\" string");
	else {
		for (i = 0; i < REQUEST_NOPS && strcmp(op, request_ops[i].name) != 0; i++)
			;
		if (i < REQUEST_NOPS) {
			req->op = (enum request_op)i;
			rc = request_ops[i].parse ? request_ops[i].parse(msg, req, err) : 0;
		} else {
			for (i = 0; i < REQUEST_NOPS; i++)
				snprintf(names + strlen(names), sizeof(names) - strlen(names), "%s%s",
				    i ? ", " : "", request_ops[i].name);
			rc = request_fail(err, "unknown_op", false, "unknown op \"%.64s\" (%s)", op, names);
		}
	}
	json_decref(msg);
	return rc;
}
