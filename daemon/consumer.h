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

/* Adds the relay's own numbers to a stats reply. */
typedef void consumers_stats_fn(json_t *reply, void *arg);

struct consumers *consumers_new(struct event_loop *loop, const struct config *cfg,
    struct store *store, consumers_stats_fn *stats, void *stats_arg, char *err, size_t errlen);
void consumers_free(struct consumers *cs);
/* A reloaded config; its socket settings equal the running ones. */
void consumers_set_config(struct consumers *cs, const struct config *cfg);
/* New commands were committed: send them to whoever waits. */
void consumers_notify(struct consumers *cs);
size_t consumers_connected(const struct consumers *cs);
/* The stats op's reply: the relay's numbers, connections, consumers with lag. */
json_t *consumers_stats(struct consumers *cs);

#endif
