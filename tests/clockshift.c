/*
 * LD_PRELOAD shim for the clock-step tests: shifts CLOCK_REALTIME (and
 * gettimeofday, time) by the signed number of milliseconds in the file
 * $CLOCKSHIFT_FILE, re-read at most every 50 ms of CLOCK_MONOTONIC, so a
 * test steps the wall clock of a running daemon by rewriting the file.
 * CLOCK_MONOTONIC and CLOCK_BOOTTIME are left alone, as NTP leaves them.
 * Built by tests/test_clock_steps.py.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/time.h>
#include <time.h>

#define REREAD_NS 50000000LL	/* a step is seen within 50 ms */

static int (*real_clock_gettime)(clockid_t, struct timespec *);

static long long
shift_ms(void)
{
	static long long cached, read_at = -REREAD_NS - 1;
	struct timespec mono;
	long long now;
	const char *path;
	FILE *fp;

	real_clock_gettime(CLOCK_MONOTONIC, &mono);
	now = mono.tv_sec * 1000000000LL + mono.tv_nsec;
	if (now - read_at < REREAD_NS)
		return cached;
	read_at = now;
	if ((path = getenv("CLOCKSHIFT_FILE")) != NULL && (fp = fopen(path, "re")) != NULL) {
		if (fscanf(fp, "%lld", &cached) != 1)
			cached = 0;
		fclose(fp);
	}
	return cached;
}

int
clock_gettime(clockid_t clock, struct timespec *ts)
{
	long long ns;
	int rc;

	if (real_clock_gettime == NULL)
		real_clock_gettime = (int (*)(clockid_t, struct timespec *))dlsym(RTLD_NEXT, "clock_gettime");
	if ((rc = real_clock_gettime(clock, ts)) != 0 ||
	    (clock != CLOCK_REALTIME && clock != CLOCK_REALTIME_COARSE))
		return rc;
	ns = ts->tv_sec * 1000000000LL + ts->tv_nsec + shift_ms() * 1000000LL;
	ts->tv_sec = ns / 1000000000LL;
	ts->tv_nsec = ns % 1000000000LL;
	return 0;
}

int
gettimeofday(struct timeval *tv, void *tz)
{
	struct timespec ts;

	(void)tz;
	if (clock_gettime(CLOCK_REALTIME, &ts) != 0)
		return -1;
	if (tv) {
		tv->tv_sec = ts.tv_sec;
		tv->tv_usec = ts.tv_nsec / 1000;
	}
	return 0;
}

time_t
time(time_t *out)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	if (out)
		*out = ts.tv_sec;
	return ts.tv_sec;
}
