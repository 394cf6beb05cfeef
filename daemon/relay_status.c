/* The relay as it reports itself: the stats reply, the STATUS= line, today's counts. */
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <sys/stat.h>

#include "log.h"
#include "relay_internal.h"
#include "version.h"
#include "wire.h"

/* Recounts today's counts from the history when the local day is not the one counted; true then. */
bool
relay_today_recount(struct relay *r)
{
	int64_t now = (int64_t)event_wall_ms();

	if (now >= r->today.since_ms && now < r->today.until_ms)
		return false;
	if (store_today(r->store, now, &r->today) == -1)
		log_warnx("history: %s; today's counts start at 0", store_errmsg(r->store));
	return true;
}

/* A commit of c: into today's counts (the recount of a new day has it already). */
void
relay_today_add(struct relay *r, const struct relay_counters *c)
{
	if (relay_today_recount(r))
		return;
	r->today.received += c->received;
	for (int i = 0; i < DEDUP_NREASONS; i++)
		*(dedup_reasons[i].accepted ? &r->today.accepted : &r->today.duplicates) += c->by_reason[i];
	r->today.possible_repeats += c->by_reason[DEDUP_POSSIBLE_REPEAT];
}

/* The history's size on disk: the database and its WAL. */
static int64_t
relay_file_bytes(const char *db)
{
	struct stat st;

	return (stat(db, &st) == 0 ? st.st_size : 0) + store_wal_bytes(db);
}

void
relay_stats(struct relay *r, json_t *obj)
{
	bool connected = mqtt_is_connected(r->mqtt);
	char started[40], since[40];
	const struct config_endpoint *e = mqtt_endpoint(r->mqtt);
	json_t *dups = json_object(), *hosts = json_array();
	uint64_t accepted = 0;
	char hp[300];

	for (size_t i = 0; i < r->cfg->broker.nhosts; i++) {
		snprintf(hp, sizeof(hp), "%s:%d", r->cfg->broker.hosts[i].host, (int)r->cfg->broker.hosts[i].port);
		json_array_append_new(hosts, json_string(hp));
	}

	wire_time((int64_t)r->started_wall_ms, started, sizeof(started));
	wire_time((int64_t)r->connected_wall_ms, since, sizeof(since));
	json_object_set_new(obj, "version", json_string(CMDRELAY_VERSION));
	json_object_set_new(obj, "started_at", json_string(started));
	json_object_set_new(obj, "uptime_seconds",
	    json_integer((json_int_t)((event_now_ms() - r->started_mono_ms) / 1000)));
	json_object_set_new(obj, "broker", json_pack("{s:s, s:i, s:s, s:s, s:b, s:s?, s:o?, s:s, s:o, s:s?}",
	    "host", e->host, "port", (int)e->port,
	    "protocol", mqtt_protocol(r->mqtt), "client_id", r->cfg->broker.client_id,
	    "connected", connected, "connected_since", connected ? since : NULL,
	    "session_present", connected ? json_boolean(r->session_present) : NULL,
	    "last_error", mqtt_last_error(r->mqtt), "hosts", hosts,
	    "left", *mqtt_left(r->mqtt) ? mqtt_left(r->mqtt) : NULL));
	for (int i = 0; i < DEDUP_NREASONS; i++) {
		if (dedup_reasons[i].accepted)
			accepted += r->total.by_reason[i];
		else
			json_object_set_new(dups, dedup_reasons[i].stats_name,
			    json_integer((json_int_t)r->total.by_reason[i]));
	}
	relay_today_recount(r);
	json_object_set_new(obj, "today", wire_day(&r->today));
	json_object_set_new(obj, "received", json_integer((json_int_t)r->total.received));
	json_object_set_new(obj, "accepted", json_integer((json_int_t)accepted));
	json_object_set_new(obj, "possible_repeats",
	    json_integer((json_int_t)r->total.by_reason[DEDUP_POSSIBLE_REPEAT]));
	json_object_set_new(obj, "duplicates", dups);
	json_object_set_new(obj, "oversized", json_integer((json_int_t)r->total.oversized));
	json_object_set_new(obj, "session_lost", json_integer((json_int_t)r->session_lost));
	json_object_set_new(obj, "commit_failures", json_integer((json_int_t)r->total.commit_failures));
	json_object_set_new(obj, "last_commit_seconds", json_real((double)r->last_commit_us / 1e6));
	json_object_set_new(obj, "database_bytes", json_integer((json_int_t)relay_file_bytes(r->cfg->store.path)));
	json_object_set_new(obj, "wal_bytes", json_integer((json_int_t)store_wal_bytes(r->cfg->store.path)));
	json_object_set_new(obj, "store_corrupt", json_boolean(store_corrupt(r->store)));
	json_object_set_new(obj, "store_corruptions", json_integer((json_int_t)store_corruptions(r->store)));
	json_object_set_new(obj, "store_corruption", json_string(store_corruption(r->store)));
	uplink_stats(r->uplink, obj);
}

/* Appends to the STATUS= line; what does not fit is cut, the alarms in front kept. */
static void __attribute__((format(printf, 4, 5)))
relay_status_append(char *buf, size_t len, size_t *n, const char *fmt, ...)
{
	va_list ap;
	int added;

	if (*n + 1 >= len)
		return;
	va_start(ap, fmt);
	added = vsnprintf(buf + *n, len - *n, fmt, ap);
	va_end(ap);
	if (added > 0)
		*n = *n + (size_t)added < len ? *n + (size_t)added : len - 1;
}

void
relay_status(struct relay *r, char *buf, size_t len)
{
	const struct config_endpoint *e = mqtt_endpoint(r->mqtt);
	const char *err = mqtt_last_error(r->mqtt);
	bool connected = mqtt_is_connected(r->mqtt);
	char since[40];
	size_t n = 0;
	int64_t wal;

	buf[0] = '\0';
	if (store_corrupt(r->store) || store_corruptions(r->store) > 0)
		relay_status_append(buf, len, &n, "%s; ", store_corrupt(r->store) ?
		    "HISTORY CORRUPT, nothing is acknowledged" :
		    "history recovered from corruption (cmdrelayctl store ack-corruption)");
	if (connected)
		relay_status_append(buf, len, &n, "connected to %s:%d", e->host, (int)e->port);
	else
		relay_status_append(buf, len, &n, "disconnected%s %s:%d%s%s%s",
		    r->cfg->broker.nhosts > 1 ? ", trying" : " from", e->host,
		    (int)e->port, *err ? " (" : "", err, *err ? ")" : "");
	if (*mqtt_left(r->mqtt))
		relay_status_append(buf, len, &n, "; left %s", mqtt_left(r->mqtt));
	if (connected) {
		wire_time((int64_t)r->connected_wall_ms, since, sizeof(since));
		relay_status_append(buf, len, &n, "; since %s, session %s", since,
		    r->session_present ? "present" : "new");
	}
	if (r->session_lost_now)
		relay_status_append(buf, len, &n, "; SESSION LOST: commands queued while away may be lost");
	if ((wal = store_wal_bytes(r->cfg->store.path)) > STORE_WAL_PINNED)
		relay_status_append(buf, len, &n, "; WAL %" PRId64 " MiB: a reader pins it", wal >> 20);
	relay_today_recount(r);
	relay_status_append(buf, len, &n, "; today %" PRIu64 " accepted, %" PRIu64 " duplicates, %" PRIu64
	    " possible repeats; since start %" PRIu64 " received, %" PRIu64 " accepted",
	    r->today.accepted, r->today.duplicates, r->today.possible_repeats, r->total.received,
	    r->total.by_reason[DEDUP_NEW] + r->total.by_reason[DEDUP_POSSIBLE_REPEAT]);
}
