/*
 * Ingest and fetch: a delivery recorded as a row (with the topics and the
 * consumer filters it matches), and accepted commands read back for
 * consumers in id order.
 */
#include <stdlib.h>
#include <string.h>

#include <jansson.h>
#include <sqlite3.h>

#include "store_internal.h"
#include "topic.h"

enum ingest_stmt_id {
	ISTMT_INSERT,
	ISTMT_TOPIC_ADD,
	ISTMT_FILTERS,
	ISTMT_FILTER_KNOWN,
	ISTMT_FILTER_TOPIC_ADD,
	ISTMT_TOPICS_ALL,
	ISTMT_OVERSIZE,
	ISTMT_MARK_INJECTED,
	ISTMT_FETCH_FILTERED,
	ISTMT_FETCH_ALL,
	ISTMT_MAX_ID,
	ISTMT_TOPIC_LAST,
	ISTMT_COUNT
};

static const char *const ingest_sql[ISTMT_COUNT] = {
	[ISTMT_INSERT] =
	    "INSERT INTO messages (received_at, topic, payload, payload_hash, qos, retain, dup,"
	    " mid, connection, status, reason, duplicate_of, device, fields, age_ms)"
	    " VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, age_clock())",
	[ISTMT_TOPIC_ADD] = "INSERT OR IGNORE INTO topics (topic) VALUES (?1)",
	[ISTMT_FILTERS] = "SELECT DISTINCT filter FROM consumers",
	[ISTMT_FILTER_KNOWN] = "SELECT 1 FROM consumers WHERE filter = ?1 LIMIT 1",
	[ISTMT_FILTER_TOPIC_ADD] = "INSERT OR IGNORE INTO filter_topics (filter, topic) VALUES (?1, ?2)",
	[ISTMT_TOPICS_ALL] = "SELECT topic FROM topics",
	[ISTMT_OVERSIZE] = "UPDATE messages SET oversize = ?2 WHERE id = ?1",
	[ISTMT_MARK_INJECTED] = "UPDATE messages SET injected = 1 WHERE id = ?1",
	/*
	 * The unary + keeps SQLite off the (topic, payload_hash) index: walking
	 * the rowids after ?1 stops at LIMIT, while the index would read and
	 * sort every row of the topic at each fetch (measured: 66 % of a drain).
	 * ?4 bounds the rowids walked, however few of them match.
	 */
	[ISTMT_FETCH_FILTERED] =
	    "SELECT id, received_at, topic, payload, qos, retain, fields,"
	    " CASE reason WHEN 'possible_repeat' THEN duplicate_of END FROM messages"
	    " WHERE id > ?1 AND id <= ?4 AND +status = 'accepted' AND oversize IS NULL"
	    " AND +topic IN (SELECT topic FROM filter_topics WHERE filter = ?2) ORDER BY id LIMIT ?3",
	[ISTMT_FETCH_ALL] =
	    "SELECT id, received_at, topic, payload, qos, retain, fields,"
	    " CASE reason WHEN 'possible_repeat' THEN duplicate_of END FROM messages"
	    " WHERE id > ?1 AND id <= ?4 AND +status = 'accepted' AND oversize IS NULL"
	    " ORDER BY id LIMIT ?3",
	[ISTMT_MAX_ID] = "SELECT coalesce(max(id), 0) FROM messages",
	[ISTMT_TOPIC_LAST] = "UPDATE topics SET last_accepted = ?2 WHERE topic = ?1",
};

const struct store_sql store_ingest_sql = { ingest_sql, ISTMT_COUNT };

static int
store_ingest_add_filter_topic(struct store *st, const char *filter, const char *topic)
{
	sqlite3_bind_text(store_stmt(st, STORE_PART_INGEST, ISTMT_FILTER_TOPIC_ADD), 1, filter, -1, SQLITE_TRANSIENT);
	sqlite3_bind_text(store_stmt(st, STORE_PART_INGEST, ISTMT_FILTER_TOPIC_ADD), 2, topic, -1, SQLITE_TRANSIENT);
	return store_run(st, STORE_PART_INGEST, ISTMT_FILTER_TOPIC_ADD, NULL);
}

/* A topic seen for the first time: note which consumer filters match it. */
static int
store_ingest_register_topic(struct store *st, const char *topic)
{
	sqlite3_stmt *s = store_stmt(st, STORE_PART_INGEST, ISTMT_FILTERS);
	int rc;

	sqlite3_bind_text(store_stmt(st, STORE_PART_INGEST, ISTMT_TOPIC_ADD), 1, topic, -1, SQLITE_STATIC);
	if (store_run(st, STORE_PART_INGEST, ISTMT_TOPIC_ADD, NULL) == -1)
		return -1;
	if (sqlite3_changes(store_db(st)) == 0)
		return 0;
	while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
		const char *filter = (const char *)sqlite3_column_text(s, 0);
		if (topic_matches(filter, topic) && store_ingest_add_filter_topic(st, filter, topic) == -1) {
			sqlite3_reset(s);
			return -1;
		}
	}
	sqlite3_reset(s);
	return rc == SQLITE_DONE ? 0 : store_fail(st, "%s", ingest_sql[ISTMT_FILTERS]);
}

/* A filter no consumer had: note which known topics it matches. */
int
store_register_filter(struct store *st, const char *filter)
{
	sqlite3_stmt *s = store_stmt(st, STORE_PART_INGEST, ISTMT_TOPICS_ALL);
	int64_t known;
	int rc;

	sqlite3_bind_text(store_stmt(st, STORE_PART_INGEST, ISTMT_FILTER_KNOWN), 1, filter, -1, SQLITE_STATIC);
	if (store_run(st, STORE_PART_INGEST, ISTMT_FILTER_KNOWN, &known) == -1)
		return -1;
	if (known)
		return 0;
	while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
		const char *topic = (const char *)sqlite3_column_text(s, 0);
		if (topic_matches(filter, topic) && store_ingest_add_filter_topic(st, filter, topic) == -1) {
			sqlite3_reset(s);
			return -1;
		}
	}
	sqlite3_reset(s);
	return rc == SQLITE_DONE ? 0 : store_fail(st, "%s", ingest_sql[ISTMT_TOPICS_ALL]);
}

int64_t
store_last_id(struct store *st)
{
	int64_t id;

	return store_run(st, STORE_PART_INGEST, ISTMT_MAX_ID, &id) == 0 ? id : -1;
}

int
store_fetch(struct store *st, const char *filter, int64_t after_id, int64_t upto_id, int limit,
    store_command_fn *fn, void *arg)
{
	enum ingest_stmt_id id = filter ? ISTMT_FETCH_FILTERED : ISTMT_FETCH_ALL;
	sqlite3_stmt *s = store_stmt(st, STORE_PART_INGEST, id);
	int n = 0, rc;

	sqlite3_bind_int64(s, 1, after_id);
	if (filter)
		sqlite3_bind_text(s, 2, filter, -1, SQLITE_STATIC);
	sqlite3_bind_int(s, 3, limit);
	sqlite3_bind_int64(s, 4, upto_id);
	while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
		struct stored_command c = {
			.id = sqlite3_column_int64(s, 0),
			.received_at_ms = sqlite3_column_int64(s, 1),
			.topic = (const char *)sqlite3_column_text(s, 2),
			.payload = sqlite3_column_blob(s, 3),
			.payloadlen = (size_t)sqlite3_column_bytes(s, 3),
			.qos = sqlite3_column_int(s, 4),
			.retain = sqlite3_column_int(s, 5),
			.fields_json = (const char *)sqlite3_column_text(s, 6),
			.possible_repeat_of = sqlite3_column_int64(s, 7),
		};
		n++;
		if (fn(&c, arg) == -1)
			break;
	}
	sqlite3_reset(s);
	sqlite3_clear_bindings(s);
	if (rc != SQLITE_ROW && rc != SQLITE_DONE)
		return store_fail(st, "%s", ingest_sql[id]);
	return n;
}

static char *
store_ingest_fields_json(const struct topic_fields *fields)
{
	json_t *obj = json_object();
	char *text;

	if (obj == NULL)
		return NULL;
	for (size_t i = 0; i < fields->count; i++)
		json_object_set_new(obj, fields->field[i].name, json_string(fields->field[i].value));
	text = json_dumps(obj, JSON_COMPACT);
	json_decref(obj);
	return text;
}

int
store_insert(struct store *st, const struct delivery *d, const struct dedup_verdict *v,
    const struct topic_fields *fields, int64_t *id)
{
	sqlite3_stmt *s = store_stmt(st, STORE_PART_INGEST, ISTMT_INSERT);
	const struct dedup_reason_info *info = &dedup_reasons[v->reason];
	char *json = NULL;
	int64_t row;
	int rc;

	if (fields->count > 0 && (json = store_ingest_fields_json(fields)) == NULL)
		return store_fail(st, "topic fields of %s", d->topic);
	sqlite3_bind_int64(s, 1, d->received_at_ms);
	sqlite3_bind_text(s, 2, d->topic, -1, SQLITE_STATIC);
	store_bind_payload(s, 3, d->payload, d->payloadlen);
	sqlite3_bind_int64(s, 4, (int64_t)dedup_hash(d->payload, d->payloadlen));
	sqlite3_bind_int(s, 5, d->qos);
	sqlite3_bind_int(s, 6, d->retain);
	sqlite3_bind_int(s, 7, d->dup);
	sqlite3_bind_int(s, 8, d->mid);
	sqlite3_bind_int64(s, 9, store_connection(st));
	sqlite3_bind_text(s, 10, info->accepted ? "accepted" : "duplicate", -1, SQLITE_STATIC);
	if (info->name) {
		sqlite3_bind_text(s, 11, info->name, -1, SQLITE_STATIC);
		sqlite3_bind_int64(s, 12, v->duplicate_of);
	}
	sqlite3_bind_text(s, 13, topic_fields_get(fields, "device"), -1, SQLITE_STATIC);
	sqlite3_bind_text(s, 14, json, -1, SQLITE_STATIC);
	rc = store_run(st, STORE_PART_INGEST, ISTMT_INSERT, NULL);
	free(json);
	if (rc == -1)
		return -1;
	row = sqlite3_last_insert_rowid(store_db(st));
	if (id)
		*id = row;
	if (store_ingest_register_topic(st, d->topic) == -1)
		return -1;
	if (!info->accepted)
		return 0;
	sqlite3_bind_text(store_stmt(st, STORE_PART_INGEST, ISTMT_TOPIC_LAST), 1, d->topic, -1, SQLITE_STATIC);
	sqlite3_bind_int64(store_stmt(st, STORE_PART_INGEST, ISTMT_TOPIC_LAST), 2, row);
	return store_run(st, STORE_PART_INGEST, ISTMT_TOPIC_LAST, NULL);
}

int
store_mark_oversize(struct store *st, int64_t id, size_t payloadlen)
{
	sqlite3_bind_int64(store_stmt(st, STORE_PART_INGEST, ISTMT_OVERSIZE), 1, id);
	sqlite3_bind_int64(store_stmt(st, STORE_PART_INGEST, ISTMT_OVERSIZE), 2, (int64_t)payloadlen);
	return store_run(st, STORE_PART_INGEST, ISTMT_OVERSIZE, NULL);
}

int
store_mark_injected(struct store *st, int64_t row)
{
	sqlite3_bind_int64(store_stmt(st, STORE_PART_INGEST, ISTMT_MARK_INJECTED), 1, row);
	return store_run(st, STORE_PART_INGEST, ISTMT_MARK_INJECTED, NULL);
}
