/* The SQLite history: schema migrations, group-committed inserts, dedup look-ups. */
#ifndef CMDRELAY_STORE_H
#define CMDRELAY_STORE_H

#include <stddef.h>
#include <stdint.h>

#include "dedup.h"
#include "topic.h"

#define STORE_ERR_MAX 512

struct store;

struct store_subscription {
	char *filter;
	int qos;
};

/* Opens (creating if needed) and migrates the history at path. */
struct store *store_new(const char *path, char *err, size_t errlen);
void store_free(struct store *st);
const char *store_errmsg(const struct store *st);
int store_schema_version(void);

int store_begin(struct store *st);
int store_commit(struct store *st);
void store_rollback(struct store *st);

/* Numbers a new broker connection; redeliveries are matched across them. */
int64_t store_connection_start(struct store *st);
const struct dedup_source *store_dedup_source(struct store *st);

int store_insert(struct store *st, const struct delivery *d,
    const struct dedup_verdict *v, const struct topic_fields *fields, int64_t *id);

/*
 * The subscriptions the broker session holds, as last confirmed by SUBACK.
 * They belong to one session (client id at a broker): under another
 * session_key the list is empty.
 */
int store_subscriptions_load(struct store *st, const char *session_key,
    struct store_subscription **out, size_t *n);
void store_subscriptions_free(struct store_subscription *subs, size_t n);
int store_subscriptions_forget(struct store *st, const char *session_key);
int store_subscription_set(struct store *st, const char *filter, int qos);
int store_subscription_del(struct store *st, const char *filter);

#endif
