#include "dedup.h"

#include <stdlib.h>
#include <string.h>

const struct dedup_reason_info dedup_reasons[DEDUP_NREASONS] = {
	[DEDUP_NEW] = { NULL, true, "new" },
	[DEDUP_RETAINED_REPLAY] = { "retained_replay", false, "retained_replay" },
	[DEDUP_REDELIVERY] = { "redelivery", false, "redelivery" },
	[DEDUP_POSSIBLE_REPEAT] = { "possible_repeat", true, "possible_repeat" },
};

/* FNV-1a 64: cheap and stable (it is stored in messages.payload_hash). */
uint64_t
dedup_hash(const void *data, size_t len)
{
	const unsigned char *p = data;
	uint64_t h = 0xcbf29ce484222325ULL;

	for (size_t i = 0; i < len; i++) {
		h ^= p[i];
		h *= 0x100000001b3ULL;
	}
	return h;
}

void
dedup_state_clear(struct dedup_state *state)
{
	free(state->cand);
	free(state->alive);
	state->cand = NULL;
	state->alive = NULL;
	state->ncand = 0;
}

int
dedup_connection_start(struct dedup_state *state, bool ids_kept, struct dedup_candidate *cand,
    size_t n)
{
	bool *alive = malloc((n + 1) * sizeof(*alive));

	dedup_state_clear(state);
	if (alive == NULL) {
		free(cand);
		return -1;
	}
	size_t first_unsent = n;

	while (first_unsent > 0 && cand[first_unsent - 1].unsent)
		first_unsent--;
	for (size_t s = 0; s <= n; s++)
		alive[s] = s <= first_unsent;
	*state = (struct dedup_state){ .ids_kept = ids_kept, .cand = cand, .ncand = n,
		.alive = alive };
	return 0;
}

static bool
dedup_fits(const struct dedup_state *state, const struct dedup_candidate *c,
    const struct delivery *d, uint64_t topic_hash, uint64_t payload_hash)
{
	return c->topic_hash == topic_hash && c->payload_hash == payload_hash &&
	    (!state->ids_kept || c->mid == d->mid);
}

/*
 * The i-th DUP=1 delivery of the connection is cand[s + i] under the
 * hypothesis "the broker redelivers cand[s..] first", and new under one with
 * s + i beyond the candidates; hypotheses that the delivery contradicts die.
 * Returns 1 with the candidate in *out when a living hypothesis says it is
 * one of ours, 0 when none does.
 */
static int
dedup_match_redelivery(struct dedup_state *state, const struct dedup_source *src,
    const struct delivery *d, struct dedup_verdict *out)
{
	uint64_t th = dedup_hash(d->topic, strlen(d->topic));
	uint64_t ph = dedup_hash(d->payload, d->payloadlen);
	size_t i = state->run++;
	const struct dedup_candidate *hit = NULL;
	bool new_fits = false;

	for (size_t s = 0; s <= state->ncand; s++) {
		const struct dedup_candidate *c;
		int same;

		if (!state->alive[s])
			continue;
		if (s + i >= state->ncand) {
			new_fits = true;
			continue;
		}
		c = &state->cand[s + i];
		if (!dedup_fits(state, c, d, th, ph)) {
			state->alive[s] = false;
			continue;
		}
		if (hit)
			continue;
		/* The hashes are no proof: one read settles it. */
		if ((same = src->same_content(src->ctx, c->entry, d)) < 0)
			return -1;
		if (same)
			hit = c;
		else
			state->alive[s] = false;
	}
	if (hit == NULL)
		return 0;
	/*
	 * Packet ids are unique among a session's unacknowledged messages, so
	 * with kept ids the same id and content is that message. Without them,
	 * while "new" still fits (the broker may have had the PUBACK), flag it.
	 */
	out->reason = state->ids_kept || !new_fits ? DEDUP_REDELIVERY : DEDUP_POSSIBLE_REPEAT;
	out->duplicate_of = hit->command;
	out->entry = hit->entry;
	return 1;
}

/*
 * A broker replays a topic's retained message, the last one published
 * retained; as we receive a topic's commands in order, that is our newest
 * when its content is equal. Equal content to an older command only means
 * the topic moved on without us seeing the retained one go: flag it.
 */
static int
dedup_retained(const struct dedup_source *src, const struct delivery *d,
    struct dedup_verdict *out)
{
	int64_t newest, older;
	int same, mid;

	if ((newest = src->topic_newest(src->ctx, d)) < 0)
		return -1;
	if (newest > 0) {
		if ((same = src->same_content(src->ctx, newest, d)) < 0)
			return -1;
		if (same) {
			out->reason = DEDUP_RETAINED_REPLAY;
			out->duplicate_of = newest;
			return 0;
		}
	}
	if ((older = src->latest_same(src->ctx, d, &mid)) < 0)
		return -1;
	if (older > 0) {
		out->reason = DEDUP_POSSIBLE_REPEAT;
		out->duplicate_of = older;
	}
	return 0;
}

/*
 * DUP=1 that no candidate explains, where packet ids are kept: the same id
 * and content as a command the broker had confirmed is what a broker
 * restored from an old snapshot sends. It may be new: flag it.
 */
static int
dedup_confirmed_again(const struct dedup_source *src, const struct delivery *d,
    struct dedup_verdict *out)
{
	int64_t older;
	int mid = 0;

	if ((older = src->latest_same(src->ctx, d, &mid)) < 0)
		return -1;
	if (older > 0 && mid == d->mid) {
		out->reason = DEDUP_POSSIBLE_REPEAT;
		out->duplicate_of = older;
	}
	return 0;
}

int
dedup_decide(struct dedup_state *state, const struct dedup_source *src,
    const struct delivery *d, struct dedup_verdict *out)
{
	int rc;

	*out = (struct dedup_verdict){ .reason = DEDUP_NEW };
	/* No candidates loaded (the connection could not start): nothing of ours. */
	if (d->dup && !state->run_over && state->alive &&
	    (rc = dedup_match_redelivery(state, src, d, out)) != 0)
		return rc < 0 ? -1 : 0;
	/*
	 * A broker sends its redeliveries before anything new; a retained
	 * replay may overtake them (RabbitMQ sends it from the SUBSCRIBE).
	 */
	if (!d->dup && !d->retain && !state->run_over) {
		state->run_over = true;
		out->run_ended = true;
	}
	if (d->retain)
		return dedup_retained(src, d, out);
	if (d->dup && state->ids_kept)
		return dedup_confirmed_again(src, d, out);
	return 0;
}
