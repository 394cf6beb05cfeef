/*
 * The uplink: local programs' publications, committed to the outbox first,
 * handed to the broker connection in order while it is up, and marked sent
 * when the broker acknowledged them.
 */
#ifndef CMDRELAY_UPLINK_H
#define CMDRELAY_UPLINK_H

#include <jansson.h>

#include "mqtt.h"
#include "store.h"

/* Publications handed to libmosquitto and not yet acknowledged, at most. */
#define UPLINK_WINDOW 64

struct uplink;

struct uplink *uplink_new(struct store *st);
void uplink_free(struct uplink *u);
/* A new broker connection object: nothing has been handed to it yet. */
void uplink_attach(struct uplink *u, struct mqtt *m);
void uplink_connected(struct uplink *u);
void uplink_disconnected(struct uplink *u);
/* Something was queued: send it if we can. */
void uplink_kick(struct uplink *u);
void uplink_published(struct uplink *u, int mid);
void uplink_stats(const struct uplink *u, json_t *obj);

#endif
