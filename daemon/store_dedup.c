/*
 * The history's side of the dedup rule (dedup.h): the look-ups the decision
 * makes, and the broker_unacked table, the messages the broker may still
 * hold without our PUBACK.
 *
 * A message enters broker_unacked when it is recorded and leaves when the
 * broker is shown to have its PUBACK: an answered barrier (mqtt.h) on the
 * connection that sent the PUBACK, or the end of the redeliveries of a later
 * connection that did not resend it. Until then it is a candidate for the
 * DUP=1 deliveries at the start of the next connection.
 */
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "store_internal.h"

/*
 * Packet ids are 16 bits and unique among a session's unacknowledged
 * messages, so no broker holds more than this many of ours unacknowledged;
 * the PUBACKs reach it in order, so any older entry has been acknowledged.
 */
#define UNACKED_MAX 65535

/*
 * The PUBACK mark, <history>-puback: before the PUBACKs of a commit may
 * leave, the newest row they cover is written there, without fsync. It
 * survives a crash of the process (the page cache keeps it); the boot id in
 * it says when it may not have (a power cut or a kernel crash). A row of the
 * marked connection after the mark never had its PUBACK sent, so the broker
 * must redeliver it: the one certainty a renumbering broker leaves us.
 */
#define PUBACK_MARK_LEN 96	/* fixed: boot id (36), two int64 and room */
#define BOOT_ID_LEN 36

enum dedup_stmt {
	DSTMT_SAME_CONTENT,
	DSTMT_TOPIC_NEWEST,
	DSTMT_LATEST_SAME,
	DSTMT_UNACKED_LOAD,
	DSTMT_UNACKED_ADD,
	DSTMT_UNACKED_CONFIRM,
	DSTMT_UNACKED_RETIRE,
	DSTMT_UNACKED_CAP,
	DSTMT_COUNT
};

static const char *const dedup_sql[DSTMT_COUNT] = {
	[DSTMT_SAME_CONTENT] =
	    "SELECT 1 FROM messages WHERE id = ?1 AND topic = ?2 AND payload = ?3",
	[DSTMT_TOPIC_NEWEST] = "SELECT last_accepted FROM topics WHERE topic = ?1",
	[DSTMT_LATEST_SAME] =
	    "SELECT id, mid FROM messages WHERE status = 'accepted' AND topic = ?1"
	    " AND payload_hash = ?2 AND payload = ?3 ORDER BY id DESC LIMIT 1",
	/* Newest first, so that the bound keeps the ones that can matter. */
	[DSTMT_UNACKED_LOAD] =
	    "SELECT u.entry, u.command, u.mid, m.topic, m.payload_hash, u.connection, u.last_row"
	    " FROM broker_unacked u JOIN messages m ON m.id = u.entry"
	    " WHERE u.connection < ?1 AND m.age_ms >= age_clock() - ?2 ORDER BY u.entry DESC LIMIT ?3",
	[DSTMT_UNACKED_ADD] =
	    "INSERT INTO broker_unacked (entry, command, mid, connection, last_row)"
	    " VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (entry) DO UPDATE SET"
	    " mid = excluded.mid, connection = excluded.connection, last_row = excluded.last_row",
	[DSTMT_UNACKED_CONFIRM] =
	    "DELETE FROM broker_unacked WHERE connection = ?1 AND last_row <= ?2",
	[DSTMT_UNACKED_RETIRE] = "DELETE FROM broker_unacked WHERE connection < ?1",
	[DSTMT_UNACKED_CAP] =
	    "DELETE FROM broker_unacked WHERE entry < (SELECT entry FROM broker_unacked"
	    " ORDER BY entry DESC LIMIT 1 OFFSET ?1)",
};

struct store_dedup {
	struct store *st;
	sqlite3_stmt *stmt[DSTMT_COUNT];
	struct dedup_source source;
	int mark_fd;			/* the PUBACK mark; -1: none, so no certainty */
	char boot_id[BOOT_ID_LEN + 1];	/* this boot's; empty when unknown */
};

struct store_puback_mark {
	bool parsed;		/* a mark was read, of any boot */
	bool valid;		/* written in this boot */
	int64_t connection;
	int64_t row;
};

static void
store_dedup_read_boot_id(char *out)
{
	FILE *fp = fopen("/proc/sys/kernel/random/boot_id", "re");

	out[0] = '\0';
	if (fp == NULL)
		return;
	if (fgets(out, BOOT_ID_LEN + 1, fp) == NULL || strlen(out) != BOOT_ID_LEN)
		out[0] = '\0';
	fclose(fp);
}

static void
store_dedup_open_mark(struct store_dedup *sd, bool fresh)
{
	char path[4096];
	const char *db = sqlite3_db_filename(store_db(sd->st), "main");
	struct stat st;

	sd->mark_fd = -1;
	store_dedup_read_boot_id(sd->boot_id);
	if (db == NULL || *db == '\0' || sd->boot_id[0] == '\0' ||
	    snprintf(path, sizeof(path), "%s-puback", db) >= (int)sizeof(path))
		return;
	/* New, it gets the history's mode whatever the umask (an existing one keeps its own). */
	if ((sd->mark_fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0640)) >= 0 &&
	    fstat(sd->mark_fd, &st) == 0 && st.st_size == 0)
		fchmod(sd->mark_fd, 0640);
	/* A mark left by a history that was removed says nothing of this one. */
	if (sd->mark_fd >= 0 && fresh && ftruncate(sd->mark_fd, 0) == -1) {
		close(sd->mark_fd);
		sd->mark_fd = -1;
	}
}

static struct store_puback_mark
store_dedup_read_mark(struct store_dedup *sd)
{
	struct store_puback_mark mark = { 0 };
	char text[PUBACK_MARK_LEN + 1], boot[BOOT_ID_LEN + 1];
	ssize_t n;

	if (sd->mark_fd < 0 || (n = pread(sd->mark_fd, text, PUBACK_MARK_LEN, 0)) <= 0)
		return mark;
	text[n] = '\0';
	if (sscanf(text, "%36s %" SCNd64 " %" SCNd64, boot, &mark.connection, &mark.row) == 3) {
		mark.parsed = true;
		mark.valid = strcmp(boot, sd->boot_id) == 0;
	}
	return mark;
}

/*
 * A PUBACK leaves only after its row's synced commit, so a mark (of any
 * boot: it may lag behind the history, never lead) beyond the highest id
 * the history ever gave means committed transactions are gone: a torn or
 * damaged WAL, whose frames SQLite drops from the first bad one on without
 * a word, or an older copy of the file put back.
 */
static int
store_dedup_check_mark(struct store_dedup *sd)
{
	struct store_puback_mark mark = store_dedup_read_mark(sd);
	sqlite3_stmt *s = NULL;
	int64_t highest = 0;

	if (!mark.parsed)
		return 0;
	if (sqlite3_prepare_v2(store_db(sd->st), "SELECT max(coalesce((SELECT seq FROM sqlite_sequence"
	    " WHERE name = 'messages'), 0), coalesce((SELECT max(id) FROM messages), 0))", -1, &s,
	    NULL) != SQLITE_OK)
		return store_fail(sd->st, "reading the highest id");
	if (store_step(sd->st, s, &highest) == -1) {
		sqlite3_finalize(s);
		return -1;
	}
	sqlite3_finalize(s);
	if (mark.row <= highest)
		return 0;
	return store_set_corrupt(sd->st, "the history ends at #%" PRId64 ", but commands up to #%" PRId64
	    " were acknowledged to the broker: committed transactions are lost (a torn or damaged"
	    " WAL, or an older copy of the file)", highest, mark.row);
}

int
store_puback_mark(struct store *st, int64_t connection, int64_t row)
{
	struct store_dedup *sd = store_dedup_of(st);
	char text[PUBACK_MARK_LEN];

	if (sd->mark_fd < 0)
		return 0;
	memset(text, ' ', sizeof(text));
	text[snprintf(text, sizeof(text) - 1, "%s %" PRId64 " %" PRId64, sd->boot_id, connection,
	    row)] = ' ';
	text[sizeof(text) - 1] = '\n';
	if (pwrite(sd->mark_fd, text, sizeof(text), 0) != (ssize_t)sizeof(text)) {
		/* Without the mark a later start must not claim certainty. */
		close(sd->mark_fd);
		sd->mark_fd = -1;
		return store_fail(st, "cannot write the PUBACK mark");
	}
	return 0;
}

static void
store_dedup_bind_content(sqlite3_stmt *s, int topic_col, const struct delivery *d)
{
	sqlite3_bind_text(s, topic_col, d->topic, -1, SQLITE_STATIC);
	store_bind_payload(s, topic_col + 1, d->payload, d->payloadlen);
}

static int
store_dedup_same_content(void *ctx, int64_t row, const struct delivery *d)
{
	struct store_dedup *sd = ctx;
	sqlite3_stmt *s = sd->stmt[DSTMT_SAME_CONTENT];
	int64_t found;

	sqlite3_bind_int64(s, 1, row);
	store_dedup_bind_content(s, 2, d);
	return store_step(sd->st, s, &found) == 0 ? found == 1 : -1;
}

static int64_t
store_dedup_topic_newest(void *ctx, const struct delivery *d)
{
	struct store_dedup *sd = ctx;
	sqlite3_stmt *s = sd->stmt[DSTMT_TOPIC_NEWEST];
	int64_t id;

	sqlite3_bind_text(s, 1, d->topic, -1, SQLITE_STATIC);
	return store_step(sd->st, s, &id) == 0 ? id : -1;
}

static int64_t
store_dedup_latest_same(void *ctx, const struct delivery *d, int *mid)
{
	struct store_dedup *sd = ctx;
	sqlite3_stmt *s = sd->stmt[DSTMT_LATEST_SAME];
	int64_t id = 0;
	int rc;

	sqlite3_bind_text(s, 1, d->topic, -1, SQLITE_STATIC);
	sqlite3_bind_int64(s, 2, (int64_t)dedup_hash(d->payload, d->payloadlen));
	store_bind_payload(s, 3, d->payload, d->payloadlen);
	*mid = 0;
	if ((rc = sqlite3_step(s)) == SQLITE_ROW) {
		id = sqlite3_column_int64(s, 0);
		*mid = sqlite3_column_int(s, 1);
		rc = SQLITE_DONE;
	}
	sqlite3_reset(s);
	sqlite3_clear_bindings(s);
	return rc == SQLITE_DONE ? id : store_fail(sd->st, "%s", dedup_sql[DSTMT_LATEST_SAME]);
}

struct store_dedup *
store_dedup_new(struct store *st, bool fresh)
{
	struct store_dedup *sd = calloc(1, sizeof(*sd));

	if (sd == NULL) {
		store_fail(st, "dedup look-ups");
		return NULL;
	}
	sd->st = st;
	store_dedup_open_mark(sd, fresh);
	if (store_dedup_check_mark(sd) == -1) {
		store_dedup_free(sd);
		return NULL;
	}
	for (int i = 0; i < DSTMT_COUNT; i++) {
		if (sqlite3_prepare_v3(store_db(st), dedup_sql[i], -1, SQLITE_PREPARE_PERSISTENT,
		    &sd->stmt[i], NULL) != SQLITE_OK) {
			store_fail(st, "cannot prepare %s", dedup_sql[i]);
			store_dedup_free(sd);
			return NULL;
		}
	}
	sd->source = (struct dedup_source){
		.same_content = store_dedup_same_content,
		.topic_newest = store_dedup_topic_newest,
		.latest_same = store_dedup_latest_same,
		.ctx = sd,
	};
	return sd;
}

void
store_dedup_free(struct store_dedup *sd)
{
	if (sd == NULL)
		return;
	for (int i = 0; i < DSTMT_COUNT; i++)
		sqlite3_finalize(sd->stmt[i]);
	if (sd->mark_fd >= 0)
		close(sd->mark_fd);
	free(sd);
}

const struct dedup_source *
store_dedup_source(struct store *st)
{
	return &store_dedup_of(st)->source;
}

int
store_unacked_load(struct store *st, int64_t window_ms, struct dedup_candidate **out, size_t *n)
{
	struct store_dedup *sd = store_dedup_of(st);
	sqlite3_stmt *s = sd->stmt[DSTMT_UNACKED_LOAD];
	struct dedup_candidate *cand = NULL;
	size_t count = 0, cap = 0;
	struct store_puback_mark mark = store_dedup_read_mark(sd);
	int rc;

	sqlite3_bind_int64(s, 1, store_connection(st));
	sqlite3_bind_int64(s, 2, window_ms);
	sqlite3_bind_int(s, 3, UNACKED_MAX);
	while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
		const char *topic = (const char *)sqlite3_column_text(s, 3);

		if (count == cap) {
			struct dedup_candidate *more;
			cap = cap ? 2 * cap : 16;
			if ((more = realloc(cand, cap * sizeof(*cand))) == NULL) {
				rc = SQLITE_NOMEM;
				break;
			}
			cand = more;
		}
		cand[count++] = (struct dedup_candidate){
			.entry = sqlite3_column_int64(s, 0),
			.command = sqlite3_column_int64(s, 1),
			.mid = sqlite3_column_int(s, 2),
			.topic_hash = dedup_hash(topic, strlen(topic)),
			.payload_hash = (uint64_t)sqlite3_column_int64(s, 4),
			.unsent = mark.valid && sqlite3_column_int64(s, 5) == mark.connection &&
			    sqlite3_column_int64(s, 6) > mark.row,
		};
	}
	sqlite3_reset(s);
	sqlite3_clear_bindings(s);
	if (rc != SQLITE_DONE) {
		free(cand);
		return store_fail(st, "%s", dedup_sql[DSTMT_UNACKED_LOAD]);
	}
	/* Into the broker's order: oldest first. */
	for (size_t i = 0; i < count / 2; i++) {
		struct dedup_candidate t = cand[i];
		cand[i] = cand[count - 1 - i];
		cand[count - 1 - i] = t;
	}
	*out = cand;
	*n = count;
	return 0;
}

int
store_unacked_add(struct store *st, int64_t row, const struct dedup_verdict *v, int mid)
{
	sqlite3_stmt *s = store_dedup_of(st)->stmt[DSTMT_UNACKED_ADD];
	bool accepted = dedup_reasons[v->reason].accepted;

	sqlite3_bind_int64(s, 1, v->entry ? v->entry : row);
	sqlite3_bind_int64(s, 2, accepted ? row : v->duplicate_of);
	sqlite3_bind_int(s, 3, mid);
	sqlite3_bind_int64(s, 4, store_connection(st));
	sqlite3_bind_int64(s, 5, row);
	return store_step(st, s, NULL);
}

int
store_unacked_confirm(struct store *st, int64_t connection, int64_t row)
{
	struct store_dedup *sd = store_dedup_of(st);

	sqlite3_bind_int64(sd->stmt[DSTMT_UNACKED_CONFIRM], 1, connection);
	sqlite3_bind_int64(sd->stmt[DSTMT_UNACKED_CONFIRM], 2, row);
	if (store_step(st, sd->stmt[DSTMT_UNACKED_CONFIRM], NULL) == -1)
		return -1;
	sqlite3_bind_int(sd->stmt[DSTMT_UNACKED_CAP], 1, UNACKED_MAX - 1);
	return store_step(st, sd->stmt[DSTMT_UNACKED_CAP], NULL);
}

int
store_unacked_retire(struct store *st)
{
	sqlite3_stmt *s = store_dedup_of(st)->stmt[DSTMT_UNACKED_RETIRE];

	sqlite3_bind_int64(s, 1, store_connection(st));
	return store_step(st, s, NULL);
}
