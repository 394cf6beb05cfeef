/* The optional Prometheus textfile (metrics.textfile), from the stats op's numbers. */
#ifndef CMDRELAY_METRICS_H
#define CMDRELAY_METRICS_H

#include "config.h"
#include "consumer.h"
#include "event.h"

struct metrics;

/* NULL when metrics.textfile is not set (or out of memory: logged). */
struct metrics *metrics_new(struct event_loop *loop, const struct config *cfg, struct consumers *cs);
void metrics_free(struct metrics *m);

#endif
