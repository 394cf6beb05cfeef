/* MQTT topic filters and the topic_fields pattern that names topic segments. */
#ifndef CMDRELAY_TOPIC_H
#define CMDRELAY_TOPIC_H

#include <stdbool.h>
#include <stddef.h>

#define TOPIC_FIELDS_MAX 16
#define TOPIC_FIELD_NAME_MAX 32

struct topic_pattern;

struct topic_field {
	const char *name;	/* owned by the pattern */
	char *value;
};

struct topic_fields {
	size_t count;
	struct topic_field field[TOPIC_FIELDS_MAX];
};

/* NULL with a reason in err when the pattern is malformed. */
struct topic_pattern *topic_pattern_new(const char *text, char *err, size_t errlen);
void topic_pattern_free(struct topic_pattern *pattern);
/*
 * The MQTT filter that a pattern's topics match, each {name} level a +,
 * into filter (room for strlen(text) + 1: never longer). -1 when a level
 * is neither literal text nor one {name}.
 */
int topic_pattern_filter(const char *text, char *filter);

/*
 * Fills out with the named segments of topic. Returns 1 when the topic fits
 * the pattern, 0 when it does not (out then has no fields), -1 on ENOMEM.
 */
int topic_fields_extract(const struct topic_pattern *pattern, const char *topic,
    struct topic_fields *out);
void topic_fields_clear(struct topic_fields *fields);
const char *topic_fields_get(const struct topic_fields *fields, const char *name);

/* MQTT 3.1.1 §4.7 matching of topic against filter (with + and #). */
bool topic_matches(const char *filter, const char *topic);

#endif
