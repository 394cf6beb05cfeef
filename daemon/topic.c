#include "topic.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct topic_segment {
	char *literal;		/* NULL for a named field */
	char *field;		/* NULL for a literal segment */
};

struct topic_pattern {
	size_t nsegments;
	struct topic_segment *segments;
};

static bool
field_name_valid(const char *name, size_t len)
{
	if (len == 0 || len > TOPIC_FIELD_NAME_MAX)
		return false;
	if (!(name[0] == '_' || (name[0] >= 'a' && name[0] <= 'z')))
		return false;
	for (size_t i = 1; i < len; i++) {
		char c = name[i];
		if (!(c == '_' || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9')))
			return false;
	}
	return true;
}

void
topic_pattern_free(struct topic_pattern *pattern)
{
	if (pattern == NULL)
		return;
	for (size_t i = 0; i < pattern->nsegments; i++) {
		free(pattern->segments[i].literal);
		free(pattern->segments[i].field);
	}
	free(pattern->segments);
	free(pattern);
}

enum topic_level {
	TOPIC_LEVEL_LITERAL,
	TOPIC_LEVEL_FIELD,	/* {name} */
	TOPIC_LEVEL_BAD,	/* a wildcard, or braces that are not one {name} */
};

/* The rule every pattern follows: each level is literal text or one {name}. */
static enum topic_level
topic_level_kind(const char *seg, size_t len)
{
	if (len >= 2 && seg[0] == '{' && seg[len - 1] == '}')
		return TOPIC_LEVEL_FIELD;
	if (memchr(seg, '{', len) || memchr(seg, '}', len) ||
	    memchr(seg, '+', len) || memchr(seg, '#', len))
		return TOPIC_LEVEL_BAD;
	return TOPIC_LEVEL_LITERAL;
}

int
topic_pattern_filter(const char *text, char *filter)
{
	char *o = filter;

	for (const char *seg = text; ; seg++) {
		const char *end = strchr(seg, '/');
		size_t len = end ? (size_t)(end - seg) : strlen(seg);

		switch (topic_level_kind(seg, len)) {
		case TOPIC_LEVEL_FIELD:
			*o++ = '+';
			break;
		case TOPIC_LEVEL_LITERAL:
			memcpy(o, seg, len);
			o += len;
			break;
		case TOPIC_LEVEL_BAD:
			return -1;
		}
		if (end == NULL)
			break;
		*o++ = '/';
		seg = end;
	}
	*o = '\0';
	return 0;
}

static int
pattern_add_segment(struct topic_pattern *p, const char *seg, size_t len,
    size_t *nfields, char *err, size_t errlen)
{
	struct topic_segment *s = &p->segments[p->nsegments];
	enum topic_level kind = topic_level_kind(seg, len);

	if (kind == TOPIC_LEVEL_FIELD) {
		if (!field_name_valid(seg + 1, len - 2)) {
			snprintf(err, errlen, "field name '%.*s' must be 1 to %d of a-z, 0-9, _",
			    (int)len, seg, TOPIC_FIELD_NAME_MAX);
			return -1;
		}
		for (size_t i = 0; i < p->nsegments; i++) {
			const char *f = p->segments[i].field;
			if (f && strlen(f) == len - 2 && memcmp(f, seg + 1, len - 2) == 0) {
				snprintf(err, errlen, "field '%.*s' appears twice", (int)len, seg);
				return -1;
			}
		}
		if (++*nfields > TOPIC_FIELDS_MAX) {
			snprintf(err, errlen, "more than %d named fields", TOPIC_FIELDS_MAX);
			return -1;
		}
		s->field = strndup(seg + 1, len - 2);
		if (s->field == NULL)
			goto nomem;
	} else {
		if (kind == TOPIC_LEVEL_BAD) {
			snprintf(err, errlen, "segment '%.*s' must be literal text or one {name}",
			    (int)len, seg);
			return -1;
		}
		s->literal = strndup(seg, len);
		if (s->literal == NULL)
			goto nomem;
	}
	p->nsegments++;
	return 0;
nomem:
	snprintf(err, errlen, "out of memory");
	return -1;
}

struct topic_pattern *
topic_pattern_new(const char *text, char *err, size_t errlen)
{
	struct topic_pattern *p;
	size_t nslash = 0, nfields = 0;
	const char *seg = text;

	if (*text == '\0') {
		snprintf(err, errlen, "pattern is empty");
		return NULL;
	}
	for (const char *c = text; *c; c++)
		nslash += (*c == '/');
	p = calloc(1, sizeof(*p));
	if (p == NULL || (p->segments = calloc(nslash + 1, sizeof(*p->segments))) == NULL) {
		free(p);
		snprintf(err, errlen, "out of memory");
		return NULL;
	}
	for (;;) {
		const char *end = strchr(seg, '/');
		size_t len = end ? (size_t)(end - seg) : strlen(seg);

		if (pattern_add_segment(p, seg, len, &nfields, err, errlen) == -1) {
			topic_pattern_free(p);
			return NULL;
		}
		if (end == NULL)
			break;
		seg = end + 1;
	}
	if (nfields == 0) {
		snprintf(err, errlen, "pattern names no {field}");
		topic_pattern_free(p);
		return NULL;
	}
	return p;
}

void
topic_fields_clear(struct topic_fields *fields)
{
	for (size_t i = 0; i < fields->count; i++)
		free(fields->field[i].value);
	fields->count = 0;
}

int
topic_fields_extract(const struct topic_pattern *pattern, const char *topic,
    struct topic_fields *out)
{
	const char *seg = topic;

	out->count = 0;
	for (size_t i = 0; i < pattern->nsegments; i++) {
		const struct topic_segment *s = &pattern->segments[i];
		const char *end = strchr(seg, '/');
		size_t len = end ? (size_t)(end - seg) : strlen(seg);
		bool last = (i + 1 == pattern->nsegments);

		if (last != (end == NULL))
			goto nomatch;
		if (s->literal) {
			if (strlen(s->literal) != len || memcmp(s->literal, seg, len) != 0)
				goto nomatch;
		} else {
			struct topic_field *f = &out->field[out->count];
			f->name = s->field;
			if ((f->value = strndup(seg, len)) == NULL) {
				topic_fields_clear(out);
				return -1;
			}
			out->count++;
		}
		if (end)
			seg = end + 1;
	}
	return 1;
nomatch:
	topic_fields_clear(out);
	return 0;
}

const char *
topic_fields_get(const struct topic_fields *fields, const char *name)
{
	for (size_t i = 0; i < fields->count; i++)
		if (strcmp(fields->field[i].name, name) == 0)
			return fields->field[i].value;
	return NULL;
}

bool
topic_matches(const char *filter, const char *topic)
{
	/* §4.7.2: wildcards at the first level do not match topics starting with '$'. */
	if (topic[0] == '$' && (filter[0] == '+' || filter[0] == '#'))
		return false;
	for (;;) {
		const char *fend = strchr(filter, '/');
		const char *tend = strchr(topic, '/');
		size_t flen = fend ? (size_t)(fend - filter) : strlen(filter);
		size_t tlen = tend ? (size_t)(tend - topic) : strlen(topic);

		if (flen == 1 && filter[0] == '#')
			return true;
		if (!(flen == 1 && filter[0] == '+') &&
		    (flen != tlen || memcmp(filter, topic, flen) != 0))
			return false;
		if (fend == NULL || tend == NULL) {
			/* "a/#" also matches "a" (§4.7.1.2). */
			if (fend && tend == NULL && strcmp(fend + 1, "#") == 0)
				return true;
			return fend == NULL && tend == NULL;
		}
		filter = fend + 1;
		topic = tend + 1;
	}
}
