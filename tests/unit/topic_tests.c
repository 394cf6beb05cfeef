/*
 * Unit tests of topic.c: the topic_fields pattern (names, limits, errors),
 * its filter, and MQTT 3.1.1 section 4.7 filter matching.
 */
#include "unit.h"

#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include "topic.h"

#define SEED_TOPIC "/cf/v1/AAA/012C/012C000003AX/set"
#define SEED_PATTERN "/cf/v1/{product}/{model}/{device}/{action}"

TEST(test_topic_seed_fields)
{
	char err[256] = "";
	struct topic_pattern *p = topic_pattern_new(SEED_PATTERN, err, sizeof(err));
	struct topic_fields f = { 0 };

	assert_non_null(p);
	assert_int_equal(topic_fields_extract(p, SEED_TOPIC, &f), 1);
	assert_int_equal(f.count, 4);
	assert_string_equal(f.field[0].name, "product");
	assert_string_equal(f.field[0].value, "AAA");
	assert_string_equal(f.field[3].name, "action");
	assert_string_equal(topic_fields_get(&f, "product"), "AAA");
	assert_string_equal(topic_fields_get(&f, "model"), "012C");
	assert_string_equal(topic_fields_get(&f, "device"), "012C000003AX");
	assert_string_equal(topic_fields_get(&f, "action"), "set");
	assert_null(topic_fields_get(&f, "cf"));
	assert_null(topic_fields_get(&f, "Device"));
	topic_fields_clear(&f);
	assert_int_equal(f.count, 0);
	assert_null(topic_fields_get(&f, "device"));
	topic_pattern_free(p);
}

TEST(test_topic_fields_no_match)
{
	static const char *const topics[] = {
		"/cf/v1/AAA/012C/012C000003AX",			/* too few segments */
		"/cf/v1/AAA",
		"/cf",
		"",
		"/cf/v1/AAA/012C/012C000003AX/set/extra",	/* too many */
		"/cf/v1/AAA/012C/012C000003AX/set/",		/* trailing slash: one more, empty */
		"/cf/v2/AAA/012C/012C000003AX/set",		/* literal mismatch */
		"/CF/v1/AAA/012C/012C000003AX/set",
		"cf/v1/AAA/012C/012C000003AX/set",		/* no leading empty segment */
		"x/cf/v1/AAA/012C/012C000003AX/set",
		"/cf/v1x/AAA/012C/012C000003AX/set",
		"/cf/v/AAA/012C/012C000003AX/set",
	};
	char err[256];
	struct topic_pattern *p = topic_pattern_new(SEED_PATTERN, err, sizeof(err));
	struct topic_fields f = { 0 };

	assert_non_null(p);
	for (size_t i = 0; i < sizeof(topics) / sizeof(topics[0]); i++) {
		/* a previous match must not leave fields behind */
		assert_int_equal(topic_fields_extract(p, SEED_TOPIC, &f), 1);
		topic_fields_clear(&f);
		if (topic_fields_extract(p, topics[i], &f) != 0)
			fail_msg("'%s' matched %s", topics[i], SEED_PATTERN);
		assert_int_equal(f.count, 0);
		assert_null(topic_fields_get(&f, "product"));
		assert_null(topic_fields_get(&f, "action"));
	}
	topic_pattern_free(p);
}

TEST(test_topic_fields_empty_segments)
{
	char err[256];
	struct topic_pattern *p = topic_pattern_new(SEED_PATTERN, err, sizeof(err));
	struct topic_pattern *q;
	struct topic_fields f = { 0 };

	assert_non_null(p);
	assert_int_equal(topic_fields_extract(p, "/cf/v1//012C//set", &f), 1);
	assert_int_equal(f.count, 4);
	assert_string_equal(topic_fields_get(&f, "product"), "");
	assert_string_equal(topic_fields_get(&f, "model"), "012C");
	assert_string_equal(topic_fields_get(&f, "device"), "");
	assert_string_equal(topic_fields_get(&f, "action"), "set");
	topic_fields_clear(&f);
	assert_int_equal(topic_fields_extract(p, "/cf/v1////", &f), 1);
	assert_int_equal(f.count, 4);
	assert_string_equal(topic_fields_get(&f, "action"), "");
	topic_fields_clear(&f);
	topic_pattern_free(p);

	/* an empty literal segment in the pattern matches only an empty level */
	q = topic_pattern_new("a//{x}", err, sizeof(err));
	assert_non_null(q);
	assert_int_equal(topic_fields_extract(q, "a//v", &f), 1);
	assert_string_equal(topic_fields_get(&f, "x"), "v");
	topic_fields_clear(&f);
	assert_int_equal(topic_fields_extract(q, "a/b/v", &f), 0);
	assert_int_equal(topic_fields_extract(q, "a/v", &f), 0);
	assert_int_equal(f.count, 0);
	topic_pattern_free(q);

	/* a pattern of one field takes a whole one-level topic */
	q = topic_pattern_new("{all}", err, sizeof(err));
	assert_non_null(q);
	assert_int_equal(topic_fields_extract(q, "single", &f), 1);
	assert_string_equal(topic_fields_get(&f, "all"), "single");
	topic_fields_clear(&f);
	assert_int_equal(topic_fields_extract(q, "two/levels", &f), 0);
	topic_pattern_free(q);
}

TEST(test_topic_pattern_errors)
{
	static const struct {
		const char *pattern;
		const char *why;
	} cases[] = {
		{ "", "pattern is empty" },
		{ "/cf/v1/AAA", "pattern names no {field}" },
		{ "/", "pattern names no {field}" },
		{ "/cf/{device}/{device}", "field '{device}' appears twice" },
		{ "/cf/{Device}", "field name '{Device}' must be 1 to 32 of a-z, 0-9, _" },
		{ "/cf/{1device}", "field name '{1device}' must be 1 to 32 of a-z, 0-9, _" },
		{ "/cf/{dev-ice}", "field name '{dev-ice}' must be 1 to 32 of a-z, 0-9, _" },
		{ "/cf/{}", "field name '{}' must be 1 to 32 of a-z, 0-9, _" },
		{ "/cf/{aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa}",
		  "field name '{aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa}' must be 1 to 32 of a-z, 0-9, _" },
		{ "/cf/+/{device}", "segment '+' must be literal text or one {name}" },
		{ "/cf/{device}/#", "segment '#' must be literal text or one {name}" },
		{ "/cf/a+b/{device}", "segment 'a+b' must be literal text or one {name}" },
		{ "/cf/x{device}", "segment 'x{device}' must be literal text or one {name}" },
		{ "/cf/{device}x", "segment '{device}x' must be literal text or one {name}" },
		{ "/cf/{a}{b}", "field name '{a}{b}' must be 1 to 32 of a-z, 0-9, _" },
		{ "/cf/{", "segment '{' must be literal text or one {name}" },
		{ "/cf/}/{a}", "segment '}' must be literal text or one {name}" },
		{ "{a}/{b}/{c}/{d}/{e}/{f}/{g}/{h}/{i}/{j}/{k}/{l}/{m}/{n}/{o}/{p}/{q}",
		  "more than 16 named fields" },
	};

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		char err[256] = "";
		struct topic_pattern *p = topic_pattern_new(cases[i].pattern, err, sizeof(err));

		if (p != NULL) {
			topic_pattern_free(p);
			fail_msg("pattern '%s' accepted", cases[i].pattern);
		}
		assert_string_equal(err, cases[i].why);
	}
}

TEST(test_topic_pattern_limits)
{
	char err[256] = "";
	struct topic_pattern *p;
	struct topic_fields f = { 0 };

	/* 16 fields, 32-character names, '_' and digits are fine */
	p = topic_pattern_new("{a}/{b}/{c}/{d}/{e}/{f}/{g}/{h}/{i}/{j}/{k}/{l}/{m}/{n}/{o}/{p}",
	    err, sizeof(err));
	assert_non_null(p);
	assert_int_equal(topic_fields_extract(p, "1/2/3/4/5/6/7/8/9/10/11/12/13/14/15/16", &f), 1);
	assert_int_equal(f.count, 16);
	assert_string_equal(topic_fields_get(&f, "a"), "1");
	assert_string_equal(topic_fields_get(&f, "p"), "16");
	topic_fields_clear(&f);
	topic_pattern_free(p);

	p = topic_pattern_new("x/{_a1}/{aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa}", err, sizeof(err));
	assert_non_null(p);
	assert_int_equal(topic_fields_extract(p, "x/one/two", &f), 1);
	assert_string_equal(topic_fields_get(&f, "_a1"), "one");
	assert_string_equal(topic_fields_get(&f, "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"), "two");
	topic_fields_clear(&f);
	topic_pattern_free(p);
}

/* ------------------------------------------------------------------ */
/* topic_matches: MQTT 3.1.1 section 4.7 */

TEST(test_topic_pattern_filter)
{
	char filter[64];

	assert_int_equal(topic_pattern_filter("/cf/v1/{product}/{model}/{device}/state", filter), 0);
	assert_string_equal(filter, "/cf/v1/+/+/+/state");
	assert_int_equal(topic_pattern_filter("a/b", filter), 0);
	assert_string_equal(filter, "a/b");
	assert_int_equal(topic_pattern_filter("{x}", filter), 0);
	assert_string_equal(filter, "+");
	assert_int_equal(topic_pattern_filter("a//{x}/", filter), 0);
	assert_string_equal(filter, "a//+/");
	assert_int_equal(topic_pattern_filter("a/+/b", filter), -1);
	assert_int_equal(topic_pattern_filter("a/#", filter), -1);
	assert_int_equal(topic_pattern_filter("a/x{y}", filter), -1);
	assert_int_equal(topic_pattern_filter("a/{", filter), -1);
}

TEST(test_topic_matches)
{
	static const struct {
		const char *filter, *topic;
		bool match;
	} cases[] = {
		/* exact */
		{ "a/b", "a/b", true },
		{ "a/b", "a/c", false },
		{ "a/b", "a", false },
		{ "a", "a/b", false },
		{ "a/b", "a/b/", false },
		{ "a/b/", "a/b/", true },
		{ "a/b", "A/b", false },
		{ "/a", "/a", true },
		{ "/a", "a", false },
		{ SEED_TOPIC, SEED_TOPIC, true },
		/* + : exactly one level */
		{ "sport/tennis/+", "sport/tennis/player1", true },
		{ "sport/tennis/+", "sport/tennis/player1/ranking", false },
		{ "sport/tennis/+", "sport/tennis", false },
		{ "sport/+", "sport", false },
		{ "sport/+", "sport/", true },		/* empty level */
		{ "+", "a", true },
		{ "+", "a/b", false },
		{ "+", "/a", false },
		{ "+/+", "/a", true },
		{ "/+", "/a", true },
		{ "+/x", "/x", true },			/* + matches the empty first level */
		{ "+/x", "x", false },
		{ "a/+/c", "a//c", true },
		{ "a/+/c", "a/b/c", true },
		{ "a/+/c", "a/b/d", false },
		{ "/cf/v1/+/+/+/set", SEED_TOPIC, true },
		{ "/cf/v1/+/+/+/set", "/cf/v1/AAA/012C/012C000003AX/get", false },
		{ "/cf/v1/+/+/+", SEED_TOPIC, false },
		/* # : the level and everything below, also the parent */
		{ "#", "a", true },
		{ "#", "a/b/c", true },
		{ "#", "/a", true },
		{ "sport/tennis/player1/#", "sport/tennis/player1", true },
		{ "sport/tennis/player1/#", "sport/tennis/player1/ranking", true },
		{ "sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", true },
		{ "sport/tennis/player1/#", "sport/tennis", false },
		{ "sport/#", "sport", true },
		{ "a/#", "a", true },
		{ "a/#", "a/", true },
		{ "a/#", "ab", false },
		{ "a/#", "b/a", false },
		{ "a/+/#", "a/b", true },
		{ "a/+/#", "a/b/c/d", true },
		{ "a/+/#", "a", false },
		{ "/cf/#", SEED_TOPIC, true },
		{ "/cf/#", "cf/v1", false },
		/* §4.7.2: topics starting with '$' */
		{ "#", "$SYS/x", false },
		{ "#", "$SYS", false },
		{ "+/monitor/Clients", "$SYS/monitor/Clients", false },
		{ "+", "$SYS", false },
		{ "$SYS/#", "$SYS/x", true },
		{ "$SYS/monitor/+", "$SYS/monitor/Clients", true },
		{ "a/#", "a/$SYS", true },		/* '$' only matters at the first level */
		{ "a/+", "a/$x", true },
	};

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		bool got = topic_matches(cases[i].filter, cases[i].topic);

		if (got != cases[i].match)
			fail_msg("topic_matches(\"%s\", \"%s\") = %s, expected %s", cases[i].filter,
			    cases[i].topic, got ? "true" : "false", cases[i].match ? "true" : "false");
	}
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_topic_seed_fields),
		cmocka_unit_test(test_topic_fields_no_match),
		cmocka_unit_test(test_topic_fields_empty_segments),
		cmocka_unit_test(test_topic_pattern_errors),
		cmocka_unit_test(test_topic_pattern_limits),
		cmocka_unit_test(test_topic_pattern_filter),
		cmocka_unit_test(test_topic_matches),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
