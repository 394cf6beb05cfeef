/*
 * Which deliveries repeat a command already in the history (G2, G3).
 *
 * The invariant: a delivery is a duplicate only when the broker can be
 * sending a message of ours again. Two cases can be proved:
 *
 * - a retained replay (RETAIN=1, after a SUBSCRIBE) whose content equals
 *   the topic's newest accepted command;
 * - a redelivery (DUP=1) at the start of a connection of a message that an
 *   earlier connection delivered and whose PUBACK the broker has not been
 *   shown to have received (a "candidate"), matched in the broker's order,
 *   on a broker that keeps packet ids (the same packet id too).
 *
 * A broker redelivers exactly its unacknowledged messages, in their original
 * order, before anything new; our PUBACKs leave in delivery order, so those
 * messages are a suffix of the candidates followed by messages we never
 * committed. Where the broker renumbers (RabbitMQ 3.x), "the broker got the
 * PUBACK and this is a new command with the same content" cannot be ruled
 * out: such a delivery is accepted and flagged possible_repeat, never
 * dropped. Everything else is accepted.
 */
#ifndef CMDRELAY_DEDUP_H
#define CMDRELAY_DEDUP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct delivery {
	const char *topic;
	const void *payload;
	size_t payloadlen;
	int qos;
	bool retain;
	bool dup;
	int mid;
	int64_t received_at_ms;
};

enum dedup_reason {
	DEDUP_NEW = 0,
	DEDUP_RETAINED_REPLAY,
	DEDUP_REDELIVERY,
	DEDUP_POSSIBLE_REPEAT,
	DEDUP_NREASONS
};

/* One row per reason: what the history, stats and metrics call it. */
struct dedup_reason_info {
	const char *name;	/* messages.reason; NULL for a plain new command */
	bool accepted;		/* the row is a command for consumers */
	const char *stats_name;	/* key in stats and metrics */
};
extern const struct dedup_reason_info dedup_reasons[DEDUP_NREASONS];

/* A message the broker may still hold without our PUBACK. */
struct dedup_candidate {
	int64_t entry;		/* history row of its first delivery to us */
	int64_t command;	/* the accepted row it carries */
	int mid;		/* packet id of its latest delivery */
	uint64_t topic_hash;
	uint64_t payload_hash;
	bool unsent;		/* its PUBACK certainly never left: it must come again */
};

/* Look-ups in the history. */
struct dedup_source {
	/* 1 when row has the delivery's topic and payload, 0 if not, -1 on error. */
	int (*same_content)(void *ctx, int64_t row, const struct delivery *d);
	/* The topic's newest accepted row: its id, 0 for none, -1 on error. */
	int64_t (*topic_newest)(void *ctx, const struct delivery *d);
	/* The newest accepted row with this topic and payload, and its packet id. */
	int64_t (*latest_same)(void *ctx, const struct delivery *d, int *mid);
	void *ctx;
};

/* What the decision knows within one broker connection. */
struct dedup_state {
	bool ids_kept;		/* the broker keeps packet ids when it redelivers */
	struct dedup_candidate *cand;	/* in the broker's order; owned */
	size_t ncand;
	/*
	 * alive[s]: "the broker redelivers cand[s..] first" still fits what came;
	 * s = ncand is "nothing of ours again". No s beyond an unsent candidate fits.
	 */
	bool *alive;
	size_t run;		/* DUP=1 deliveries of this connection so far */
	bool run_over;		/* a plain new delivery came: redeliveries are over */
};

struct dedup_verdict {
	enum dedup_reason reason;
	int64_t duplicate_of;	/* the accepted row (possibly) repeated; 0 when new */
	int64_t entry;		/* the candidate it is a redelivery of; 0: none */
	bool run_ended;		/* this delivery ended the redeliveries: retire the rest */
};

uint64_t dedup_hash(const void *data, size_t len);

/* Takes cand (malloc'ed, may be NULL when n is 0) for the new connection. */
int dedup_connection_start(struct dedup_state *state, bool ids_kept,
    struct dedup_candidate *cand, size_t n);
void dedup_state_clear(struct dedup_state *state);
int dedup_decide(struct dedup_state *state, const struct dedup_source *src,
    const struct delivery *d, struct dedup_verdict *out);

#endif
