/*
 * Unit tests of wire.c: the JSON shapes that the daemon and cmdrelayctl
 * both write (payload encoding, times, command lines).
 */
#include "unit.h"

#include <stdlib.h>
#include <string.h>

#include "wire.h"

static char *
dump(json_t *value)
{
	char *text = json_dumps(value, JSON_COMPACT | JSON_PRESERVE_ORDER | JSON_ENCODE_ANY);

	json_decref(value);
	assert_non_null(text);
	return text;
}

TEST(test_payload_utf8_or_base64)
{
	const char *enc = NULL;
	char *text;

	text = dump(wire_payload("on \xc3\xa9t\xc3\xa9", 8, &enc));
	assert_string_equal(enc, "utf8");
	assert_string_equal(text, "\"on \xc3\xa9t\xc3\xa9\"");	/* as it came */
	free(text);
	/* invalid UTF-8, and a NUL: a JSON string could not carry them as they are */
	text = dump(wire_payload("\xff\x00\x01", 3, &enc));
	assert_string_equal(enc, "base64");
	assert_string_equal(text, "\"/wAB\"");
	free(text);
	text = dump(wire_payload(NULL, 0, &enc));	/* libmosquitto's empty payload */
	assert_string_equal(enc, "utf8");
	assert_string_equal(text, "\"\"");
	free(text);
}

TEST(test_time)
{
	char buf[40];

	wire_time(0, buf, sizeof(buf));		/* a gateway that booted without a clock */
	assert_string_equal(buf, "1970-01-01T00:00:00.000Z");
	wire_time(1764095084123LL, buf, sizeof(buf));
	assert_string_equal(buf, "2025-11-25T18:24:44.123Z");
	wire_time(1764095084007LL, buf, sizeof(buf));
	assert_string_equal(buf, "2025-11-25T18:24:44.007Z");
}

TEST(test_command_line)
{
	struct stored_command c = {
		.id = 123, .received_at_ms = 1764095084123LL, .topic = "/cf/v1/AAA/012C/D1/set",
		.payload = "on", .payloadlen = 2, .qos = 1, .retain = true,
		.fields_json = "{\"device\":\"D1\"}",
	};
	size_t len;
	char *line, *text;

	text = dump(wire_command(&c));
	assert_string_equal(text, "{\"type\":\"command\",\"id\":123,\"topic\":\"/cf/v1/AAA/012C/D1/set\","
	    "\"fields\":{\"device\":\"D1\"},\"payload\":\"on\",\"encoding\":\"utf8\",\"qos\":1,"
	    "\"retained\":true,\"received_at\":\"2025-11-25T18:24:44.123Z\"}");
	free(text);
	c.fields_json = NULL;
	c.possible_repeat_of = 99;
	json_t *cmd = wire_command(&c);
	assert_non_null(cmd);
	assert_int_equal(json_integer_value(json_object_get(cmd, "possible_repeat_of")), 99);
	assert_int_equal(json_object_size(json_object_get(cmd, "fields")), 0);
	line = wire_line(cmd, &len);
	json_decref(cmd);
	assert_non_null(line);
	assert_int_equal(len, strlen(line));
	assert_int_equal(line[len - 1], '\n');
	assert_null(memchr(line, '\n', len - 1));	/* one line, whatever the payload */
	free(line);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_payload_utf8_or_base64),
		cmocka_unit_test(test_time),
		cmocka_unit_test(test_command_line),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
