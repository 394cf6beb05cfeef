/*
 * The WAL checkpoint, off the event loop. SQLite's automatic checkpoint runs
 * inside the commit that crosses wal_autocheckpoint: the relay's loop then
 * waits for the copy into the database and its fsync, and every command in
 * flight waits with it (the p99 at 1,000/s). Here the commit only wakes a
 * thread with its own connection, which runs a PASSIVE checkpoint; that
 * never blocks the writer (WAL mode lets one writer and one checkpointer
 * work at once), and the next transaction after a complete checkpoint
 * starts the WAL from its beginning again, cut to journal_size_limit.
 */
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdlib.h>

#include "store_internal.h"

/* store.c's wal_autocheckpoint, as before: a WAL of about 1 MiB. */
#define CHECKPOINT_FRAMES 256
/*
 * The bound: the WAL starts again from its beginning only when a write
 * transaction begins after everything in it was copied, which a writer that
 * never pauses (a drain) rarely lets the thread see. From 4 MiB of 4 KiB
 * pages on, the commit checkpoints itself, as SQLite did at 1 MiB; the
 * thread has copied most of it already. That fails (busy) while the thread
 * is in a checkpoint, and the commits meanwhile grow the WAL: the other
 * 4 MiB below journal_size_limit (8 MiB) are their room (6 MiB was not
 * enough: 9 MiB measured in a drain of 20,000). A reader holding an old
 * snapshot keeps the WAL growing either way.
 */
#define CHECKPOINT_BACKSTOP_FRAMES 1024

struct store_checkpointer {
	pthread_t thread;
	pthread_mutex_t lock;
	pthread_cond_t wake;
	bool wanted;		/* a commit crossed CHECKPOINT_FRAMES */
	bool stop;
	sqlite3 *db;		/* the thread's own connection */
	sqlite3 *writer;	/* the event loop's, whose commits wake us */
};

static void *
store_checkpoint_run(void *arg)
{
	struct store_checkpointer *cp = arg;

	pthread_mutex_lock(&cp->lock);
	for (;;) {
		while (!cp->wanted && !cp->stop)
			pthread_cond_wait(&cp->wake, &cp->lock);
		if (cp->stop)
			break;
		cp->wanted = false;
		pthread_mutex_unlock(&cp->lock);
		/* Busy (another checkpoint) or cut short by a reader: the next commit asks again. */
		sqlite3_wal_checkpoint_v2(cp->db, NULL, SQLITE_CHECKPOINT_PASSIVE, NULL, NULL);
		pthread_mutex_lock(&cp->lock);
	}
	pthread_mutex_unlock(&cp->lock);
	return NULL;
}

/* Called by SQLite after each commit, on the event loop, with the WAL's length. */
static int
store_checkpoint_hook(void *arg, sqlite3 *db, const char *name, int frames)
{
	struct store_checkpointer *cp = arg;

	if (frames >= CHECKPOINT_BACKSTOP_FRAMES) {
		sqlite3_wal_checkpoint_v2(db, name, SQLITE_CHECKPOINT_PASSIVE, NULL, NULL);
	} else if (frames >= CHECKPOINT_FRAMES) {
		pthread_mutex_lock(&cp->lock);
		cp->wanted = true;
		pthread_cond_signal(&cp->wake);
		pthread_mutex_unlock(&cp->lock);
	}
	return SQLITE_OK;
}

struct store_checkpointer *
store_checkpointer_start(sqlite3 *writer, const char *path)
{
	struct store_checkpointer *cp;
	sigset_t all, old;
	int rc;

	if ((cp = calloc(1, sizeof(*cp))) == NULL)
		return NULL;
	cp->writer = writer;
	/* exec opens the WAL, which a checkpoint on a fresh connection needs. */
	if (sqlite3_open_v2(path, &cp->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, NULL) != SQLITE_OK ||
	    sqlite3_exec(cp->db, "SELECT 1 FROM sqlite_master LIMIT 1", NULL, NULL, NULL) != SQLITE_OK)
		goto fail;
	pthread_mutex_init(&cp->lock, NULL);
	pthread_cond_init(&cp->wake, NULL);
	/* Signals stay the event loop's. */
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	rc = pthread_create(&cp->thread, NULL, store_checkpoint_run, cp);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (rc != 0) {
		pthread_cond_destroy(&cp->wake);
		pthread_mutex_destroy(&cp->lock);
		goto fail;
	}
	pthread_setname_np(cp->thread, "checkpoint");
	sqlite3_wal_hook(writer, store_checkpoint_hook, cp);
	return cp;
fail:
	sqlite3_close(cp->db);
	free(cp);
	return NULL;
}

void
store_checkpointer_stop(struct store_checkpointer *cp)
{
	if (cp == NULL)
		return;
	sqlite3_wal_hook(cp->writer, NULL, NULL);
	pthread_mutex_lock(&cp->lock);
	cp->stop = true;
	pthread_cond_signal(&cp->wake);
	pthread_mutex_unlock(&cp->lock);
	pthread_join(cp->thread, NULL);
	pthread_cond_destroy(&cp->wake);
	pthread_mutex_destroy(&cp->lock);
	sqlite3_close(cp->db);
	free(cp);
}
