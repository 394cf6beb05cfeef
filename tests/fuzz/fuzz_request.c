/*
 * libFuzzer target: the consumer line handler's parser, request_parse()
 * (daemon/request.c): one client line of protocol v1, without its '\n'.
 *
 * The line is handed over in a buffer of exactly its length (no NUL after
 * it), as consumer.c does with its read buffer, so that AddressSanitizer sees
 * any read past it. A parsed request must satisfy what consumer.c relies on;
 * a publish payload must be the bytes the line gave (utf8), or what an
 * independent decoder makes of the base64 text.
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>
#include <mosquitto.h>

#include "request.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void
check(bool ok, const char *what)
{
	if (!ok) {
		fprintf(stderr, "fuzz_request: %s\n", what);
		abort();
	}
}

static bool
valid_name(const char *s)
{
	size_t len = strlen(s);

	if (len == 0 || len > REQUEST_NAME_MAX)
		return false;
	return strspn(s, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-") == len;
}

static int
b64value(char c)
{
	static const char alphabet[] =
	    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
	const char *p = c ? strchr(alphabet, c) : NULL;

	return p ? (int)(p - alphabet) : -1;
}

/* The payload of a parsed publish against the line's own "payload" string. */
static void
check_payload(const char *line, size_t size, const struct request *req)
{
	json_t *msg = json_loadb(line, size, 0, NULL);
	json_t *jpayload = json_object_get(msg, "payload");
	const char *enc = json_string_value(json_object_get(msg, "encoding"));
	const char *text = json_string_value(jpayload);
	size_t len = json_string_length(jpayload);

	check(text != NULL, "publish accepted without a payload string");
	if (enc == NULL || strcmp(enc, "utf8") == 0) {
		check(req->publish.payloadlen == len &&
		    memcmp(req->publish.payload, text, len) == 0, "utf8 payload differs from the line's");
	} else {
		unsigned char out[REQUEST_PAYLOAD_MAX + 3];
		size_t n = 0;
		unsigned bits = 0, nbits = 0;

		check(strcmp(enc, "base64") == 0, "publish accepted with an unknown encoding");
		for (size_t i = 0; i < len && text[i] != '='; i++) {
			int v = b64value(text[i]);
			check(v >= 0, "base64 payload with a character outside the alphabet accepted");
			bits = (bits << 6) | (unsigned)v;
			nbits += 6;
			if (nbits >= 8) {
				nbits -= 8;
				out[n++] = (unsigned char)(bits >> nbits);
				bits &= (1u << nbits) - 1;
			}
		}
		check(req->publish.payloadlen == n && memcmp(req->publish.payload, out, n) == 0,
		    "base64 payload decoded differently");
	}
	json_decref(msg);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static struct request req;	/* 64 KiB of payload buffer */
	struct request_error err;
	char *line;
	int rc;

	if (size > 64 * 1024)
		return -1;	/* over the protocol's line limit: consumer.c never parses it */
	if ((line = malloc(size ? size : 1)) == NULL)
		return 0;
	memcpy(line, data, size);
	memset(&err, 0, sizeof(err));
	rc = request_parse(line, size, &req, &err);
	if (rc == 0) {
		check(req.op >= 0 && req.op < REQUEST_NOPS && request_op_name(req.op) != NULL, "bad op");
		check(memchr(req.filter, '\0', sizeof(req.filter)) != NULL, "filter not terminated");
		check(req.filter[0] != '\0' && mosquitto_sub_topic_check(req.filter) == MOSQ_ERR_SUCCESS,
		    "filter is not a valid MQTT filter");
		check(memchr(req.name, '\0', sizeof(req.name)) != NULL, "name not terminated");
		check(req.named == (req.name[0] != '\0'), "named flag and name disagree");
		check(!req.named || valid_name(req.name), "invalid consumer name accepted");
		if (req.op == REQUEST_ACK)
			check(req.ack_id >= 0, "negative ack id");
		if (req.op == REQUEST_HELLO)
			check(req.start.from != STORE_FROM_STORED || req.named, "stored start without a name");
		if (req.op == REQUEST_CURSOR)
			check(req.named && valid_name(req.name), "cursor op without a valid consumer name");
		/* inject carries what publish does, and is checked the same way */
		if (req.op == REQUEST_PUBLISH || req.op == REQUEST_INJECT) {
			check(memchr(req.publish.topic, '\0', sizeof(req.publish.topic)) != NULL,
			    "topic not terminated");
			check(req.publish.topic[0] != '\0' &&
			    mosquitto_pub_topic_check(req.publish.topic) == MOSQ_ERR_SUCCESS,
			    "publish topic is not a valid MQTT topic");
			check(req.publish.payloadlen <= REQUEST_PAYLOAD_MAX, "payload longer than the limit");
			check(req.publish.qos == 0 || req.publish.qos == 1, "qos neither 0 nor 1");
			check_payload(line, size, &req);
		}
	} else {
		check(rc == -1, "request_parse returned neither 0 nor -1");
		check(err.code != NULL, "error without a code");
		check(memchr(err.message, '\0', sizeof(err.message)) != NULL, "message not terminated");
		check(err.fatal == (strcmp(err.code, "bad_json") == 0), "only bad_json closes the connection");
	}
	free(line);
	return 0;
}
