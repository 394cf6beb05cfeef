/*
 * Times for cmdrelayctl: --since/--until as people write them (ISO 8601
 * with an offset, today, yesterday, an age), and times shown in local time
 * with their offset, or UTC with --utc.
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ctl.h"
#include "store.h"
#include "wire.h"

/* "today" and "yesterday": the local midnight that began the day. */
static bool
ctl_parse_day(const char *text, int64_t *out_ms)
{
	if (strcmp(text, "today") != 0 && strcmp(text, "yesterday") != 0)
		return false;
	*out_ms = store_local_midnight((int64_t)time(NULL) * 1000, -(text[0] == 'y'));
	return true;
}

static int
ctl_two_digits(const char *p)
{
	return p[0] >= '0' && p[0] <= '9' && p[1] >= '0' && p[1] <= '9' ? (p[0] - '0') * 10 + p[1] - '0' : -1;
}

/* "Z", "+01:00", "-0530", "+02" after a time: seconds east of UTC. */
static bool
ctl_parse_offset(const char *p, long *east)
{
	int sign = *p == '-' ? -1 : 1, h, m = 0;

	if (*p == 'Z') {
		*east = 0;
		return p[1] == '\0';
	}
	if ((*p != '+' && *p != '-') || (h = ctl_two_digits(p + 1)) < 0 || h > 23)
		return false;
	p += 3;
	if (*p == ':')
		p++;
	if (*p != '\0' && ((m = ctl_two_digits(p)) < 0 || m > 59 || p[2] != '\0'))
		return false;
	*east = sign * (h * 3600L + m * 60L);
	return true;
}

/*
 * "2h", "7d" before now, "today", "yesterday", or ISO 8601 as history prints
 * it (2026-11-25T18:24:44.123Z; seconds and fraction optional), with "Z" or
 * an offset (+01:00); a date or time without either is UTC.
 */
bool
ctl_parse_time(const char *text, int64_t *out_ms)
{
	static const char *const formats[] = {
		"%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d",
	};
	int64_t age;

	if (parse_duration_ms(text, &age) == 0) {
		*out_ms = (int64_t)time(NULL) * 1000 - age;
		return true;
	}
	if (ctl_parse_day(text, out_ms))
		return true;
	for (size_t i = 0; i < sizeof(formats) / sizeof(formats[0]); i++) {
		struct tm tm = { 0 }, back;
		const char *end = strptime(text, formats[i], &tm);
		int64_t ms = 0;
		long east = 0;
		time_t secs;

		if (end == NULL)
			continue;
		if (*end == '.' && i < 2) {
			int digits = 0;
			for (end++; *end >= '0' && *end <= '9'; end++, digits++)
				if (digits < 3)
					ms = ms * 10 + (*end - '0');
			if (digits == 0)
				continue;
			for (; digits < 3; digits++)
				ms *= 10;
		}
		if (*end != '\0' && (i == 3 || !ctl_parse_offset(end, &east)))
			continue;
		/* timegm() would turn 2026-02-30 into March 2: refuse what it moved. */
		back = tm;
		secs = timegm(&back);
		gmtime_r(&secs, &back);
		if (back.tm_mday != tm.tm_mday || back.tm_mon != tm.tm_mon || back.tm_hour != tm.tm_hour)
			return false;
		*out_ms = ((int64_t)secs - east) * 1000 + ms;
		return true;
	}
	return false;
}

void
ctl_time(const struct ctl *ctl, int64_t unix_ms, char *buf, size_t len)
{
	time_t secs = (time_t)(unix_ms / 1000);
	struct tm tm;
	long east;
	size_t n;

	if (ctl->utc) {
		wire_time(unix_ms, buf, len);
		return;
	}
	localtime_r(&secs, &tm);
	n = strftime(buf, len, "%Y-%m-%dT%H:%M:%S", &tm);
	east = tm.tm_gmtoff;
	snprintf(buf + n, len - n, ".%03d%c%02ld:%02ld", (int)(unix_ms % 1000), east < 0 ? '-' : '+',
	    labs(east) / 3600, labs(east) % 3600 / 60);
}

const char *
ctl_wire_time(const struct ctl *ctl, const char *iso, char *buf, size_t len)
{
	int64_t ms;

	if (iso == NULL || !ctl_parse_time(iso, &ms))
		return iso ? iso : "-";
	ctl_time(ctl, ms, buf, len);
	return buf;
}
