/*
 * The consumer socket: a listening UNIX stream socket (created, or handed
 * over by systemd), and per connection line framing with bounded buffers.
 * What the lines mean is the handler's business (consumer.c).
 */
#ifndef CMDRELAY_SERVER_H
#define CMDRELAY_SERVER_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

#include "config.h"
#include "event.h"

#define SERVER_LINE_MAX 65536	/* longest client line, without its newline */
/* Below this much queued output a handler may queue more. */
#define SERVER_OUT_LOW_WATER (64 * 1024)
/*
 * The most output queued for one connection: the low-water mark plus one
 * command line of the largest store.max_payload (4 MiB), escaped at up to
 * 6 bytes a byte. Handlers stop queueing at the low-water mark; beyond
 * this the peer is closed, not buffered for.
 */
#define SERVER_OUT_MAX (32 * 1024 * 1024)

struct server;
struct conn;

struct server_handler {
	/* A new connection; returns its protocol state, NULL to refuse it. */
	void *(*open)(struct conn *c, void *arg);
	/* One line, NUL-terminated, without its newline. */
	void (*line)(struct conn *c, void *state, char *line, size_t len, void *arg);
	/* The output buffer has room again. */
	void (*drained)(struct conn *c, void *state, void *arg);
	void (*close)(struct conn *c, void *state, void *arg);
	void *arg;
};

struct server *server_new(struct event_loop *loop, const struct config *cfg,
    const struct server_handler *handler, char *err, size_t errlen);
void server_free(struct server *srv);
void server_set_config(struct server *srv, const struct config *cfg);
size_t server_connections(const struct server *srv);
void server_foreach(struct server *srv, void (*fn)(struct conn *c, void *state, void *arg), void *arg);

/* Queues data (a whole line) for the peer and writes what the socket takes. */
void conn_send(struct conn *c, const char *data, size_t len);
/*
 * Between these, conn_send() only queues: for lines that must not leave
 * before something else is done. With discard, what was queued meanwhile is
 * dropped unseen.
 */
void conn_cork(struct conn *c);
void conn_uncork(struct conn *c, bool discard);
/* Stops reading; closes once everything queued is written. */
void conn_close(struct conn *c);
size_t conn_queued(const struct conn *c);
pid_t conn_pid(const struct conn *c);
uid_t conn_uid(const struct conn *c);

#endif
