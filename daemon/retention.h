/*
 * Retention: store.retention.max_age and max_rows, enforced in small
 * batches from the event loop so that ingestion never waits long.
 */
#ifndef CMDRELAY_RETENTION_H
#define CMDRELAY_RETENTION_H

#include <stdint.h>

#include <jansson.h>

#include "config.h"
#include "event.h"
#include "store.h"

struct retention;

struct retention *retention_new(struct event_loop *loop, const struct config *cfg, struct store *st);
void retention_free(struct retention *ret);
void retention_set_config(struct retention *ret, const struct config *cfg);
/* Adds "retention": limits, rows pruned, the longest slice the loop spent. */
void retention_stats(const struct retention *ret, json_t *obj);

#endif
