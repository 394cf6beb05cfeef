#include "store.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>
#include <sqlite3.h>

#include "event.h"
#include "log.h"
#include "migrations.h"
#include "store_internal.h"

enum stmt_id {
	STMT_BEGIN,
	STMT_COMMIT,
	STMT_ROLLBACK,
	STMT_CONNECTION_NEXT,
	STMT_COUNT
};

static const char *const stmt_sql[STMT_COUNT] = {
	[STMT_BEGIN] = "BEGIN IMMEDIATE",
	[STMT_COMMIT] = "COMMIT",
	[STMT_ROLLBACK] = "ROLLBACK",
	[STMT_CONNECTION_NEXT] =
	    "INSERT INTO meta (key, value) VALUES ('connection', '1')"
	    " ON CONFLICT (key) DO UPDATE SET value = CAST(value AS INTEGER) + 1"
	    " RETURNING CAST(value AS INTEGER)",
};

static int store_corruption_load(struct store *st);

/* The store's files that keep their statements beside their code. */
static const struct store_sql *const store_parts[STORE_NPARTS] = {
	[STORE_PART_INGEST] = &store_ingest_sql,
	[STORE_PART_CONSUMERS] = &store_consumers_sql,
	[STORE_PART_OUTBOX] = &store_outbox_sql,
	[STORE_PART_SESSION] = &store_session_sql,
	[STORE_PART_PRUNE] = &store_prune_sql,
};

struct store {
	sqlite3 *db;
	sqlite3_stmt *stmt[STMT_COUNT];
	int64_t connection;
	bool created;		/* the file did not exist: a new, empty history */
	bool check_complete;	/* the start-up integrity check ran to its end */
	struct store_age_clock age;	/* store_clock.c */
	struct store_dedup *dedup;	/* store_dedup.c */
	sqlite3_stmt **parts[STORE_NPARTS];	/* the statements of store_parts[] */
	struct store_checkpointer *checkpointer;	/* store_checkpoint.c */
	bool corrupt;		/* SQLite said SQLITE_CORRUPT or SQLITE_NOTADB: nothing commits */
	int64_t corruptions;	/* recoveries an admin has not acknowledged (meta) */
	char corruption[STORE_ERR_MAX * 2 + PATH_MAX + 64];	/* what the last recovery did */
	char err[STORE_ERR_MAX];
};

sqlite3 *
store_db(struct store *st)
{
	return st->db;
}

int64_t
store_connection(const struct store *st)
{
	return st->connection;
}

struct store_age_clock *
store_age_clock_of(struct store *st)
{
	return &st->age;
}

struct store_dedup *
store_dedup_of(struct store *st)
{
	return st->dedup;
}

int
store_fail(struct store *st, const char *fmt, ...)
{
	char what[STORE_ERR_MAX / 2];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(what, sizeof(what), fmt, ap);
	va_end(ap);
	snprintf(st->err, sizeof(st->err), "%s: %s", what,
	    st->db ? sqlite3_errmsg(st->db) : "out of memory");
	if (st->db && store_is_corrupt_rc(sqlite3_errcode(st->db)))
		st->corrupt = true;
	return -1;
}

int
store_set_corrupt(struct store *st, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(st->err, sizeof(st->err), fmt, ap);
	va_end(ap);
	st->corrupt = true;
	return -1;
}

void
store_one_line(struct store *st)
{
	for (char *p = st->err; (p = strchr(p, '\n')) != NULL; )
		*p = ' ';
}

bool
store_corrupt(const struct store *st)
{
	return st->corrupt;
}

bool
store_check_complete(const struct store *st)
{
	return st->check_complete;
}

int64_t
store_corruptions(const struct store *st)
{
	return st->corruptions;
}

const char *
store_corruption(const struct store *st)
{
	return st->corruption;
}

const char *
store_errmsg(const struct store *st)
{
	return st->err;
}

int64_t
store_wal_bytes(const char *db_path)
{
	char wal[PATH_MAX];
	struct stat sb;

	snprintf(wal, sizeof(wal), "%s-wal", db_path);
	return stat(wal, &sb) == 0 ? sb.st_size : 0;
}

bool
store_busy(const struct store *st)
{
	int rc = sqlite3_errcode(st->db) & 0xff;

	return rc == SQLITE_BUSY || rc == SQLITE_LOCKED;
}

static int
store_schema_version(void)
{
	return migrations[nmigrations - 1].version;
}

void
store_bind_payload(sqlite3_stmt *s, int col, const void *payload, size_t len)
{
	sqlite3_bind_blob(s, col, len ? payload : "", (int)len, SQLITE_STATIC);
}

int
store_step(struct store *st, sqlite3_stmt *s, int64_t *out)
{
	int rc = sqlite3_step(s);

	if (rc == SQLITE_ROW) {
		if (out)
			*out = sqlite3_column_int64(s, 0);
		rc = sqlite3_step(s);
	} else if (out) {
		*out = 0;
	}
	sqlite3_reset(s);
	sqlite3_clear_bindings(s);
	if (rc != SQLITE_DONE)
		return store_fail(st, "%s", sqlite3_sql(s));
	return 0;
}

static int
step_int(struct store *st, enum stmt_id id, int64_t *out)
{
	return store_step(st, st->stmt[id], out);
}

static int
migrate(struct store *st)
{
	sqlite3_stmt *s;
	int version = 0, rc;

	if (sqlite3_exec(st->db, "BEGIN IMMEDIATE", NULL, NULL, NULL) != SQLITE_OK)
		return store_fail(st, "cannot start the schema migration");
	if (sqlite3_prepare_v2(st->db, "PRAGMA user_version", -1, &s, NULL) != SQLITE_OK)
		goto fail;
	if (sqlite3_step(s) == SQLITE_ROW)
		version = sqlite3_column_int(s, 0);
	sqlite3_finalize(s);
	if (version > store_schema_version()) {
		sqlite3_exec(st->db, "ROLLBACK", NULL, NULL, NULL);
		snprintf(st->err, sizeof(st->err),
		    "schema version %d is newer than this cmdrelayd knows (%d)",
		    version, store_schema_version());
		return -1;
	}
	for (size_t i = 0; i < nmigrations; i++) {
		char pragma[64];

		if (migrations[i].version <= version)
			continue;
		if (sqlite3_exec(st->db, migrations[i].sql, NULL, NULL, NULL) != SQLITE_OK) {
			store_fail(st, "migration %s", migrations[i].name);
			sqlite3_exec(st->db, "ROLLBACK", NULL, NULL, NULL);
			return -1;
		}
		snprintf(pragma, sizeof(pragma), "PRAGMA user_version = %d", migrations[i].version);
		if (sqlite3_exec(st->db, pragma, NULL, NULL, NULL) != SQLITE_OK)
			goto fail;
	}
	if ((rc = sqlite3_exec(st->db, "COMMIT", NULL, NULL, NULL)) != SQLITE_OK)
		goto fail;
	return 0;
fail:
	store_fail(st, "schema migration");
	sqlite3_exec(st->db, "ROLLBACK", NULL, NULL, NULL);
	return -1;
}

/*
 * Before anything is written: an SQLite file that is neither empty nor a
 * cmdrelay history (user_version 0 with tables of its own) is someone
 * else's, and is left as it is. Garbage fails the first read.
 */
static int
check_ours(struct store *st)
{
	sqlite3_stmt *s;
	int version = -1, tables = -1;

	if (sqlite3_prepare_v2(st->db, "SELECT (SELECT user_version FROM pragma_user_version),"
	    " (SELECT count(*) FROM sqlite_schema)", -1, &s, NULL) != SQLITE_OK)
		return store_fail(st, "cannot read it as an SQLite database");
	if (sqlite3_step(s) == SQLITE_ROW) {
		version = sqlite3_column_int(s, 0);
		tables = sqlite3_column_int(s, 1);
	}
	sqlite3_finalize(s);
	if (version < 0)
		return store_fail(st, "cannot read it as an SQLite database");
	if (version == 0 && tables > 0) {
		snprintf(st->err, sizeof(st->err), "an SQLite database, but not a cmdrelay history "
		    "(user_version 0 and %d tables of its own); refusing to change it", tables);
		return -1;
	}
	return 0;
}

bool
store_created(const struct store *st)
{
	return st->created;
}

/* Owner writes, the admins' group reads (cmdrelayctl history), others nothing. */
#define STORE_FILE_MODE 0640

/*
 * SQLite would create the file 0644 less the umask, so any local user could
 * read the commands past the socket's mode and socket.allow. Made here
 * 0640 exactly; SQLite gives -wal and -shm the mode of the database file.
 */
static int
store_create_file(struct store *st, const char *path)
{
	int fd;

	if ((fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, STORE_FILE_MODE)) == -1 ||
	    fchmod(fd, STORE_FILE_MODE) == -1) {
		snprintf(st->err, sizeof(st->err), "cannot create: %s", strerror(errno));
		if (fd != -1)
			close(fd);
		return -1;
	}
	close(fd);
	return 0;
}

static int
store_prepare(struct store *st, const char *const *sql, int n, sqlite3_stmt **out)
{
	for (int i = 0; i < n; i++) {
		if (sqlite3_prepare_v3(st->db, sql[i], -1, SQLITE_PREPARE_PERSISTENT, &out[i],
		    NULL) != SQLITE_OK)
			return store_fail(st, "cannot prepare %s", sql[i]);
	}
	return 0;
}

static void
store_finalize(sqlite3_stmt **stmt, int n)
{
	for (int i = 0; i < n; i++) {
		sqlite3_finalize(stmt[i]);
		stmt[i] = NULL;
	}
}

sqlite3_stmt *
store_stmt(struct store *st, enum store_part part, int i)
{
	return st->parts[part][i];
}

int
store_run(struct store *st, enum store_part part, int i, int64_t *out)
{
	return store_step(st, st->parts[part][i], out);
}

static int
store_open(struct store *st, const char *path)
{
	static const char setup[] =
	    "PRAGMA journal_mode = WAL;"
	    /* FULL: a commit survives power loss too, since its PUBACK follows (G1). */
	    "PRAGMA synchronous = FULL;"
	    /*
	     * Every statement runs on the event loop: an admin's short write
	     * is waited for, a long one fails the statement soon, and the
	     * caller retries later (G6) or answers storage_busy.
	     */
	    "PRAGMA busy_timeout = 100;"
	    /* A checkpointed WAL is cut back, so retention bounds the files. */
	    "PRAGMA journal_size_limit = 8388608;"
	    /* Only if the checkpoint thread cannot start (store_checkpoint.c). */
	    "PRAGMA wal_autocheckpoint = 256;";
	st->created = access(path, F_OK) == -1;
	if (st->created && store_create_file(st, path) == -1)
		return -1;
	if (sqlite3_open_v2(path, &st->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE |
	    SQLITE_OPEN_NOMUTEX, NULL) != SQLITE_OK) {
		store_fail(st, "cannot open");
		return -1;
	}
	sqlite3_extended_result_codes(st->db, 1);
	if (sqlite3_create_function(st->db, "age_clock", 0, SQLITE_UTF8, st, store_age_clock_sql,
	    NULL, NULL) != SQLITE_OK) {
		store_fail(st, "cannot set up");
		return -1;
	}
	if (check_ours(st) == -1 || store_check(st, &st->check_complete) == -1)
		return -1;
	if (sqlite3_exec(st->db, setup, NULL, NULL, NULL) != SQLITE_OK) {
		store_fail(st, "cannot set up");
		return -1;
	}
	if (migrate(st) == -1 || store_age_clock_resume(st) == -1)
		return -1;
	if (store_prepare(st, stmt_sql, STMT_COUNT, st->stmt) == -1)
		return -1;
	for (int p = 0; p < STORE_NPARTS; p++) {
		if ((st->parts[p] = calloc((size_t)store_parts[p]->n, sizeof(sqlite3_stmt *))) == NULL)
			return store_fail(st, "out of memory");
		if (store_prepare(st, store_parts[p]->sql, store_parts[p]->n, st->parts[p]) == -1)
			return -1;
	}
	if ((st->dedup = store_dedup_new(st, st->created)) == NULL)
		return -1;
	if ((st->checkpointer = store_checkpointer_start(st->db, path)) == NULL)
		log_warnx("history: no checkpoint thread; SQLite checkpoints inside commits");
	return store_corruption_load(st);
}

static void
store_close(struct store *st)
{
	/* First: the last connection to close checkpoints and removes the WAL. */
	store_checkpointer_stop(st->checkpointer);
	st->checkpointer = NULL;
	store_finalize(st->stmt, STMT_COUNT);
	for (int p = 0; p < STORE_NPARTS; p++) {
		if (st->parts[p])
			store_finalize(st->parts[p], store_parts[p]->n);
		free(st->parts[p]);
		st->parts[p] = NULL;
	}
	store_dedup_free(st->dedup);
	st->dedup = NULL;
	sqlite3_close(st->db);
	st->db = NULL;
}

/* Only a file that says it is an SQLite database is taken for a damaged history. */
static bool
store_looks_sqlite(const char *path)
{
	char head[16] = "";
	FILE *fp;
	bool yes;

	if ((fp = fopen(path, "rbe")) == NULL)
		return false;
	yes = fread(head, 1, sizeof(head), fp) == sizeof(head) &&
	    memcmp(head, "SQLite format 3", 16) == 0;
	fclose(fp);
	return yes;
}

/*
 * The damaged file goes aside, kept with its WAL; a fresh history at path
 * takes what could be read (store_salvage.c).
 */
static int
store_recover(struct store *st, const char *path)
{
	char aside[PATH_MAX], report[STORE_ERR_MAX], why[STORE_ERR_MAX];
	sqlite3_stmt *s = NULL;
	char count[24];

	snprintf(why, sizeof(why), "%s", st->err);
	store_close(st);
	if (store_move_aside(path, aside, sizeof(aside), st->err, sizeof(st->err)) == -1)
		return -1;
	st->corrupt = false;
	/* The age clock again: the salvaged rows' ages were measured on the old one. */
	if (store_open(st, path) == -1 || store_salvage(st, aside, report, sizeof(report)) == -1 ||
	    store_age_clock_resume(st) == -1)
		return -1;
	st->created = false;
	st->corruptions++;
	snprintf(st->corruption, sizeof(st->corruption), "history was corrupt (%s); moved aside to %s;"
	    " %s", why, aside, report);
	snprintf(count, sizeof(count), "%" PRId64, st->corruptions);
	if (sqlite3_prepare_v2(st->db, "INSERT OR REPLACE INTO meta (key, value) VALUES"
	    " ('corruption', ?1), ('corruptions', ?2)", -1, &s, NULL) != SQLITE_OK)
		return store_fail(st, "recording the recovery");
	sqlite3_bind_text(s, 1, st->corruption, -1, SQLITE_STATIC);
	sqlite3_bind_text(s, 2, count, -1, SQLITE_STATIC);
	if (sqlite3_step(s) != SQLITE_DONE) {
		sqlite3_finalize(s);
		return store_fail(st, "recording the recovery");
	}
	sqlite3_finalize(s);
	return 0;
}

/* A recovery stays shown, across restarts, until an admin acknowledges it. */
static int
store_corruption_load(struct store *st)
{
	sqlite3_stmt *s = NULL;
	int rc;

	if (sqlite3_prepare_v2(st->db, "SELECT key, value FROM meta WHERE key IN"
	    " ('corruption', 'corruptions')", -1, &s, NULL) != SQLITE_OK)
		return store_fail(st, "reading meta");
	while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
		const char *k = (const char *)sqlite3_column_text(s, 0);
		const char *v = (const char *)sqlite3_column_text(s, 1);

		if (strcmp(k, "corruptions") == 0)
			st->corruptions = strtoll(v, NULL, 10);
		else
			snprintf(st->corruption, sizeof(st->corruption), "%s", v);
	}
	sqlite3_finalize(s);
	return rc == SQLITE_DONE ? 0 : store_fail(st, "reading meta");
}

int
store_corruption_ack(struct store *st)
{
	if (sqlite3_exec(st->db, "DELETE FROM meta WHERE key IN ('corruption', 'corruptions')",
	    NULL, NULL, NULL) != SQLITE_OK)
		return store_fail(st, "acknowledging the corruption");
	st->corruptions = 0;
	st->corruption[0] = '\0';
	return 0;
}

struct store *
store_new(const char *path, bool recover, char *err, size_t errlen)
{
	struct store *st;

	if ((st = calloc(1, sizeof(*st))) == NULL) {
		snprintf(err, errlen, "%s: out of memory", path);
		return NULL;
	}
	if (store_open(st, path) == -1 && (!st->corrupt || !store_looks_sqlite(path) ||
	    !recover || store_recover(st, path) == -1)) {
		if (st->corrupt && !recover)
			snprintf(st->err + strlen(st->err), sizeof(st->err) - strlen(st->err),
			    "; the history is damaged and store.on_corruption is stop: move it aside"
			    " (its -wal too) or restore a copy, then start");
		goto fail;
	}
	return st;
fail:
	snprintf(err, errlen, "%s: %s", path, st->err);
	store_free(st);
	return NULL;
}

void
store_free(struct store *st)
{
	if (st == NULL)
		return;
	store_close(st);
	free(st);
}

/* Nothing is acknowledged into a history that may not give it back (G6). */
static int
store_refuse_corrupt(struct store *st)
{
	return store_set_corrupt(st, "the history is corrupt; nothing is committed until it is recovered"
	    " (restart cmdrelayd)");
}

int
store_begin(struct store *st)
{
	return st->corrupt ? store_refuse_corrupt(st) : step_int(st, STMT_BEGIN, NULL);
}

int
store_commit(struct store *st)
{
	return st->corrupt ? store_refuse_corrupt(st) : step_int(st, STMT_COMMIT, NULL);
}

void
store_rollback(struct store *st)
{
	if (!sqlite3_get_autocommit(st->db))
		step_int(st, STMT_ROLLBACK, NULL);
}

int64_t
store_connection_start(struct store *st)
{
	int64_t next;

	if (step_int(st, STMT_CONNECTION_NEXT, &next) == -1)
		return -1;
	st->connection = next;
	return next;
}

int
store_today(struct store *st, int64_t now_ms, struct store_day *day)
{
	if (store_day_count(st->db, now_ms, day) == -1)
		return store_fail(st, "counting today's rows");
	return 0;
}
