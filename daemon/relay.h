/*
 * The ingest path: broker deliveries into the history, de-duplicated and
 * group-committed before their PUBACKs; the session's subscriptions kept
 * in step with the config (G8).
 */
#ifndef CMDRELAY_RELAY_H
#define CMDRELAY_RELAY_H

#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "config.h"
#include "dedup.h"
#include "event.h"
#include "store.h"

struct relay;

struct relay_counters {
	uint64_t received;
	uint64_t by_reason[DEDUP_NREASONS];	/* dedup_reasons[] */
	uint64_t oversized;
	uint64_t commit_failures;
};

/* Opens the history and prepares the broker connection; starts nothing. */
struct relay *relay_new(struct event_loop *loop, const struct config *cfg,
    char *err, size_t errlen);
void relay_free(struct relay *r);
void relay_start(struct relay *r);
/* The outbox has something new for the broker. */
void relay_uplink_kick(struct relay *r);
/*
 * Switches to a new, valid config: subscriptions follow at once (G8), a
 * changed broker means a new connection. On -1 nothing changed.
 */
int relay_reload(struct relay *r, const struct config *cfg, char *err, size_t errlen);
void relay_stop(struct relay *r);

/* One line for systemd's STATUS=: connection, counts, last error. */
void relay_status(struct relay *r, char *buf, size_t len);
/* Called whenever the line above would change. */
void relay_on_status_change(struct relay *r, void (*fn)(void *arg), void *arg);
/* Called after each commit that added rows. */
void relay_on_commit(struct relay *r, void (*fn)(void *arg), void *arg);
/* Adds connection state and counters to a stats object. */
void relay_stats(struct relay *r, json_t *obj);
struct store *relay_store(struct relay *r);
/* Records d as an accepted command marked injected, committed; -2 while a broker batch is open. */
int relay_inject(struct relay *r, const struct delivery *d, int64_t *row);

#endif
