/*
 * What the files of the consumer module share (consumer.c: the socket's
 * clients, hello, ack and the fan-out; consumer_admin.c: the other ops).
 * Nothing outside them includes it.
 */
#ifndef CMDRELAY_CONSUMER_INTERNAL_H
#define CMDRELAY_CONSUMER_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include <jansson.h>

#include "consumer.h"
#include "event.h"
#include "request.h"
#include "server.h"

enum client_mode {
	CLIENT_NEW,
	CLIENT_NAMED,
	CLIENT_TAIL,
};

struct client {
	struct consumers *cs;
	struct conn *conn;
	enum client_mode mode;
	char name[REQUEST_NAME_MAX + 1];
	char filter[REQUEST_FILTER_MAX + 1];
	int64_t sent_id;	/* the last command id sent (a tail: the last row read) */
	int64_t scanned_id;	/* every row up to here was looked at for this client */
	bool live;		/* caught up with the history once */
	struct event_timer more;	/* armed while a catch-up continues */
	int64_t since_ms;	/* when hello was said, for stats */
	int64_t acked_id;
	int64_t sent_before;	/* the highest id sent to this name before this hello */
	int64_t *inflight;	/* ring of sent, unacknowledged ids; socket.window long */
	uint64_t errors;	/* error lines sent on this connection */
	size_t head, count;
};

struct consumers {
	struct event_loop *loop;
	struct event_timer expiry_timer;
	uint64_t cursors_expired;
	const struct config *cfg;
	struct store *store;
	struct server *server;
	struct consumers_hooks hooks;
};

/* Who is connected under a name (consumer_match_name() over server_foreach()). */
struct name_search {
	const char *name;
	const struct client *except;
	bool found;
	pid_t pid;
	int64_t since_ms;
};

/* An error line for the client's last line, logged rate-limited per connection. */
void consumer_send_error(struct client *cl, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Sends value (taken over) as one line. */
void consumer_send_json(struct client *cl, json_t *value);
void consumer_match_name(struct conn *c, void *state, void *arg);

/* The ops besides hello and ack (consumer_admin.c). */
void consumer_op_stats(struct client *cl, const struct request *req);
void consumer_op_publish(struct client *cl, const struct request *req);
void consumer_op_cursor(struct client *cl, const struct request *req);
void consumer_op_inject(struct client *cl, const struct request *req);
void consumer_op_store_ack(struct client *cl, const struct request *req);

#endif
