#include "retention.h"

#include <inttypes.h>
#include <stdbool.h>
#include <stdlib.h>

#include "log.h"

#define IDLE_INTERVAL_MS 1000	/* when nothing was left to prune */
#define BUSY_INTERVAL_MS 1	/* between slices while a backlog remains */
#define SLICE_BUDGET_MS 5	/* the loop is ours at most this long per slice */
#define BATCH_TARGET_MS 2	/* one DELETE transaction should take about this */
#define BATCH_MIN 16
#define BATCH_MAX 4096	/* tests/test_retention.py asserts this bound */
/* How much age a reboot may forget: the age clock's save interval. */
#define AGE_SAVE_INTERVAL_MS (10 * 60 * 1000)

struct retention {
	struct event_loop *loop;
	const struct config *cfg;
	struct store *store;
	struct event_timer timer;
	int batch;
	uint64_t pruned;
	uint64_t longest_slice_ms;
	int largest_batch;	/* most rows one DELETE transaction removed */
	bool failing;		/* log a failure once, and its end */
	uint64_t saved_ms;	/* when the age clock was last saved */
	bool wal_pinned;	/* log a WAL a reader keeps growing once, and its end */
};

/* Said once when it happens and once when it is over, from the idle tick. */
static void
retention_watch_wal(struct retention *ret)
{
	int64_t wal = store_wal_bytes(ret->cfg->store.path);

	if (!ret->wal_pinned && wal > STORE_WAL_PINNED)
		log_warnx("history: the WAL is %" PRId64 " MiB: a reader (cmdrelayctl, sqlite3) holds an "
		    "old snapshot, and it grows until that reader ends", wal >> 20);
	else if (ret->wal_pinned && wal <= STORE_WAL_PINNED)
		log_info("history: the WAL is back to %" PRId64 " MiB", wal >> 20);
	ret->wal_pinned = wal > STORE_WAL_PINNED;
}

static void
retention_on_timer(void *arg)
{
	struct retention *ret = arg;
	uint64_t start = event_now_ms(), took;
	const struct store_retention keep = { .max_age_ms = ret->cfg->store.max_age_ms,
		.max_rows = ret->cfg->store.max_rows, .max_topics = ret->cfg->store.max_topics };
	int n = 0;

	do {
		uint64_t t0 = event_now_ms();
		n = store_prune(ret->store, &keep, ret->batch);
		took = event_now_ms() - t0;
		if (n < 0) {
			if (!ret->failing)
				log_warnx("retention: %s; retrying", store_errmsg(ret->store));
			ret->failing = true;
			break;
		}
		if (ret->failing)
			log_info("retention: pruning works again");
		ret->failing = false;
		ret->pruned += (uint64_t)n;
		if (n > ret->largest_batch)
			ret->largest_batch = n;
		/* Keep each transaction near BATCH_TARGET_MS whatever the disk. */
		if (took > BATCH_TARGET_MS && ret->batch > BATCH_MIN)
			ret->batch /= 2;
		else if (took < BATCH_TARGET_MS / 2 + 1 && n == ret->batch && ret->batch < BATCH_MAX)
			ret->batch *= 2;
	} while (n > 0 && event_now_ms() - start < SLICE_BUDGET_MS);
	if (start - ret->saved_ms >= AGE_SAVE_INTERVAL_MS && store_age_clock_save(ret->store) == 0)
		ret->saved_ms = start;
	if (event_now_ms() - start > ret->longest_slice_ms)
		ret->longest_slice_ms = event_now_ms() - start;
	if (n <= 0)
		retention_watch_wal(ret);
	event_timer_arm(ret->loop, &ret->timer, n > 0 ? BUSY_INTERVAL_MS : IDLE_INTERVAL_MS);
}

struct retention *
retention_new(struct event_loop *loop, const struct config *cfg, struct store *st)
{
	struct retention *ret = calloc(1, sizeof(*ret));

	if (ret == NULL)
		return NULL;
	ret->loop = loop;
	ret->cfg = cfg;
	ret->store = st;
	ret->batch = 256;
	ret->saved_ms = event_now_ms();		/* store_new saved it */
	event_timer_init(&ret->timer, retention_on_timer, ret);
	event_timer_arm(loop, &ret->timer, IDLE_INTERVAL_MS);
	return ret;
}

void
retention_free(struct retention *ret)
{
	if (ret == NULL)
		return;
	event_timer_disarm(ret->loop, &ret->timer);
	free(ret);
}

void
retention_set_config(struct retention *ret, const struct config *cfg)
{
	ret->cfg = cfg;
}

void
retention_stats(const struct retention *ret, json_t *obj)
{
	json_object_set_new(obj, "retention", json_pack("{s:I, s:I, s:I, s:I, s:I, s:i}",
	    "max_age_ms", (json_int_t)ret->cfg->store.max_age_ms,
	    "max_rows", (json_int_t)ret->cfg->store.max_rows,
	    "max_topics", (json_int_t)ret->cfg->store.max_topics,
	    "pruned", (json_int_t)ret->pruned, "longest_slice_ms", (json_int_t)ret->longest_slice_ms,
	    "largest_batch", ret->largest_batch));
}
