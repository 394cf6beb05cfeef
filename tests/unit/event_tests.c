/*
 * Unit tests of event.c: timers fire once, in time, and can be disarmed
 * from a callback; watches survive callbacks that change them; the fd
 * limit is an error, not an overflow.
 */
#include "unit.h"

#include <errno.h>
#include <signal.h>
#include <unistd.h>

#include "event.h"

struct counter {
	struct event_loop *loop;
	struct event_timer *other;	/* disarmed by the callback, when set */
	int other_fd;			/* unwatched by the callback, when >= 0 */
	int calls;
	short revents;
};

static void
count_timer(void *arg)
{
	struct counter *c = arg;

	c->calls++;
	if (c->other)
		event_timer_disarm(c->loop, c->other);
}

static void
count_io(int fd, short revents, void *arg)
{
	struct counter *c = arg;
	char buf[16];

	c->calls++;
	c->revents = revents;
	if (read(fd, buf, sizeof(buf)) < 0)
		fail_msg("read: errno %d", errno);
	if (c->other_fd >= 0)
		event_io_del(c->loop, c->other_fd);
}

static void
run_once(struct event_loop *loop)
{
	sigset_t none;

	sigemptyset(&none);
	assert_int_equal(event_loop_once(loop, &none), 0);
}

TEST(test_timer_fires_once_after_its_delay)
{
	struct event_loop *loop = event_loop_new();
	struct counter c = { .loop = loop, .other_fd = -1 };
	struct event_timer t;
	uint64_t start = event_now_ms();

	event_timer_init(&t, count_timer, &c);
	event_timer_arm(loop, &t, 30);
	event_timer_arm(loop, &t, 50);		/* re-arming replaces, never doubles */
	while (c.calls == 0)
		run_once(loop);
	assert_true(event_now_ms() - start >= 50);
	assert_int_equal(c.calls, 1);
	assert_int_equal(t.due_ms, 0);
	event_timer_arm(loop, &t, 0);
	event_timer_disarm(loop, &t);
	event_timer_disarm(loop, &t);		/* twice is harmless */
	event_timer_arm(loop, &(struct event_timer){ .fn = count_timer, .arg = &c }, 0);
	run_once(loop);
	assert_int_equal(c.calls, 2);		/* only the other one fired */
	event_loop_free(loop);
}

TEST(test_a_callback_may_disarm_a_due_timer)
{
	struct event_loop *loop = event_loop_new();
	struct counter a = { .loop = loop, .other_fd = -1 }, b = { .loop = loop, .other_fd = -1 };
	struct event_timer ta, tb;

	event_timer_init(&ta, count_timer, &a);
	event_timer_init(&tb, count_timer, &b);
	event_timer_arm(loop, &tb, 0);
	event_timer_arm(loop, &ta, 0);		/* the newest is looked at first */
	a.other = &tb;
	run_once(loop);
	assert_int_equal(a.calls + b.calls, 1);
	event_timer_disarm(loop, &ta);
	event_timer_disarm(loop, &tb);
	event_loop_free(loop);
}

TEST(test_io_and_a_callback_that_unwatches_another)
{
	struct event_loop *loop = event_loop_new();
	struct counter a = { .loop = loop, .other_fd = -1 }, b = { .loop = loop, .other_fd = -1 };
	int p1[2], p2[2];

	assert_int_equal(pipe(p1), 0);
	assert_int_equal(pipe(p2), 0);
	assert_int_equal(event_io_set(loop, p1[0], POLLIN, count_io, &a), 0);
	assert_int_equal(event_io_set(loop, p2[0], POLLIN, count_io, &b), 0);
	assert_int_equal(write(p1[1], "x", 1), 1);
	run_once(loop);
	assert_int_equal(a.calls, 1);
	assert_int_equal(a.revents & POLLIN, POLLIN);
	assert_int_equal(b.calls, 0);
	/* both ready; whichever runs first unwatches the other, which must not run */
	a.other_fd = p2[0];
	b.other_fd = p1[0];
	assert_int_equal(write(p1[1], "x", 1), 1);
	assert_int_equal(write(p2[1], "x", 1), 1);
	run_once(loop);
	assert_int_equal(a.calls + b.calls, 2);
	close(p1[0]);
	close(p1[1]);
	close(p2[0]);
	close(p2[1]);
	event_loop_free(loop);
}

TEST(test_fd_limit_is_an_error)
{
	struct event_loop *loop = event_loop_new();
	struct counter c = { .loop = loop, .other_fd = -1 };

	/* numbers only: nothing polls them */
	for (int i = 0; i < EVENT_MAX_FDS; i++)
		assert_int_equal(event_io_set(loop, 100000 + i, POLLIN, count_io, &c), 0);
	assert_int_equal(event_io_set(loop, 100000, POLLOUT, count_io, &c), 0);	/* a change */
	errno = 0;
	assert_int_equal(event_io_set(loop, 99999, POLLIN, count_io, &c), -1);
	assert_int_equal(errno, EMFILE);
	event_io_del(loop, 100000 + 7);
	assert_int_equal(event_io_set(loop, 99999, POLLIN, count_io, &c), 0);
	event_loop_free(loop);
}

static void
count_hook(void *arg)
{
	(*(int *)arg)++;
}

TEST(test_before_sleep_hook)
{
	struct event_loop *loop = event_loop_new();
	int calls = 0, other = 0;

	event_set_before_sleep(loop, count_hook, &calls);
	event_timer_arm(loop, &(struct event_timer){ .fn = count_hook, .arg = &other }, 0);
	run_once(loop);
	assert_int_equal(calls, 1);
	event_clear_before_sleep(loop, &other);		/* not its argument: stays */
	event_timer_arm(loop, &(struct event_timer){ .fn = count_hook, .arg = &other }, 0);
	run_once(loop);
	assert_int_equal(calls, 2);
	event_clear_before_sleep(loop, &calls);
	event_timer_arm(loop, &(struct event_timer){ .fn = count_hook, .arg = &other }, 0);
	run_once(loop);
	assert_int_equal(calls, 2);
	assert_int_equal(other, 3);
	event_loop_free(loop);
}

TEST(test_clocks)
{
	uint64_t mono = event_now_ms(), us = event_now_us();

	assert_true(us / 1000 >= mono);
	assert_true(event_boot_ms() >= mono);	/* BOOTTIME counts suspend too */
	assert_true(event_wall_ms() > 1500000000000ULL);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_timer_fires_once_after_its_delay),
		cmocka_unit_test(test_a_callback_may_disarm_a_due_timer),
		cmocka_unit_test(test_io_and_a_callback_that_unwatches_another),
		cmocka_unit_test(test_fd_limit_is_an_error),
		cmocka_unit_test(test_before_sleep_hook),
		cmocka_unit_test(test_clocks),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
