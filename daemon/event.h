/*
 * A small single-threaded event loop: file descriptors and one-shot timers
 * over ppoll(), with the caller's signals unblocked only while it sleeps.
 */
#ifndef CMDRELAY_EVENT_H
#define CMDRELAY_EVENT_H

#include <poll.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>

/*
 * Watches one loop holds: socket.max_consumers (at most 1024) clients, the
 * listening socket, the broker, the signal and notify descriptors, with room.
 */
#define EVENT_MAX_FDS 1100

struct event_loop;

typedef void event_io_fn(int fd, short revents, void *arg);
typedef void event_timer_fn(void *arg);
typedef void event_hook_fn(void *arg);

struct event_timer {
	uint64_t due_ms;	/* 0: not armed */
	event_timer_fn *fn;
	void *arg;
	struct event_timer *next;
};

struct event_loop *event_loop_new(void);
void event_loop_free(struct event_loop *loop);

/* Watches fd for events (POLLIN, POLLOUT); replaces an earlier watch of fd. */
int event_io_set(struct event_loop *loop, int fd, short events, event_io_fn *fn, void *arg);
void event_io_del(struct event_loop *loop, int fd);

void event_timer_init(struct event_timer *timer, event_timer_fn *fn, void *arg);
void event_timer_arm(struct event_loop *loop, struct event_timer *timer, uint64_t delay_ms);
void event_timer_disarm(struct event_loop *loop, struct event_timer *timer);

/* Called before every sleep, e.g. to update which events an fd waits for. */
void event_set_before_sleep(struct event_loop *loop, event_hook_fn *fn, void *arg);
/* Removes the hook if arg is the one it was set with. */
void event_clear_before_sleep(struct event_loop *loop, void *arg);

/*
 * Sleeps until an event, a timer or a signal in sleep_mask's complement
 * arrives, then runs the callbacks. Returns -1 only on a poll error.
 */
int event_loop_once(struct event_loop *loop, const sigset_t *sleep_mask);

uint64_t event_now_ms(void);	/* CLOCK_MONOTONIC */
uint64_t event_now_us(void);
uint64_t event_boot_ms(void);	/* CLOCK_BOOTTIME: counts suspend, never steps */
uint64_t event_wall_ms(void);	/* CLOCK_REALTIME, Unix ms */

#endif
