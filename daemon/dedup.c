#include "dedup.h"

void
dedup_connection_start(struct dedup_state *state)
{
	state->last_redelivered = 0;
}

const char *
dedup_reason_name(enum dedup_reason reason)
{
	switch (reason) {
	case DEDUP_RETAINED_REPLAY:
		return "retained_replay";
	case DEDUP_REDELIVERY:
		return "redelivery";
	default:
		return NULL;
	}
}

int
dedup_decide(struct dedup_state *state, const struct dedup_source *src,
    const struct delivery *d, struct dedup_verdict *out)
{
	int64_t id;

	*out = (struct dedup_verdict){ .reason = DEDUP_NEW };
	if (d->retain) {
		/*
		 * A broker sets RETAIN=1 only for what a SUBSCRIBE replays; the
		 * retained command is the last one published retained on the
		 * topic, so any accepted row with the same content is it.
		 * Unseen content is a command we never got (e.g. a new filter).
		 */
		if ((id = src->latest_same(src->ctx, d)) < 0)
			return -1;
		if (id > 0)
			*out = (struct dedup_verdict){ DEDUP_RETAINED_REPLAY, id };
		return 0;
	}
	if (d->dup) {
		/*
		 * A broker redelivers, in the original order, what an earlier
		 * connection left without PUBACK: first rows we committed whose
		 * PUBACK was lost, then messages we never committed. Match each
		 * redelivery to the first row after the one the previous
		 * redelivery matched, so that a run of equal payloads maps one
		 * to one and what is left over is new.
		 */
		id = src->earlier_connection_same(src->ctx, d,
		    d->received_at_ms - state->window_ms, state->last_redelivered);
		if (id < 0)
			return -1;
		if (id > 0) {
			state->last_redelivered = id;
			*out = (struct dedup_verdict){ DEDUP_REDELIVERY, id };
		}
	}
	return 0;
}
