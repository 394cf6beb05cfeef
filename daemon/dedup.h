/*
 * Which deliveries repeat a command already in the history (G2, G3).
 *
 * The brokers re-send a command in two ways (design.md, "as the brokers
 * really behave"): a retained replay after SUBSCRIBE comes with RETAIN=1,
 * and a redelivery of a message whose PUBACK the broker never got comes on
 * a later connection with DUP=1. Any other delivery (RETAIN=0, DUP=0) is a
 * new publication, whatever its payload.
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
};

struct dedup_verdict {
	enum dedup_reason reason;	/* DEDUP_NEW: accepted */
	int64_t duplicate_of;		/* the accepted row repeated; 0 when new */
};

/* Look-ups in the history; each returns a row id, 0 for none, -1 on error. */
struct dedup_source {
	/* The latest accepted row with this topic and payload. */
	int64_t (*latest_same)(void *ctx, const struct delivery *d);
	/*
	 * The earliest accepted row with this topic and payload that an earlier
	 * connection delivered, received at or after since_ms, with id > after_id;
	 * among those, one with the delivery's packet id comes first (Mosquitto
	 * keeps a message's packet id when it redelivers it, RabbitMQ does not).
	 */
	int64_t (*earlier_connection_same)(void *ctx, const struct delivery *d,
	    int64_t since_ms, int64_t after_id);
	void *ctx;
};

/* What the decision remembers within one broker connection. */
struct dedup_state {
	int64_t window_ms;
	int64_t last_redelivered;	/* accepted row the last redelivery repeated */
};

void dedup_connection_start(struct dedup_state *state);
int dedup_decide(struct dedup_state *state, const struct dedup_source *src,
    const struct delivery *d, struct dedup_verdict *out);
const char *dedup_reason_name(enum dedup_reason reason);

#endif
