/*
 * libFuzzer target: topic_fields patterns, field extraction and MQTT filter
 * matching (daemon/topic.c).
 *
 * Input: PATTERN '\n' TOPIC. PATTERN is given to topic_pattern_new(); when it
 * is a valid pattern, TOPIC to topic_fields_extract(). PATTERN is also used
 * as an MQTT filter for topic_matches(filter, TOPIC), checked against
 * libmosquitto's mosquitto_topic_matches_sub() when both are valid.
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <mosquitto.h>

#include "topic.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void
check(bool ok, const char *what, const char *pattern, const char *topic)
{
	if (!ok) {
		fprintf(stderr, "fuzz_topic: %s\n  pattern/filter: \"%s\"\n  topic: \"%s\"\n",
		    what, pattern, topic);
		abort();
	}
}

/* A match must give back the topic when the values are put into the pattern. */
static void
check_fields(const char *pattern, const char *topic, const struct topic_fields *f)
{
	char rebuilt[8192];
	size_t n = 0, k = 0;
	const char *p = pattern;

	check(f->count >= 1 && f->count <= TOPIC_FIELDS_MAX, "field count out of range", pattern, topic);
	while (*p) {
		const char *end = strchr(p, '/');
		size_t len = end ? (size_t)(end - p) : strlen(p);
		const char *piece = p;
		size_t plen = len;

		if (len >= 2 && p[0] == '{' && p[len - 1] == '}') {
			check(k < f->count, "fewer values than fields", pattern, topic);
			check(strlen(f->field[k].name) == len - 2 &&
			    memcmp(f->field[k].name, p + 1, len - 2) == 0, "field name mismatch", pattern, topic);
			check(strchr(f->field[k].value, '/') == NULL, "value contains '/'", pattern, topic);
			check(topic_fields_get(f, f->field[k].name) == f->field[k].value,
			    "topic_fields_get disagrees", pattern, topic);
			piece = f->field[k].value;
			plen = strlen(piece);
			k++;
		}
		if (n + plen + 1 >= sizeof(rebuilt))
			return;
		memcpy(rebuilt + n, piece, plen);
		n += plen;
		if (end == NULL)
			break;
		rebuilt[n++] = '/';
		p = end + 1;
	}
	rebuilt[n] = '\0';
	check(k == f->count, "more values than fields", pattern, topic);
	check(strcmp(rebuilt, topic) == 0, "fields do not rebuild the topic", pattern, topic);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char *buf, *pattern, *topic, *nl, err[256];
	struct topic_pattern *tp;
	struct topic_fields fields = { 0 };
	bool ours, theirs;
	int rc;

	if (size > 4096)
		return -1;
	if ((buf = malloc(size + 1)) == NULL)
		return 0;
	memcpy(buf, data, size);
	buf[size] = '\0';
	pattern = buf;
	if ((nl = strchr(buf, '\n')) != NULL) {
		*nl = '\0';
		topic = nl + 1;
	} else {
		topic = buf + size;	/* "" */
	}

	err[0] = '\0';
	if ((tp = topic_pattern_new(pattern, err, sizeof(err))) != NULL) {
		rc = topic_fields_extract(tp, topic, &fields);
		check(rc == 0 || rc == 1, "topic_fields_extract returned neither 0 nor 1", pattern, topic);
		if (rc == 1)
			check_fields(pattern, topic, &fields);
		else
			check(fields.count == 0, "no match but fields left", pattern, topic);
		topic_fields_clear(&fields);
		check(fields.count == 0, "topic_fields_clear left fields", pattern, topic);
		topic_pattern_free(tp);
	} else {
		check(err[0] != '\0' && memchr(err, '\0', sizeof(err)) != NULL,
		    "topic_pattern_new failed without a reason", pattern, topic);
	}

	if (*pattern != '\0' && *topic != '\0') {
		ours = topic_matches(pattern, topic);
		if (mosquitto_sub_topic_check(pattern) == MOSQ_ERR_SUCCESS &&
		    mosquitto_pub_topic_check(topic) == MOSQ_ERR_SUCCESS &&
		    mosquitto_topic_matches_sub(pattern, topic, &theirs) == MOSQ_ERR_SUCCESS)
			check(ours == theirs, ours ? "topic_matches: true, libmosquitto: false" :
			    "topic_matches: false, libmosquitto: true", pattern, topic);
	}
	free(buf);
	return 0;
}
