/*
 * Unit tests of request.c: every op of protocol v1 parsed from one line,
 * what each accepts, and the error (code, text, whether the connection
 * closes) for what it refuses. The fuzzer (tests/fuzz/fuzz_request.c)
 * checks the invariants on random lines; these pin the answers.
 */
#include "unit.h"

#include <stdio.h>
#include <string.h>

#include "request.h"

static struct request req;	/* 64 KiB of payload buffer: not on the stack */

static int
parse(const char *line, struct request_error *err)
{
	memset(err, 0, sizeof(*err));
	return request_parse(line, strlen(line), &req, err);
}

static void
expect_ok(const char *line, enum request_op op)
{
	struct request_error err;

	if (parse(line, &err) != 0)
		fail_msg("%s refused: %s: %s", line, err.code, err.message);
	assert_int_equal(req.op, op);
}

static void
expect_error(const char *line, const char *code, const char *message, bool fatal)
{
	struct request_error err;

	if (parse(line, &err) != -1)
		fail_msg("%s accepted, expected %s", line, code);
	assert_string_equal(err.code, code);
	assert_string_equal(err.message, message);
	assert_int_equal(err.fatal, fatal);
}

TEST(test_every_op_by_name)
{
	static const char *const lines[REQUEST_NOPS] = {
		[REQUEST_HELLO] = "{\"op\":\"hello\"}",
		[REQUEST_ACK] = "{\"op\":\"ack\",\"id\":3}",
		[REQUEST_STATS] = "{\"op\":\"stats\"}",
		[REQUEST_PUBLISH] = "{\"op\":\"publish\",\"topic\":\"a/b\",\"payload\":\"x\"}",
		[REQUEST_CURSOR] = "{\"op\":\"consumer\",\"consumer\":\"lamp\",\"action\":\"delete\"}",
		[REQUEST_INJECT] = "{\"op\":\"inject\",\"topic\":\"a/b\",\"payload\":\"x\"}",
		[REQUEST_STORE_ACK] = "{\"op\":\"store\",\"action\":\"ack-corruption\"}",
	};

	for (int i = 0; i < REQUEST_NOPS; i++) {
		assert_non_null(lines[i]);
		expect_ok(lines[i], (enum request_op)i);
		assert_non_null(strstr(lines[i], request_op_name((enum request_op)i)));
	}
}

TEST(test_unknown_op_names_them_all)
{
	expect_error("{\"op\":\"frobnicate\"}", "unknown_op",
	    "unknown op \"frobnicate\" (hello, ack, stats, publish, consumer, inject, store)", false);
	expect_error("{\"id\":1}", "bad_request", "the object has no \"op\" string", false);
	expect_error("{\"op\":1}", "bad_request", "the object has no \"op\" string", false);
}

TEST(test_not_json_closes)
{
	struct request_error err;

	assert_int_equal(parse("{\"op\":", &err), -1);
	assert_string_equal(err.code, "bad_json");
	assert_true(err.fatal);
	expect_error("[1]", "bad_json", "a line must be a JSON object; closing", true);
	/* a second "op" could make the relay act on the one the client did not mean */
	assert_int_equal(parse("{\"op\":\"ack\",\"op\":\"hello\"}", &err), -1);
	assert_string_equal(err.code, "bad_json");
}

TEST(test_hello)
{
	expect_ok("{\"op\":\"hello\",\"consumer\":\"lamp-1.a_b\",\"filter\":\"/cf/v1/+/+/+/set\"}",
	    REQUEST_HELLO);
	assert_true(req.named);
	assert_string_equal(req.name, "lamp-1.a_b");
	assert_string_equal(req.filter, "/cf/v1/+/+/+/set");
	assert_int_equal(req.start.from, STORE_FROM_STORED);	/* a name resumes */
	expect_ok("{\"op\":\"hello\"}", REQUEST_HELLO);
	assert_false(req.named);
	assert_string_equal(req.filter, "#");
	assert_int_equal(req.start.from, STORE_FROM_LIVE);	/* a tail starts now */
	expect_ok("{\"op\":\"hello\",\"from\":42}", REQUEST_HELLO);
	assert_int_equal(req.start.from, STORE_FROM_ID);
	assert_int_equal(req.start.id, 42);
	expect_error("{\"op\":\"hello\",\"from\":\"stored\"}", "bad_request",
	    "hello: from must be \"live\" or a history id", false);
	expect_error("{\"op\":\"hello\",\"consumer\":\"bad name\"}", "bad_request",
	    "hello: consumer must be 1 to 64 of A-Z a-z 0-9 . _ -", false);
	expect_error("{\"op\":\"hello\",\"filter\":\"a/#/b\"}", "bad_request",
	    "hello: filter must be an MQTT topic filter of at most 1024 bytes", false);
	expect_error("{\"op\":\"hello\",\"window\":5}", "bad_request",
	    "hello: unknown field \"window\"", false);
}

TEST(test_hello_name_bounds)
{
	char line[256];

	snprintf(line, sizeof(line), "{\"op\":\"hello\",\"consumer\":\"%0*d\"}", REQUEST_NAME_MAX, 0);
	expect_ok(line, REQUEST_HELLO);
	snprintf(line, sizeof(line), "{\"op\":\"hello\",\"consumer\":\"%0*d\"}", REQUEST_NAME_MAX + 1, 0);
	expect_error(line, "bad_request", "hello: consumer must be 1 to 64 of A-Z a-z 0-9 . _ -", false);
}

TEST(test_ack)
{
	expect_ok("{\"op\":\"ack\",\"id\":0}", REQUEST_ACK);
	assert_int_equal(req.ack_id, 0);
	expect_error("{\"op\":\"ack\",\"id\":-1}", "bad_request", "ack: id must be a history id", false);
	expect_error("{\"op\":\"ack\",\"id\":\"7\"}", "bad_request", "ack: id must be a history id", false);
	expect_error("{\"op\":\"ack\"}", "bad_request", "ack: id must be a history id", false);
}

TEST(test_publish_payloads)
{
	expect_ok("{\"op\":\"publish\",\"topic\":\"a/b\",\"payload\":\"AP8=\",\"encoding\":\"base64\","
	    "\"qos\":0,\"retain\":true}", REQUEST_PUBLISH);
	assert_int_equal(req.publish.payloadlen, 2);
	assert_memory_equal(req.publish.payload, "\x00\xff", 2);
	assert_int_equal(req.publish.qos, 0);
	assert_true(req.publish.retain);
	expect_ok("{\"op\":\"publish\",\"topic\":\"a/b\",\"payload\":\"\"}", REQUEST_PUBLISH);
	assert_int_equal(req.publish.payloadlen, 0);
	assert_int_equal(req.publish.qos, 1);
	/* '=' only at the end, and only as padding */
	expect_error("{\"op\":\"publish\",\"topic\":\"a/b\",\"payload\":\"A=P8\",\"encoding\":\"base64\"}",
	    "bad_request", "publish: payload is not base64", false);
	expect_error("{\"op\":\"inject\",\"topic\":\"a/+\",\"payload\":\"x\"}", "bad_request",
	    "inject: topic must be an MQTT topic without wildcards or control characters, at most 1024 bytes",
	    false);
	expect_error("{\"op\":\"publish\",\"topic\":\"a/b\",\"payload\":\"x\",\"qos\":2}", "bad_request",
	    "publish: qos must be 0 or 1", false);
	expect_error("{\"op\":\"publish\",\"topic\":\"a/b\",\"payload\":\"x\",\"encoding\":\"hex\"}",
	    "bad_request", "publish: encoding must be \"utf8\" or \"base64\"", false);
}

TEST(test_cursor_and_store)
{
	expect_ok("{\"op\":\"consumer\",\"consumer\":\"lamp\",\"action\":\"reset\",\"to\":\"oldest\"}",
	    REQUEST_CURSOR);
	assert_false(req.cursor_delete);
	assert_int_equal(req.start.from, STORE_FROM_ID);
	assert_int_equal(req.start.id, 0);
	expect_ok("{\"op\":\"consumer\",\"consumer\":\"lamp\",\"action\":\"reset\",\"to\":\"live\"}",
	    REQUEST_CURSOR);
	assert_int_equal(req.start.from, STORE_FROM_LIVE);
	expect_error("{\"op\":\"consumer\",\"consumer\":\"lamp\",\"action\":\"reset\"}", "bad_request",
	    "consumer: to must be a history id, \"live\" or \"oldest\"", false);
	expect_error("{\"op\":\"consumer\",\"consumer\":\"lamp\",\"action\":\"delete\",\"to\":3}",
	    "bad_request", "consumer: action must be \"delete\" or \"reset\" (with \"to\")", false);
	expect_error("{\"op\":\"store\",\"action\":\"drop\"}", "bad_request",
	    "store: action must be \"ack-corruption\"", false);
}

/* A request leaves nothing of the one before it. */
TEST(test_fields_reset_between_lines)
{
	expect_ok("{\"op\":\"hello\",\"consumer\":\"lamp\",\"filter\":\"a/#\"}", REQUEST_HELLO);
	expect_ok("{\"op\":\"stats\"}", REQUEST_STATS);
	assert_false(req.named);
	assert_string_equal(req.name, "");
	assert_string_equal(req.filter, "#");
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_every_op_by_name),
		cmocka_unit_test(test_unknown_op_names_them_all),
		cmocka_unit_test(test_not_json_closes),
		cmocka_unit_test(test_hello),
		cmocka_unit_test(test_hello_name_bounds),
		cmocka_unit_test(test_ack),
		cmocka_unit_test(test_publish_payloads),
		cmocka_unit_test(test_cursor_and_store),
		cmocka_unit_test(test_fields_reset_between_lines),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
