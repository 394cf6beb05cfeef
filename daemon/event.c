#include "event.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct io_watch {
	event_io_fn *fn;
	void *arg;
};

struct event_loop {
	struct pollfd pfd[EVENT_MAX_FDS];
	struct io_watch watch[EVENT_MAX_FDS];
	int nfds;
	struct event_timer *timers;
	event_hook_fn *before_sleep;
	void *before_sleep_arg;
};

static uint64_t
clock_us(clockid_t clock)
{
	struct timespec ts;

	clock_gettime(clock, &ts);
	return (uint64_t)ts.tv_sec * 1000000 + (uint64_t)ts.tv_nsec / 1000;
}

uint64_t
event_now_ms(void)
{
	return clock_us(CLOCK_MONOTONIC) / 1000;
}

uint64_t
event_now_us(void)
{
	return clock_us(CLOCK_MONOTONIC);
}

uint64_t
event_boot_ms(void)
{
	return clock_us(CLOCK_BOOTTIME) / 1000;
}

uint64_t
event_wall_ms(void)
{
	return clock_us(CLOCK_REALTIME) / 1000;
}

struct event_loop *
event_loop_new(void)
{
	return calloc(1, sizeof(struct event_loop));
}

void
event_loop_free(struct event_loop *loop)
{
	free(loop);
}

static int
find_fd(const struct event_loop *loop, int fd)
{
	for (int i = 0; i < loop->nfds; i++)
		if (loop->pfd[i].fd == fd)
			return i;
	return -1;
}

int
event_io_set(struct event_loop *loop, int fd, short events, event_io_fn *fn, void *arg)
{
	int i = find_fd(loop, fd);

	if (i == -1) {
		if (loop->nfds == EVENT_MAX_FDS) {
			errno = EMFILE;
			return -1;
		}
		i = loop->nfds++;
	}
	loop->pfd[i] = (struct pollfd){ .fd = fd, .events = events };
	loop->watch[i] = (struct io_watch){ .fn = fn, .arg = arg };
	return 0;
}

void
event_io_del(struct event_loop *loop, int fd)
{
	int i = find_fd(loop, fd);

	if (i == -1)
		return;
	loop->nfds--;
	loop->pfd[i] = loop->pfd[loop->nfds];
	loop->watch[i] = loop->watch[loop->nfds];
}

void
event_timer_init(struct event_timer *timer, event_timer_fn *fn, void *arg)
{
	*timer = (struct event_timer){ .fn = fn, .arg = arg };
}

void
event_timer_disarm(struct event_loop *loop, struct event_timer *timer)
{
	for (struct event_timer **t = &loop->timers; *t; t = &(*t)->next) {
		if (*t == timer) {
			*t = timer->next;
			break;
		}
	}
	timer->due_ms = 0;
	timer->next = NULL;
}

void
event_timer_arm(struct event_loop *loop, struct event_timer *timer, uint64_t delay_ms)
{
	event_timer_disarm(loop, timer);
	timer->due_ms = event_now_ms() + delay_ms;
	if (timer->due_ms == 0)
		timer->due_ms = 1;
	timer->next = loop->timers;
	loop->timers = timer;
}

void
event_set_before_sleep(struct event_loop *loop, event_hook_fn *fn, void *arg)
{
	loop->before_sleep = fn;
	loop->before_sleep_arg = arg;
}

void
event_clear_before_sleep(struct event_loop *loop, void *arg)
{
	if (loop->before_sleep_arg == arg)
		event_set_before_sleep(loop, NULL, NULL);
}

static void
run_due_timers(struct event_loop *loop)
{
	uint64_t now = event_now_ms();
	struct event_timer *t;

	/* A callback may re-arm or disarm timers, so search again after each. */
	for (;;) {
		for (t = loop->timers; t && t->due_ms > now; t = t->next)
			;
		if (t == NULL)
			return;
		event_timer_disarm(loop, t);
		t->fn(t->arg);
	}
}

int
event_loop_once(struct event_loop *loop, const sigset_t *sleep_mask)
{
	struct io_watch ready[EVENT_MAX_FDS];
	int ready_fd[EVENT_MAX_FDS];
	short ready_ev[EVENT_MAX_FDS];
	struct timespec ts, *tsp = NULL;
	int n, nready = 0;

	if (loop->before_sleep)
		loop->before_sleep(loop->before_sleep_arg);
	if (loop->timers) {
		uint64_t now = event_now_ms(), next = UINT64_MAX;
		for (struct event_timer *t = loop->timers; t; t = t->next)
			if (t->due_ms < next)
				next = t->due_ms;
		next = next > now ? next - now : 0;
		ts.tv_sec = (time_t)(next / 1000);
		ts.tv_nsec = (long)(next % 1000) * 1000000;
		tsp = &ts;
	}
	n = ppoll(loop->pfd, (nfds_t)loop->nfds, tsp, sleep_mask);
	if (n == -1)
		return errno == EINTR ? 0 : -1;
	/* Callbacks may add or remove watches: act on a snapshot. */
	for (int i = 0; i < loop->nfds && nready < n; i++) {
		if (loop->pfd[i].revents == 0)
			continue;
		ready_fd[nready] = loop->pfd[i].fd;
		ready_ev[nready] = loop->pfd[i].revents;
		ready[nready++] = loop->watch[i];
	}
	for (int i = 0; i < nready; i++) {
		int j = find_fd(loop, ready_fd[i]);
		if (j != -1 && loop->watch[j].fn == ready[i].fn && loop->watch[j].arg == ready[i].arg)
			ready[i].fn(ready_fd[i], ready_ev[i], ready[i].arg);
	}
	run_due_timers(loop);
	return 0;
}
