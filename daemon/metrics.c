#include "metrics.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "log.h"
#include "version.h"

struct metrics {
	struct event_loop *loop;
	const struct config *cfg;
	struct consumers *consumers;
	struct event_timer timer;
	bool failing;
};

/* One metric family: HELP, TYPE and the value found at a path of the stats. */
struct metric {
	const char *name, *type, *help;
	const char *key, *subkey;	/* stats[key] or stats[key][subkey] */
};

static const struct metric metrics_table[] = {
	{ "cmdrelay_received_total", "counter", "Deliveries received from the broker.", "received", NULL },
	{ "cmdrelay_accepted_total", "counter", "Deliveries accepted as new commands.", "accepted", NULL },
	{ "cmdrelay_possible_repeats_total", "counter", "Accepted deliveries flagged possible_repeat.",
	  "possible_repeats", NULL },
	{ "cmdrelay_session_lost_total", "counter", "Connects on which the broker had dropped the session.",
	    "session_lost", NULL },
	{ "cmdrelay_commit_failures_total", "counter", "History commits that failed.", "commit_failures", NULL },
	{ "cmdrelay_store_corruptions_total", "counter",
	    "Damaged histories moved aside and recovered, not yet acknowledged by an admin.",
	    "store_corruptions", NULL },
	{ "cmdrelay_broker_connected", "gauge", "1 while the broker connection is up.", "broker", "connected" },
	{ "cmdrelay_database_bytes", "gauge", "Size of the history and its WAL.", "database_bytes", NULL },
	{ "cmdrelay_wal_bytes", "gauge", "Size of the history's WAL; large while a reader pins it.",
	  "wal_bytes", NULL },
	{ "cmdrelay_oversized_total", "counter", "Deliveries over store.max_payload, kept without payload.",
	  "oversized", NULL },
	{ "cmdrelay_last_commit_seconds", "gauge", "Duration of the last history commit.", "last_commit_seconds", NULL },
	{ "cmdrelay_retention_pruned_total", "counter", "Rows removed by retention.", "retention", "pruned" },
	{ "cmdrelay_consumer_connections", "gauge", "Open consumer socket connections.", "connections", NULL },
};

static void
metrics_print_value(FILE *fp, const char *name, const char *labels, json_t *v)
{
	if (json_is_real(v))
		fprintf(fp, "%s%s %.6f\n", name, labels, json_real_value(v));
	else if (json_is_boolean(v))
		fprintf(fp, "%s%s %d\n", name, labels, json_is_true(v));
	else
		fprintf(fp, "%s%s %" JSON_INTEGER_FORMAT "\n", name, labels, json_integer_value(v));
}

static void
metrics_render(FILE *fp, json_t *stats)
{
	json_t *dups = json_object_get(stats, "duplicates"), *consumers = json_object_get(stats, "consumers");
	json_t *c;
	size_t i;

	for (i = 0; i < sizeof(metrics_table) / sizeof(metrics_table[0]); i++) {
		const struct metric *m = &metrics_table[i];
		json_t *v = json_object_get(stats, m->key);
		if (m->subkey)
			v = json_object_get(v, m->subkey);
		fprintf(fp, "# HELP %s %s\n# TYPE %s %s\n", m->name, m->help, m->name, m->type);
		metrics_print_value(fp, m->name, "", v);
	}
	/* build_info: the constant-1 gauge whose labels carry the version */
	fprintf(fp, "# HELP cmdrelay_build_info The running cmdrelayd's version.\n"
	    "# TYPE cmdrelay_build_info gauge\ncmdrelay_build_info{version=\"%s\"} 1\n", CMDRELAY_VERSION);
	fputs("# HELP cmdrelay_duplicates_total Deliveries recorded as repeats, by reason.\n"
	    "# TYPE cmdrelay_duplicates_total counter\n", fp);
	metrics_print_value(fp, "cmdrelay_duplicates_total", "{reason=\"retained_replay\"}",
	    json_object_get(dups, "retained_replay"));
	metrics_print_value(fp, "cmdrelay_duplicates_total", "{reason=\"redelivery\"}",
	    json_object_get(dups, "redelivery"));
	fputs("# HELP cmdrelay_consumer_lag Accepted commands a named consumer has not acknowledged.\n"
	    "# TYPE cmdrelay_consumer_lag gauge\n", fp);
	/* Consumer names are [A-Za-z0-9._-]: nothing to escape in a label. */
	json_array_foreach(consumers, i, c) {
		char labels[128];
		snprintf(labels, sizeof(labels), "{consumer=\"%s\"}", json_string_value(json_object_get(c, "name")));
		metrics_print_value(fp, "cmdrelay_consumer_lag", labels, json_object_get(c, "lag"));
	}
}

/* Written to a temporary file and renamed, so readers never see half of it. */
static int
metrics_write_textfile(struct metrics *m, json_t *stats)
{
	const char *path = m->cfg->metrics.textfile;
	char tmp[PATH_MAX + 32];
	FILE *fp;

	snprintf(tmp, sizeof(tmp), "%s.%d.tmp", path, (int)getpid());
	if ((fp = fopen(tmp, "we")) == NULL)
		return -1;
	metrics_render(fp, stats);
	/* metrics.mode, not the umask: the unit's UMask= would keep node_exporter out */
	if (fchmod(fileno(fp), (mode_t)m->cfg->metrics.mode) == -1 || fflush(fp) != 0 || ferror(fp) || fsync(fileno(fp)) == -1) {
		int saved = errno;
		fclose(fp);
		unlink(tmp);
		errno = saved;
		return -1;
	}
	if (fclose(fp) != 0 || rename(tmp, path) == -1) {
		int saved = errno;
		unlink(tmp);
		errno = saved;
		return -1;
	}
	return 0;
}

static void
metrics_on_timer(void *arg)
{
	struct metrics *m = arg;
	json_t *stats = consumers_stats(m->consumers);

	if (stats && metrics_write_textfile(m, stats) == -1) {
		if (!m->failing)
			log_warn("metrics.textfile %s", m->cfg->metrics.textfile);
		m->failing = true;
	} else if (stats) {
		m->failing = false;
	}
	json_decref(stats);
	event_timer_arm(m->loop, &m->timer, (uint64_t)m->cfg->metrics.interval_ms);
}

struct metrics *
metrics_new(struct event_loop *loop, const struct config *cfg, struct consumers *cs)
{
	struct metrics *m;

	if (cfg->metrics.textfile == NULL)
		return NULL;
	if ((m = calloc(1, sizeof(*m))) == NULL) {
		log_warnx("metrics: out of memory; no textfile");
		return NULL;
	}
	m->loop = loop;
	m->cfg = cfg;
	m->consumers = cs;
	event_timer_init(&m->timer, metrics_on_timer, m);
	event_timer_arm(loop, &m->timer, 0);
	return m;
}

void
metrics_free(struct metrics *m)
{
	if (m == NULL)
		return;
	event_timer_disarm(m->loop, &m->timer);
	free(m);
}
