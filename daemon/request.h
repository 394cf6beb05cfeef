/*
 * Client lines of protocol v1, parsed and validated without side effects:
 * what consumer.c acts on, and what the fuzzer feeds.
 */
#ifndef CMDRELAY_REQUEST_H
#define CMDRELAY_REQUEST_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "store.h"

#define REQUEST_NAME_MAX 64
#define REQUEST_FILTER_MAX 1024
#define REQUEST_TOPIC_MAX 1024
#define REQUEST_PAYLOAD_MAX 65536	/* a line is at most 64 KiB anyway */

enum request_op {
	REQUEST_HELLO,
	REQUEST_ACK,
	REQUEST_STATS,
	REQUEST_PUBLISH,
	REQUEST_CURSOR,		/* delete or reset a named cursor */
	REQUEST_INJECT,		/* record a command as if the broker sent it */
	REQUEST_STORE_ACK,	/* an admin has seen the history's corruption alarm */
	REQUEST_NOPS
};

struct request {
	enum request_op op;
	bool named;
	char name[REQUEST_NAME_MAX + 1];
	char filter[REQUEST_FILTER_MAX + 1];	/* "#" unless given */
	struct store_start start;		/* stored for named, live for tails, unless given */
	int64_t ack_id;
	bool cursor_delete;		/* REQUEST_CURSOR: delete, else move to start */
	struct {			/* REQUEST_PUBLISH, REQUEST_INJECT */
		char topic[REQUEST_TOPIC_MAX + 1];
		unsigned char payload[REQUEST_PAYLOAD_MAX];
		size_t payloadlen;
		int qos;
		bool retain;
	} publish;
};

struct request_error {
	const char *code;	/* bad_json, bad_request, unknown_op */
	char message[256];
	bool fatal;		/* the connection is closed after the error line */
};

int request_parse(const char *line, size_t len, struct request *req, struct request_error *err);
/* The op's name on the wire ("hello", ...). */
const char *request_op_name(enum request_op op);

#endif
