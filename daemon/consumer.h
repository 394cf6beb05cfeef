/*
 * Protocol v1 on the consumer socket: named consumers with durable cursors
 * and a window of unacknowledged commands, and anonymous live tails (G4, G5).
 */
#ifndef CMDRELAY_CONSUMER_H
#define CMDRELAY_CONSUMER_H

#include <jansson.h>

#include "config.h"
#include "event.h"
#include "store.h"

struct consumers;

struct consumers_hooks {
	/* Adds the relay's own numbers to a stats reply. */
	void (*stats)(json_t *reply, void *arg);
	/* A publish op committed a message to the outbox. */
	void (*queued)(void *arg);
	/* The inject op: records d as a command (relay_inject()'s return). */
	int (*inject)(const struct delivery *d, int64_t *row, void *arg);
	void *arg;
};

struct consumers *consumers_new(struct event_loop *loop, const struct config *cfg,
    struct store *store, const struct consumers_hooks *hooks, char *err, size_t errlen);
void consumers_free(struct consumers *cs);
/* A reloaded config; its socket settings equal the running ones. */
void consumers_set_config(struct consumers *cs, const struct config *cfg);
/* New commands were committed: send them to whoever waits. */
void consumers_notify(struct consumers *cs);
/* The stats op's reply: the relay's numbers, connections, consumers with lag. */
json_t *consumers_stats(struct consumers *cs);

#endif
