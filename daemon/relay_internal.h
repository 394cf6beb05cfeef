/*
 * What the files of the relay module share: relay.c (the ingest path:
 * deliveries, the dedup, the commit, the barrier), relay_session.c (the
 * broker session: subscriptions, redelivery candidates, session loss) and
 * relay_status.c (stats, STATUS=, today's counts). Nothing else includes it.
 */
#ifndef CMDRELAY_RELAY_INTERNAL_H
#define CMDRELAY_RELAY_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "config.h"
#include "dedup.h"
#include "event.h"
#include "mqtt.h"
#include "relay.h"
#include "store.h"
#include "topic.h"
#include "uplink.h"

#define PENDING_MAX (2 * CONFIG_MAX_SUBSCRIPTIONS)

/* A SUBSCRIBE or UNSUBSCRIBE waiting for the broker's answer. */
struct pending_sub {
	int mid;
	bool unsubscribe;
	int qos;
	char *filter;
};

struct relay {
	struct event_loop *loop;
	const struct config *cfg;
	struct store *store;
	struct mqtt *mqtt;
	struct uplink *uplink;
	struct topic_pattern *pattern;
	struct dedup_state dedup;
	char session_key[512];
	bool in_txn;
	uint64_t busy_since_ms;	/* another writer holds the history; 0: not */
	struct relay_counters total, staged;
	uint64_t last_commit_us;
	int64_t staged_row, committed_row;	/* the newest row in, and after, the transaction */
	int64_t barrier_row;	/* the newest row whose PUBACK the barrier in flight covers */
	int64_t answered_row;	/* the newest row the last answered barrier covered */
	int64_t confirmed_row;	/* answered, not yet written; 0: nothing to write */
	int64_t confirmed_connection;	/* the connection that sent those PUBACKs */
	int64_t connection;	/* the current connection's number in the history */
	struct event_timer confirm_timer;
	struct pending_sub pending[PENDING_MAX];
	size_t npending;
	void (*status_fn)(void *arg);
	void *status_arg;
	void (*commit_fn)(void *arg);
	void *commit_arg;
	/* for stats and status: since when, and how the broker took us */
	uint64_t started_mono_ms, started_wall_ms, connected_wall_ms;
	bool session_present;
	uint64_t session_lost;	/* connects on which the broker had dropped our session */
	bool session_lost_now;	/* the last connect was one of them: shown until a clean one */
	struct store_day today;	/* since the local midnight, injected commands included */
};

/* relay_status.c */
void relay_today_add(struct relay *r, const struct relay_counters *c);
bool relay_today_recount(struct relay *r);

/* relay_session.c */
void relay_pending_clear(struct relay *r);
void relay_sync_subscriptions(struct relay *r, bool session_present);
int relay_load_candidates(struct relay *r, bool session_present);
void relay_check_session(struct relay *r, bool session_present);
void relay_on_subscribed(void *arg, int mid, bool granted);
void relay_on_unsubscribed(void *arg, int mid);

#endif
