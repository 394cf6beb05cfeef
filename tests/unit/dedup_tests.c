/*
 * Unit tests of the dedup decision (dedup.c) as a table of cases against an
 * in-memory history, and of its store side (store_dedup.c) against a real
 * SQLite file: the candidates a crash leaves, and what confirms them.
 *
 * Run from tests/unit (`make unit`). No test skips.
 */
#include "unit.h"

#include <inttypes.h>
#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "dedup.h"
#include "store.h"
#include "topic.h"

#define MAX_ROWS 8
#define T_SET "/cf/v1/AAA/012C/dev1/set"
#define T_REBOOT "/cf/v1/AAA/012C/dev1/reboot"

/* A row of the fake history; ids are 1 + the index. */
struct fake_row {
	const char *topic, *payload;
	int mid;
	bool duplicate;		/* a duplicate row: never "newest" nor "latest same" */
};

/* A candidate: the row it is, whether its PUBACK certainly never left. */
struct fake_cand {
	int64_t row;
	bool unsent;
	const char *hashed_as;	/* hash this payload instead of the row's: a collision */
};

struct fake_step {
	const char *topic, *payload;
	int mid;
	bool dup, retain;
	enum dedup_reason want;
	int64_t want_of;	/* duplicate_of */
	bool want_end;		/* run_ended */
};

struct dedup_case {
	const char *name;
	bool ids_kept;
	struct fake_row rows[MAX_ROWS];
	struct fake_cand cands[MAX_ROWS];
	struct fake_step steps[MAX_ROWS];
};

struct fake_history {
	const struct dedup_case *c;
	int fail_after;		/* look-ups before one fails; -1: never */
};

static const struct fake_row *
fake_row(const struct fake_history *h, int64_t id)
{
	return id >= 1 && id <= MAX_ROWS && h->c->rows[id - 1].topic ? &h->c->rows[id - 1] : NULL;
}

static bool
fake_failed(struct fake_history *h)
{
	return h->fail_after >= 0 && h->fail_after-- == 0;
}

static bool
fake_same(const struct fake_row *r, const struct delivery *d)
{
	return strcmp(r->topic, d->topic) == 0 && strlen(r->payload) == d->payloadlen &&
	    memcmp(r->payload, d->payload, d->payloadlen) == 0;
}

static int
fake_same_content(void *ctx, int64_t row, const struct delivery *d)
{
	struct fake_history *h = ctx;
	const struct fake_row *r = fake_row(h, row);

	if (fake_failed(h))
		return -1;
	return r && fake_same(r, d);
}

static int64_t
fake_topic_newest(void *ctx, const struct delivery *d)
{
	struct fake_history *h = ctx;
	int64_t best = 0;

	if (fake_failed(h))
		return -1;
	for (int64_t id = 1; fake_row(h, id); id++)
		if (!fake_row(h, id)->duplicate && strcmp(fake_row(h, id)->topic, d->topic) == 0)
			best = id;
	return best;
}

static int64_t
fake_latest_same(void *ctx, const struct delivery *d, int *mid)
{
	struct fake_history *h = ctx;
	int64_t best = 0;

	*mid = 0;
	if (fake_failed(h))
		return -1;
	for (int64_t id = 1; fake_row(h, id); id++) {
		if (!fake_row(h, id)->duplicate && fake_same(fake_row(h, id), d)) {
			best = id;
			*mid = fake_row(h, id)->mid;
		}
	}
	return best;
}

static size_t
fake_candidates(const struct fake_history *h, struct dedup_candidate **out)
{
	size_t n = 0;
	struct dedup_candidate *cand = calloc(MAX_ROWS, sizeof(*cand));

	assert_non_null(cand);
	for (; n < MAX_ROWS && h->c->cands[n].row; n++) {
		const struct fake_cand *fc = &h->c->cands[n];
		const struct fake_row *r = fake_row(h, fc->row);
		const char *hashed = fc->hashed_as ? fc->hashed_as : r->payload;

		cand[n] = (struct dedup_candidate){
			.entry = fc->row, .command = fc->row, .mid = r->mid,
			.topic_hash = dedup_hash(r->topic, strlen(r->topic)),
			.payload_hash = dedup_hash(hashed, strlen(hashed)),
			.unsent = fc->unsent,
		};
	}
	*out = cand;
	return n;
}

static struct delivery
step_delivery(const struct fake_step *s)
{
	return (struct delivery){ .topic = s->topic, .payload = s->payload,
		.payloadlen = strlen(s->payload), .qos = 1, .retain = s->retain, .dup = s->dup,
		.mid = s->mid };
}

#define ROW(t, p, m) { t, p, m, false }
#define DUP_ROW(t, p, m) { t, p, m, true }
#define CAND(r) { r, false, NULL }
#define UNSENT(r) { r, true, NULL }
/* deliveries: DUP=1, RETAIN=1, plain (DUP=0, RETAIN=0) */
#define REDELIVERED(t, p, m, want, of) { t, p, m, true, false, want, of, false }
#define REPLAYED(t, p, m, want, of) { t, p, m, false, true, want, of, false }
#define PLAIN(t, p, m, want, of, end) { t, p, m, false, false, want, of, end }

static const struct dedup_case cases[] = {
	{ "the seed of issue 11: the same reboot again after a crash, never committed",
	  true, { ROW(T_REBOOT, "reboot", 11) }, { { 0 } },
	  { REDELIVERED(T_REBOOT, "reboot", 12, DEDUP_NEW, 0) } },
	{ "the same, renumbered: no candidate, so simply new",
	  false, { ROW(T_REBOOT, "reboot", 1) }, { { 0 } },
	  { REDELIVERED(T_REBOOT, "reboot", 1, DEDUP_NEW, 0) } },
	{ "kept ids: committed rows whose PUBACK was lost come again in order, then new ones",
	  true, { ROW(T_SET, "on", 11), ROW(T_SET, "on", 12), ROW(T_SET, "on", 13) },
	  { CAND(1), CAND(2), CAND(3) },
	  { REDELIVERED(T_SET, "on", 12, DEDUP_REDELIVERY, 2),
	    REDELIVERED(T_SET, "on", 13, DEDUP_REDELIVERY, 3),
	    REDELIVERED(T_SET, "on", 14, DEDUP_NEW, 0),	/* never committed */
	    PLAIN(T_SET, "on", 15, DEDUP_NEW, 0, true) } },
	{ "kept ids: equal content with another packet id is a new command",
	  true, { ROW(T_SET, "on", 11) }, { CAND(1) },
	  { REDELIVERED(T_SET, "on", 12, DEDUP_NEW, 0) } },
	{ "renumbered: at the crash boundary the broker may have had the PUBACK: flagged",
	  false, { ROW(T_SET, "on", 3), ROW(T_SET, "off", 4) }, { CAND(1), CAND(2) },
	  { REDELIVERED(T_SET, "off", 1, DEDUP_POSSIBLE_REPEAT, 2),
	    REDELIVERED(T_SET, "on", 2, DEDUP_NEW, 0) } },
	{ "renumbered: a PUBACK that never left proves the redelivery",
	  false, { ROW(T_SET, "on", 3), ROW(T_SET, "on", 4) }, { UNSENT(1), UNSENT(2) },
	  { REDELIVERED(T_SET, "on", 1, DEDUP_REDELIVERY, 1),
	    REDELIVERED(T_SET, "on", 2, DEDUP_REDELIVERY, 2),
	    REDELIVERED(T_SET, "on", 3, DEDUP_NEW, 0) } },
	{ "renumbered: sent then unsent: the unsent one is certain, the sent one was acknowledged",
	  false, { ROW(T_SET, "a", 3), ROW(T_SET, "b", 4) }, { CAND(1), UNSENT(2) },
	  { REDELIVERED(T_SET, "b", 1, DEDUP_REDELIVERY, 2) } },
	{ "renumbered: contents out of the candidates' order are new",
	  false, { ROW(T_SET, "a", 3), ROW(T_SET, "b", 4) }, { UNSENT(1), UNSENT(2) },
	  { REDELIVERED(T_SET, "b", 1, DEDUP_NEW, 0) } },
	{ "a hash that matches but content that does not is no proof",
	  true, { ROW(T_SET, "on", 11) }, { { 1, false, "off" } },
	  { REDELIVERED(T_SET, "off", 11, DEDUP_NEW, 0) } },
	{ "kept ids: a row the broker had confirmed, sent again with its id (old snapshot): flagged",
	  true, { ROW(T_SET, "on", 7) }, { { 0 } },
	  { REDELIVERED(T_SET, "on", 7, DEDUP_POSSIBLE_REPEAT, 1) } },
	{ "retained: equal to the topic's newest accepted command is the replay",
	  true, { ROW(T_SET, "on", 1), DUP_ROW(T_SET, "on", 2) }, { { 0 } },
	  { REPLAYED(T_SET, "on", 3, DEDUP_RETAINED_REPLAY, 1) } },
	{ "retained: the topic moved on (on, off): an 'on' replay is flagged, not dropped",
	  true, { ROW(T_SET, "on", 1), ROW(T_SET, "off", 2) }, { { 0 } },
	  { REPLAYED(T_SET, "on", 3, DEDUP_POSSIBLE_REPEAT, 1) } },
	{ "retained: unseen content (a new filter) is new",
	  true, { ROW(T_REBOOT, "on", 1) }, { { 0 } },
	  { REPLAYED(T_SET, "on", 3, DEDUP_NEW, 0) } },
	{ "a retained replay does not end the redeliveries; a plain delivery does",
	  true, { ROW(T_SET, "a", 11), ROW(T_SET, "b", 12) }, { CAND(1), CAND(2) },
	  { REPLAYED(T_REBOOT, "z", 1, DEDUP_NEW, 0),
	    REDELIVERED(T_SET, "a", 11, DEDUP_REDELIVERY, 1),
	    PLAIN(T_SET, "x", 13, DEDUP_NEW, 0, true),
	    /* b is no candidate now; its id and content say "old snapshot" */
	    REDELIVERED(T_SET, "b", 12, DEDUP_POSSIBLE_REPEAT, 2) } },
	{ "a redelivered retained replay is matched as a redelivery first",
	  true, { ROW(T_SET, "on", 1), DUP_ROW(T_SET, "on", 9) }, { CAND(2) },
	  { { T_SET, "on", 9, true, true, DEDUP_REDELIVERY, 2, false } } },
};

static void
run_case(const struct dedup_case *c)
{
	struct fake_history h = { c, -1 };
	struct dedup_source src = { fake_same_content, fake_topic_newest, fake_latest_same, &h };
	struct dedup_state st = { 0 };
	struct dedup_candidate *cand;
	size_t n = fake_candidates(&h, &cand);

	assert_int_equal(dedup_connection_start(&st, c->ids_kept, cand, n), 0);
	for (int i = 0; i < MAX_ROWS && c->steps[i].topic; i++) {
		const struct fake_step *s = &c->steps[i];
		struct delivery d = step_delivery(s);
		struct dedup_verdict v;

		if (dedup_decide(&st, &src, &d, &v) != 0)
			fail_msg("%s: step %d failed", c->name, i);
		if (v.reason != s->want || v.duplicate_of != s->want_of || v.run_ended != s->want_end)
			fail_msg("%s: step %d ('%s' mid %d): got %s of %" PRId64 " (end %d), expected %s of %"
			    PRId64 " (end %d)", c->name, i, s->payload, s->mid,
			    dedup_reasons[v.reason].stats_name, v.duplicate_of, v.run_ended,
			    dedup_reasons[s->want].stats_name, s->want_of, s->want_end);
	}
	dedup_state_clear(&st);
}

TEST(test_dedup_cases)
{
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
		run_case(&cases[i]);
}

/* Every look-up may fail; the decision says so and never guesses. */
TEST(test_dedup_lookup_errors)
{
	static const struct dedup_case c = {
		"errors", true, { ROW(T_SET, "on", 11) }, { CAND(1) }, { { 0 } },
	};
	const struct fake_step steps[] = {
		REDELIVERED(T_SET, "on", 11, DEDUP_REDELIVERY, 1),	/* same_content */
		REPLAYED(T_SET, "on", 12, DEDUP_RETAINED_REPLAY, 1),	/* topic_newest */
		REDELIVERED(T_SET, "on", 12, DEDUP_POSSIBLE_REPEAT, 1),	/* latest_same */
	};

	for (size_t i = 0; i < sizeof(steps) / sizeof(steps[0]); i++) {
		struct fake_history h = { &c, 0 };
		struct dedup_source src = { fake_same_content, fake_topic_newest, fake_latest_same, &h };
		struct dedup_state st = { 0 };
		struct dedup_candidate *cand;
		size_t n = fake_candidates(&h, &cand);
		struct delivery d = step_delivery(&steps[i]);
		struct dedup_verdict v;

		assert_int_equal(dedup_connection_start(&st, c.ids_kept, cand, n), 0);
		if (i == 2)
			st.run_over = true;	/* past the candidates: only latest_same is asked */
		assert_int_equal(dedup_decide(&st, &src, &d, &v), -1);
		dedup_state_clear(&st);
	}
}

/* A connection whose start failed loaded no candidates: DUP=1 is new (it crashed once). */
TEST(test_dedup_without_candidates)
{
	static const struct dedup_case c = { "none", true, { ROW(T_SET, "on", 11) }, { { 0 } }, { { 0 } } };
	const struct fake_step step = REDELIVERED(T_SET, "on", 12, DEDUP_NEW, 0);
	struct fake_history h = { &c, -1 };
	struct dedup_source src = { fake_same_content, fake_topic_newest, fake_latest_same, &h };
	struct dedup_state st = { 0 };
	struct delivery d = step_delivery(&step);
	struct dedup_verdict v;

	assert_int_equal(dedup_decide(&st, &src, &d, &v), 0);
	assert_int_equal(v.reason, DEDUP_NEW);
}

TEST(test_dedup_reason_table)
{
	assert_null(dedup_reasons[DEDUP_NEW].name);
	assert_string_equal(dedup_reasons[DEDUP_RETAINED_REPLAY].name, "retained_replay");
	assert_string_equal(dedup_reasons[DEDUP_REDELIVERY].name, "redelivery");
	assert_string_equal(dedup_reasons[DEDUP_POSSIBLE_REPEAT].name, "possible_repeat");
	assert_true(dedup_reasons[DEDUP_NEW].accepted && dedup_reasons[DEDUP_POSSIBLE_REPEAT].accepted);
	assert_false(dedup_reasons[DEDUP_RETAINED_REPLAY].accepted || dedup_reasons[DEDUP_REDELIVERY].accepted);
	for (int i = 0; i < DEDUP_NREASONS; i++)
		assert_non_null(dedup_reasons[i].stats_name);
}

/* ------------------------------------------------------------------ */
/* store_dedup.c against a real history */

static int64_t
store_record(struct store *st, const char *payload, int mid, const struct dedup_verdict *v)
{
	struct delivery d = { .topic = T_SET, .payload = payload, .payloadlen = strlen(payload),
		.qos = 1, .mid = mid, .received_at_ms = 1000 };
	struct topic_fields f = { 0 };
	int64_t row;

	if (store_insert(st, &d, v, &f, &row) != 0 || store_unacked_add(st, row, v, mid) != 0)
		fail_msg("record %s: %s", payload, store_errmsg(st));
	return row;
}

static size_t
store_candidates(struct store *st, struct dedup_candidate **cand)
{
	size_t n;

	if (store_unacked_load(st, 3600 * 1000, cand, &n) != 0)
		fail_msg("load: %s", store_errmsg(st));
	return n;
}

TEST(test_store_unacked_lifecycle)
{
	char dir[] = "/tmp/cmdrelay-unit-dedup-XXXXXX", path[PATH_MAX], err[STORE_ERR_MAX];
	const struct dedup_verdict fresh = { .reason = DEDUP_NEW };
	struct dedup_candidate *cand;
	struct store *st;
	int64_t conn1, a, b, c;

	assert_non_null(mkdtemp(dir));
	snprintf(path, sizeof(path), "%s/history.db", dir);
	if ((st = store_new(path, false, err, sizeof(err))) == NULL)
		fail_msg("store_new: %s", err);

	/* connection 1: a, b, c recorded; PUBACKs of a and b may leave; a confirmed */
	conn1 = store_connection_start(st);
	assert_int_equal(store_begin(st), 0);
	a = store_record(st, "a", 11, &fresh);
	b = store_record(st, "b", 12, &fresh);
	assert_int_equal(store_commit(st), 0);
	assert_int_equal(store_puback_mark(st, conn1, b), 0);
	assert_int_equal(store_begin(st), 0);
	c = store_record(st, "c", 13, &fresh);
	assert_int_equal(store_unacked_confirm(st, conn1, a), 0);
	assert_int_equal(store_commit(st), 0);

	/* connection 2 sees b and c, in order; only c's PUBACK certainly never left */
	store_connection_start(st);
	assert_int_equal(store_candidates(st, &cand), 2);
	assert_int_equal(cand[0].entry, b);
	assert_int_equal(cand[0].mid, 12);
	assert_false(cand[0].unsent);
	assert_int_equal(cand[1].entry, c);
	assert_true(cand[1].unsent);
	assert_true(cand[1].payload_hash == dedup_hash("c", 1));
	free(cand);

	/* c comes again and is recorded; then a plain delivery ends the redeliveries */
	assert_int_equal(store_begin(st), 0);
	{
		struct dedup_verdict again = { .reason = DEDUP_REDELIVERY, .duplicate_of = c, .entry = c };
		store_record(st, "c", 13, &again);
	}
	assert_int_equal(store_unacked_retire(st), 0);	/* b was acknowledged */
	assert_int_equal(store_commit(st), 0);

	/* connection 3: only c, as redelivered on connection 2, under its first row */
	store_connection_start(st);
	assert_int_equal(store_candidates(st, &cand), 1);
	assert_int_equal(cand[0].entry, c);
	assert_int_equal(cand[0].command, c);
	assert_false(cand[0].unsent);	/* the mark is of connection 1 */
	free(cand);
	store_free(st);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_dedup_cases),
		cmocka_unit_test(test_dedup_lookup_errors),
		cmocka_unit_test(test_dedup_without_candidates),
		cmocka_unit_test(test_dedup_reason_table),
		cmocka_unit_test(test_store_unacked_lifecycle),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
