/*
 * Unit tests of config.c: durations and the YAML configuration, every
 * error path. Each other module has its own file (topic_tests.c, ...).
 *
 * Run from tests/unit (`make unit`): the shipped configuration is read as
 * ../../conf/cmdrelay.yaml. Temporary files go to /tmp and are removed.
 * No test skips: each one asserts the behaviour the daemon must have.
 */
#include "unit.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "config.h"
#include "dedup.h"
#include "log.h"
#include "store.h"
#include "topic.h"

#define DAY_MS_T (24LL * 3600 * 1000)
#define SHIPPED_CONFIG "../../conf/cmdrelay.yaml"
#define SEED_TOPIC "/cf/v1/AAA/012C/012C000003AX/set"
#define SEED_PATTERN "/cf/v1/{product}/{model}/{device}/{action}"

/* ------------------------------------------------------------------ */
/* helpers */

/* Writes content (len bytes) to a new file in /tmp; returns its malloc'd path. */
static char *
write_tmp_len(const char *content, size_t len)
{
	char tmpl[] = "/tmp/cmdrelay-unit-XXXXXX.yaml";
	int fd = mkstemps(tmpl, 5);

	assert_true(fd >= 0);
	assert_int_equal(write(fd, content, len), (ssize_t)len);
	assert_int_equal(close(fd), 0);
	return strdup(tmpl);
}

static char *
write_tmp(const char *content)
{
	return write_tmp_len(content, strlen(content));
}

/* A fresh directory in /tmp; returns its malloc'd path. */
static char *
make_tmp_dir(void)
{
	char tmpl[] = "/tmp/cmdrelay-unit-dir-XXXXXX";

	assert_non_null(mkdtemp(tmpl));
	return strdup(tmpl);
}

static void
write_file(const char *path, const char *content, size_t len)
{
	FILE *fp = fopen(path, "we");

	assert_non_null(fp);
	assert_int_equal(fwrite(content, 1, len, fp), len);
	assert_int_equal(fclose(fp), 0);
}

/* Loads yaml (from a temporary file): must fail with "<file>:<suffix>". */
static void
expect_error_len(const char *yaml, size_t len, const char *suffix)
{
	char *path = write_tmp_len(yaml, len);
	char err[CONFIG_ERR_MAX] = "";
	char expected[CONFIG_ERR_MAX + PATH_MAX];
	struct config *cfg = NULL;
	int rc;

	rc = config_load(path, &cfg, err, sizeof(err));
	unlink(path);
	snprintf(expected, sizeof(expected), "%s:%s", path, suffix);
	free(path);
	if (rc != -1) {
		config_free(cfg);
		fail_msg("config accepted, expected error '%s'", expected);
	}
	assert_string_equal(err, expected);
}

static void
expect_error(const char *yaml, const char *suffix)
{
	expect_error_len(yaml, strlen(yaml), suffix);
}

/* Loads yaml (from a temporary file): must succeed. */
static struct config *
load_ok(const char *yaml)
{
	char *path = write_tmp(yaml);
	char err[CONFIG_ERR_MAX] = "";
	struct config *cfg = NULL;
	int rc;

	rc = config_load(path, &cfg, err, sizeof(err));
	unlink(path);
	free(path);
	if (rc != 0)
		fail_msg("config rejected: %s", err);
	assert_non_null(cfg);
	return cfg;
}

struct error_case {
	const char *yaml;
	const char *suffix;	/* expected message after "<file>:" */
};

static void
run_error_cases(const struct error_case *cases, size_t n)
{
	for (size_t i = 0; i < n; i++)
		expect_error(cases[i].yaml, cases[i].suffix);
}

#define RUN_CASES(c) run_error_cases((c), sizeof(c) / sizeof((c)[0]))

/* A long string of n copies of c (static buffer, reused). */
static const char *
repeat(char c, size_t n)
{
	static char buf[1100];

	assert_true(n < sizeof(buf));
	memset(buf, c, n);
	buf[n] = '\0';
	return buf;
}

#define HEAD "broker:\n  client_id: gw-1\n"			/* lines 1-2 */
#define SUBS "subscriptions:\n  - topic: a/b\n"			/* 2 lines */

/* Whatever a test did to the environment (and however it ended), the next one starts clean. */
static int
unset_credentials(void **state)
{
	(void)state;
	unsetenv("CREDENTIALS_DIRECTORY");
	return 0;
}

static int
group_setup(void **state)
{
	(void)state;
	/* the credential of the environment must not leak into the tests */
	unsetenv("CREDENTIALS_DIRECTORY");
	/* keep the password warnings of config.c out of the way */
	log_set_level(LOG_LEVEL_ERR);
	return 0;
}

/* ------------------------------------------------------------------ */
/* parse_duration_ms */

TEST(test_duration_units)
{
	int64_t ms;

	assert_int_equal(parse_duration_ms("500ms", &ms), 0);
	assert_int_equal(ms, 500);
	assert_int_equal(parse_duration_ms("30s", &ms), 0);
	assert_int_equal(ms, 30000);
	assert_int_equal(parse_duration_ms("5m", &ms), 0);
	assert_int_equal(ms, 300000);
	assert_int_equal(parse_duration_ms("1h", &ms), 0);
	assert_int_equal(ms, 3600000);
	assert_int_equal(parse_duration_ms("90d", &ms), 0);
	assert_int_equal(ms, 90 * DAY_MS_T);
	assert_int_equal(parse_duration_ms("1ms", &ms), 0);
	assert_int_equal(ms, 1);
	assert_int_equal(parse_duration_ms("60m", &ms), 0);
	assert_int_equal(ms, 3600000);
	/* leading zeros are plain decimal, not octal */
	assert_int_equal(parse_duration_ms("010s", &ms), 0);
	assert_int_equal(ms, 10000);
}

TEST(test_duration_zero)
{
	int64_t ms = 42;

	assert_int_equal(parse_duration_ms("0ms", &ms), 0);
	assert_int_equal(ms, 0);
	ms = 42;
	assert_int_equal(parse_duration_ms("0s", &ms), 0);
	assert_int_equal(ms, 0);
	ms = 42;
	assert_int_equal(parse_duration_ms("0d", &ms), 0);
	assert_int_equal(ms, 0);
}

TEST(test_duration_large_and_overflow)
{
	int64_t ms;

	assert_int_equal(parse_duration_ms("9223372036854775807ms", &ms), 0);
	assert_int_equal(ms, INT64_MAX);
	/* INT64_MAX / 86400000 = 106751991167 */
	assert_int_equal(parse_duration_ms("106751991167d", &ms), 0);
	assert_int_equal(ms, 106751991167LL * DAY_MS_T);
	assert_int_equal(parse_duration_ms("106751991168d", &ms), -1);
	/* INT64_MAX / 1000 = 9223372036854775 */
	assert_int_equal(parse_duration_ms("9223372036854775s", &ms), 0);
	assert_int_equal(ms, 9223372036854775000LL);
	assert_int_equal(parse_duration_ms("9223372036854776s", &ms), -1);
	/* INT64_MAX / 3600000 = 2562047788015 */
	assert_int_equal(parse_duration_ms("2562047788015h", &ms), 0);
	assert_int_equal(parse_duration_ms("2562047788016h", &ms), -1);
	assert_int_equal(parse_duration_ms("153722867280912m", &ms), 0);
	assert_int_equal(parse_duration_ms("153722867280913m", &ms), -1);
	/* does not fit strtoll at all */
	assert_int_equal(parse_duration_ms("9223372036854775808ms", &ms), -1);
	assert_int_equal(parse_duration_ms("99999999999999999999999s", &ms), -1);
}

TEST(test_duration_malformed)
{
	static const char *const bad[] = {
		"",		/* empty */
		"10",		/* missing unit */
		"0",
		"10x",		/* unknown unit */
		"10sec",
		"10S",
		"10H",
		"10ms5",
		"10mss",
		"1.5s",
		"1e3ms",
		"-1s",		/* negative */
		"-0s",
		"+1s",
		" 1s",		/* spaces */
		"1s ",
		"1 s",
		"\t1s",
		"s",		/* no number */
		"ms",
		"d",
		"0x10s",
	};
	int64_t ms;

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		if (parse_duration_ms(bad[i], &ms) != -1)
			fail_msg("parse_duration_ms(\"%s\") accepted it as %" PRId64, bad[i], ms);
	}
}

/* ------------------------------------------------------------------ */
/* config_load: valid files */

TEST(test_config_shipped)
{
	char err[CONFIG_ERR_MAX] = "";
	struct config *cfg = NULL;

	if (config_load(SHIPPED_CONFIG, &cfg, err, sizeof(err)) != 0)
		fail_msg("%s", err);
	assert_string_equal(cfg->file, SHIPPED_CONFIG);
	assert_string_equal(cfg->broker.host, "127.0.0.1");
	assert_int_equal(cfg->broker.port, 1883);
	assert_string_equal(cfg->broker.client_id, "gateway-012C000003AX");
	assert_int_equal(cfg->broker.keepalive, 60);
	assert_string_equal(cfg->broker.protocol, "auto");
	/* MQTT 5's "never expires": auto must not shorten the session 3.1.1 keeps */
	assert_int_equal(cfg->broker.session_expiry_ms, 4294967295LL * 1000);
	assert_null(cfg->broker.username);
	assert_null(cfg->broker.password_file);
	assert_null(cfg->broker.password);
	assert_null(cfg->broker.tls_ca_file);
	assert_null(cfg->broker.tls_cert_file);
	assert_null(cfg->broker.tls_key_file);
	assert_int_equal(cfg->broker.reconnect_min_ms, 1000);
	assert_int_equal(cfg->broker.reconnect_max_ms, 60000);
	assert_int_equal(cfg->nsubs, 1);
	assert_string_equal(cfg->subs[0].topic, SEED_TOPIC);
	assert_int_equal(cfg->subs[0].qos, 1);
	assert_string_equal(cfg->topic_fields, SEED_PATTERN);
	assert_int_equal(cfg->redelivery_window_ms, 3600000);
	assert_string_equal(cfg->store.path, "/var/lib/cmdrelay/history.db");
	assert_int_equal(cfg->store.max_age_ms, 90 * DAY_MS_T);
	assert_int_equal(cfg->store.max_rows, 10000000);
	assert_string_equal(cfg->socket.path, "/run/cmdrelay/cmdrelay.sock");
	assert_int_equal(cfg->socket.mode, 0660);
	assert_int_equal(cfg->socket.max_consumers, 64);
	assert_int_equal(cfg->socket.window, 256);
	assert_int_equal(cfg->log_level, LOG_LEVEL_INFO);
	config_free(cfg);
}

TEST(test_config_minimal_defaults)
{
	struct config *cfg = load_ok(
	    "broker:\n"
	    "  client_id: gw-1\n"
	    "subscriptions:\n"
	    "  - topic: /cf/v1/+/+/+/set\n");

	assert_string_equal(cfg->broker.host, "127.0.0.1");
	assert_int_equal(cfg->broker.port, 1883);
	assert_string_equal(cfg->broker.client_id, "gw-1");
	assert_int_equal(cfg->broker.keepalive, 60);
	assert_null(cfg->broker.username);
	assert_null(cfg->broker.password_file);
	assert_null(cfg->broker.password);
	assert_null(cfg->broker.tls_ca_file);
	assert_null(cfg->broker.tls_cert_file);
	assert_null(cfg->broker.tls_key_file);
	assert_int_equal(cfg->broker.reconnect_min_ms, 1000);
	assert_int_equal(cfg->broker.reconnect_max_ms, 60000);
	assert_int_equal(cfg->nsubs, 1);
	assert_string_equal(cfg->subs[0].topic, "/cf/v1/+/+/+/set");
	assert_int_equal(cfg->subs[0].qos, 1);
	assert_string_equal(cfg->topic_fields, SEED_PATTERN);
	assert_int_equal(cfg->redelivery_window_ms, 3600 * 1000);
	assert_string_equal(cfg->store.path, "/var/lib/cmdrelay/history.db");
	assert_int_equal(cfg->store.max_age_ms, 90 * DAY_MS_T);
	assert_int_equal(cfg->store.max_rows, 10000000);
	assert_string_equal(cfg->socket.path, "/run/cmdrelay/cmdrelay.sock");
	assert_int_equal(cfg->socket.mode, 0660);
	assert_int_equal(cfg->socket.max_consumers, 64);
	assert_int_equal(cfg->socket.window, 256);
	assert_int_equal(cfg->log_level, LOG_LEVEL_INFO);
	config_free(cfg);
}

TEST(test_config_full_non_default)
{
	char *dir = make_tmp_dir();
	char pwpath[PATH_MAX], yaml[PATH_MAX + 4096];
	struct config *cfg;

	snprintf(pwpath, sizeof(pwpath), "%s/password", dir);
	write_file(pwpath, "s3cret\n", 7);
	chmod(pwpath, 0600);
	snprintf(yaml, sizeof(yaml),
	    "broker:\n"
	    "  host: mqtt.example.org\n"
	    "  port: 8883\n"
	    "  client_id: gateway-012C000003AX\n"
	    "  keepalive: 30\n"
	    "  username: rabbit_user\n"
	    "  password_file: %s\n"
	    "  tls:\n"
	    "    ca_file: ../configs/tls/ca.pem\n"
	    "    cert_file: ../configs/tls/client.pem\n"
	    "    key_file: ../configs/tls/client.key\n"
	    "  reconnect: { min_delay: 250ms, max_delay: 5m }\n"
	    "subscriptions:\n"
	    "  - topic: /cf/v1/AAA/012C/012C000003AX/set\n"
	    "    qos: 0\n"
	    "  - { topic: /cf/v1/+/+/+/reboot, qos: 1 }\n"
	    "  - topic: /cf/v2/#\n"
	    "topic_fields: /cf/{version}/{product}/{model}/{device}/{action}\n"
	    "dedup:\n"
	    "  redelivery_window: 2d\n"
	    "store:\n"
	    "  path: /srv/cmdrelay/history.db\n"
	    "  retention:\n"
	    "    max_age: 12h\n"
	    "    max_rows: 1000\n"
	    "socket:\n"
	    "  path: /run/cmdrelay/other.sock\n"
	    "  mode: 0600\n"
	    "  max_consumers: 1024\n"
	    "  window: 65536\n"
	    "log:\n"
	    "  level: debug\n", pwpath);
	cfg = load_ok(yaml);
	assert_string_equal(cfg->broker.host, "mqtt.example.org");
	assert_int_equal(cfg->broker.port, 8883);
	assert_string_equal(cfg->broker.client_id, "gateway-012C000003AX");
	assert_int_equal(cfg->broker.keepalive, 30);
	assert_string_equal(cfg->broker.username, "rabbit_user");
	assert_string_equal(cfg->broker.password_file, pwpath);
	assert_string_equal(cfg->broker.password, "s3cret");
	assert_string_equal(cfg->broker.tls_ca_file, "../configs/tls/ca.pem");
	assert_string_equal(cfg->broker.tls_cert_file, "../configs/tls/client.pem");
	assert_string_equal(cfg->broker.tls_key_file, "../configs/tls/client.key");
	assert_int_equal(cfg->broker.reconnect_min_ms, 250);
	assert_int_equal(cfg->broker.reconnect_max_ms, 300000);
	assert_int_equal(cfg->nsubs, 3);
	assert_string_equal(cfg->subs[0].topic, SEED_TOPIC);
	assert_int_equal(cfg->subs[0].qos, 0);
	assert_string_equal(cfg->subs[1].topic, "/cf/v1/+/+/+/reboot");
	assert_int_equal(cfg->subs[1].qos, 1);
	assert_string_equal(cfg->subs[2].topic, "/cf/v2/#");
	assert_int_equal(cfg->subs[2].qos, 1);
	assert_string_equal(cfg->topic_fields, "/cf/{version}/{product}/{model}/{device}/{action}");
	assert_int_equal(cfg->redelivery_window_ms, 2 * DAY_MS_T);
	assert_string_equal(cfg->store.path, "/srv/cmdrelay/history.db");
	assert_int_equal(cfg->store.max_age_ms, 12 * 3600 * 1000);
	assert_int_equal(cfg->store.max_rows, 1000);
	assert_string_equal(cfg->socket.path, "/run/cmdrelay/other.sock");
	assert_int_equal(cfg->socket.mode, 0600);
	assert_int_equal(cfg->socket.max_consumers, 1024);
	assert_int_equal(cfg->socket.window, 65536);
	assert_int_equal(cfg->log_level, LOG_LEVEL_DEBUG);
	config_free(cfg);
	unlink(pwpath);
	rmdir(dir);
	free(dir);
}

/* Every bound of the key table is inclusive. */
TEST(test_config_bounds_inclusive)
{
	char yaml[8192];
	struct config *cfg;

	cfg = load_ok(HEAD "  port: 1\n  keepalive: 5\n"
	    "  reconnect: { min_delay: 100ms, max_delay: 1s }\n" SUBS
	    "  - topic: c/d\n    qos: 0\n"
	    "dedup: { redelivery_window: 1s }\n"
	    "store: { retention: { max_age: 1h, max_rows: 1000 } }\n"
	    "socket: { mode: \"0000\", max_consumers: 1, window: 1 }\n"
	    "log: { level: error }\n");
	assert_int_equal(cfg->broker.port, 1);
	assert_int_equal(cfg->broker.keepalive, 5);
	assert_int_equal(cfg->broker.reconnect_min_ms, 100);
	assert_int_equal(cfg->broker.reconnect_max_ms, 1000);
	assert_int_equal(cfg->subs[1].qos, 0);
	assert_int_equal(cfg->redelivery_window_ms, 1000);
	assert_int_equal(cfg->store.max_age_ms, 3600000);
	assert_int_equal(cfg->store.max_rows, 1000);
	assert_int_equal(cfg->socket.mode, 0);
	assert_int_equal(cfg->socket.max_consumers, 1);
	assert_int_equal(cfg->socket.window, 1);
	assert_int_equal(cfg->log_level, LOG_LEVEL_ERR);
	config_free(cfg);

	cfg = load_ok(HEAD "  port: 65535\n  keepalive: 65535\n"
	    "  reconnect: { min_delay: 1h, max_delay: 1d }\n" SUBS
	    "dedup: { redelivery_window: 30d }\n"
	    "store: { retention: { max_age: 3650d, max_rows: 1000000000 } }\n"
	    "socket: { mode: \"777\", max_consumers: 1024, window: 65536 }\n"
	    "log: { level: warning }\n");
	assert_int_equal(cfg->broker.port, 65535);
	assert_int_equal(cfg->broker.keepalive, 65535);
	assert_int_equal(cfg->broker.reconnect_min_ms, 3600000);
	assert_int_equal(cfg->broker.reconnect_max_ms, DAY_MS_T);
	assert_int_equal(cfg->redelivery_window_ms, 30 * DAY_MS_T);
	assert_int_equal(cfg->store.max_age_ms, 3650 * DAY_MS_T);
	assert_int_equal(cfg->store.max_rows, 1000000000);
	assert_int_equal(cfg->socket.mode, 0777);
	assert_int_equal(cfg->log_level, LOG_LEVEL_WARN);
	config_free(cfg);

	/* longest strings: client_id 256, host 253, socket.path 107 (sun_path - 1) */
	snprintf(yaml, sizeof(yaml), "broker:\n  client_id: %s\n", repeat('c', 256));
	snprintf(yaml + strlen(yaml), sizeof(yaml) - strlen(yaml), "  host: %s\n", repeat('h', 253));
	snprintf(yaml + strlen(yaml), sizeof(yaml) - strlen(yaml), SUBS "socket:\n  path: /%s\n",
	    repeat('p', 106));
	cfg = load_ok(yaml);
	assert_int_equal(strlen(cfg->broker.client_id), 256);
	assert_int_equal(strlen(cfg->broker.host), 253);
	assert_int_equal(strlen(cfg->socket.path), 107);
	config_free(cfg);

	/* max_delay 1s alone is the default min_delay: equal is fine */
	cfg = load_ok(HEAD "  reconnect: { max_delay: 1s }\n" SUBS);
	assert_int_equal(cfg->broker.reconnect_min_ms, 1000);
	assert_int_equal(cfg->broker.reconnect_max_ms, 1000);
	config_free(cfg);
}

TEST(test_config_256_subscriptions)
{
	size_t cap = 64 + 256 * 32, len;
	char *yaml = malloc(cap);
	struct config *cfg;

	assert_non_null(yaml);
	len = (size_t)snprintf(yaml, cap, HEAD "subscriptions:\n");
	for (int i = 0; i < 256; i++)
		len += (size_t)snprintf(yaml + len, cap - len, "  - topic: t/%d\n", i);
	cfg = load_ok(yaml);
	assert_int_equal(cfg->nsubs, 256);
	assert_string_equal(cfg->subs[0].topic, "t/0");
	assert_string_equal(cfg->subs[255].topic, "t/255");
	assert_int_equal(cfg->subs[255].qos, 1);
	config_free(cfg);

	/* one more is one too many; the error points at the list */
	len += (size_t)snprintf(yaml + len, cap - len, "  - topic: t/256\n");
	expect_error(yaml, "4:3: subscriptions: 257 entries, expected 1 to 256");
	free(yaml);
}

/* ------------------------------------------------------------------ */
/* config_load: error paths */

TEST(test_config_missing_file)
{
	char err[CONFIG_ERR_MAX] = "";
	struct config *cfg = NULL;

	assert_int_equal(config_load("/nonexistent/cmdrelay.yaml", &cfg, err, sizeof(err)), -1);
	assert_string_equal(err, "/nonexistent/cmdrelay.yaml: No such file or directory");
	assert_null(cfg);
}

TEST(test_config_yaml_syntax)
{
	static const struct error_case cases[] = {
		{ HEAD "  port: 1883\n host: x\n" SUBS, "4:2: did not find expected key" },
		{ "broker:\n\tclient_id: gw-1\n", "2:1: found character that cannot start any token" },
	};

	RUN_CASES(cases);
}

TEST(test_config_empty_file)
{
	expect_error("", " the file is empty");
	expect_error("# nothing but a comment\n\n", " the file is empty");
}

TEST(test_config_top_not_mapping)
{
	static const struct error_case cases[] = {
		{ "- broker\n- subscriptions\n", "1:1: expected a mapping at the top, got a list" },
		{ "# a comment\ncmdrelay\n", "2:1: expected a mapping at the top, got a single value" },
	};

	RUN_CASES(cases);
}

TEST(test_config_unknown_keys)
{
	static const struct error_case cases[] = {
		{ HEAD "subscription:\n  - topic: a/b\n", "3:1: unknown key 'subscription'" },
		{ HEAD "  prot: 1883\n" SUBS, "3:3: unknown key 'broker.prot'" },
		{ HEAD "  tls:\n    ca_fle: ../configs/tls/ca.pem\n" SUBS,
		  "4:5: unknown key 'broker.tls.ca_fle'" },
		{ HEAD SUBS "    qso: 1\n", "5:5: unknown key 'subscriptions[].qso'" },
		{ HEAD SUBS "store:\n  retention: { max_age: 90d, maxrows: 5 }\n",
		  "6:30: unknown key 'store.retention.maxrows'" },
	};

	RUN_CASES(cases);
}

TEST(test_config_duplicate_keys)
{
	static const struct error_case cases[] = {
		{ HEAD "  port: 1883\n  port: 1884\n" SUBS, "4:3: key 'broker.port' appears twice" },
		{ HEAD SUBS "broker:\n  port: 1\n", "5:1: key 'broker' appears twice" },
		{ HEAD SUBS "    topic: c/d\n", "5:5: key 'subscriptions[].topic' appears twice" },
	};

	RUN_CASES(cases);
}

TEST(test_config_non_scalar_key)
{
	expect_error(HEAD "  ? [a]\n  : 1\n" SUBS,
	    "3:5: keys must be plain names (nest sections instead of dots)");
	expect_error(HEAD "  ? { a: b }\n  : 1\n" SUBS,
	    "3:5: keys must be plain names (nest sections instead of dots)");
}

TEST(test_config_wrong_node_types)
{
	static const struct error_case cases[] = {
		/* section that is a scalar */
		{ "broker: localhost\n" SUBS, "1:9: broker: expected a mapping, got a single value" },
		{ HEAD SUBS "store:\n  retention: 90d\n",
		  "6:14: store.retention: expected a mapping, got a single value" },
		{ HEAD "  tls: [a]\n" SUBS, "3:8: broker.tls: expected a mapping, got a list" },
		/* a section left empty is an empty scalar */
		{ HEAD "  tls:\n" SUBS, "3:7: broker.tls: expected a mapping, got a single value" },
		/* scalar that is a list or a mapping */
		{ HEAD "  port: [1883]\n" SUBS, "3:9: broker.port: expected a single value, got a list" },
		{ "broker:\n  client_id: { a: b }\n" SUBS,
		  "2:14: broker.client_id: expected a single value, got a mapping" },
		{ HEAD "subscriptions:\n  - topic: [a, b]\n",
		  "4:12: subscriptions[].topic: expected a single value, got a list" },
		/* subscriptions not a list */
		{ HEAD "subscriptions: a/b\n", "3:16: subscriptions: expected a list, got a single value" },
		{ HEAD "subscriptions:\n  topic: a/b\n", "4:3: subscriptions: expected a list, got a mapping" },
		{ HEAD "subscriptions:\n", "3:15: subscriptions: expected a list, got a single value" },
	};

	RUN_CASES(cases);
}

TEST(test_config_empty_values)
{
	static const struct error_case cases[] = {
		{ HEAD "  host:\n" SUBS, "3:8: broker.host: needs a value" },
		{ HEAD "  port:\n" SUBS, "3:8: broker.port: needs a value" },
		{ "broker:\n  client_id:\n" SUBS, "2:13: broker.client_id: needs a value" },
		/* quoted empty: a value of length 0 */
		{ HEAD "  host: \"\"\n" SUBS, "3:9: broker.host: length 0 is out of range (1..253)" },
		{ HEAD "  port: ''\n" SUBS, "3:9: broker.port: '' is not an integer" },
		{ HEAD "subscriptions:\n  - topic: \"\"\n",
		  "4:12: subscriptions[].topic: length 0 is out of range (1..1024)" },
		{ HEAD SUBS "topic_fields: \"\"\n", "5:15: topic_fields: length 0 is out of range (1..1024)" },
	};

	RUN_CASES(cases);
}

TEST(test_config_bad_integers)
{
	static const struct error_case cases[] = {
		{ HEAD "  port: abc\n" SUBS, "3:9: broker.port: 'abc' is not an integer" },
		{ HEAD "  port: 18.83\n" SUBS, "3:9: broker.port: '18.83' is not an integer" },
		{ HEAD "  port: 1883x\n" SUBS, "3:9: broker.port: '1883x' is not an integer" },
		{ HEAD "  port: 0x75b\n" SUBS, "3:9: broker.port: '0x75b' is not an integer" },
		{ HEAD "  port: 99999999999999999999\n" SUBS,
		  "3:9: broker.port: '99999999999999999999' is not an integer" },
		{ HEAD "  keepalive: 1m\n" SUBS, "3:14: broker.keepalive: '1m' is not an integer" },
		{ HEAD "subscriptions:\n  - topic: a/b\n    qos: one\n",
		  "5:10: subscriptions[].qos: 'one' is not an integer" },
	};

	RUN_CASES(cases);
}

TEST(test_config_int_out_of_range)
{
	static const struct error_case cases[] = {
		{ HEAD "  port: 70000\n" SUBS, "3:9: broker.port: 70000 is out of range (1..65535)" },
		{ HEAD "  port: 0\n" SUBS, "3:9: broker.port: 0 is out of range (1..65535)" },
		{ HEAD "  port: -1883\n" SUBS, "3:9: broker.port: -1883 is out of range (1..65535)" },
		{ HEAD "  keepalive: 4\n" SUBS, "3:14: broker.keepalive: 4 is out of range (5..65535)" },
		{ HEAD "  keepalive: 65536\n" SUBS, "3:14: broker.keepalive: 65536 is out of range (5..65535)" },
		{ HEAD "subscriptions:\n  - topic: a/b\n    qos: 2\n",
		  "5:10: subscriptions[].qos: 2 is out of range (0..1)" },
		{ HEAD "subscriptions:\n  - topic: a/b\n    qos: -1\n",
		  "5:10: subscriptions[].qos: -1 is out of range (0..1)" },
		{ HEAD SUBS "store:\n  retention: { max_age: 90d, max_rows: 999 }\n",
		  "6:40: store.retention.max_rows: 999 is out of range (1000..1000000000)" },
		{ HEAD SUBS "store:\n  retention: { max_rows: 1000000001 }\n",
		  "6:26: store.retention.max_rows: 1000000001 is out of range (1000..1000000000)" },
		{ HEAD SUBS "socket:\n  max_consumers: 0\n",
		  "6:18: socket.max_consumers: 0 is out of range (1..1024)" },
		{ HEAD SUBS "socket:\n  max_consumers: 1025\n",
		  "6:18: socket.max_consumers: 1025 is out of range (1..1024)" },
		{ HEAD SUBS "socket:\n  window: 65537\n", "6:11: socket.window: 65537 is out of range (1..65536)" },
		{ HEAD SUBS "socket:\n  window: 0\n", "6:11: socket.window: 0 is out of range (1..65536)" },
	};

	RUN_CASES(cases);
}

TEST(test_config_bad_durations)
{
	static const struct error_case cases[] = {
		{ HEAD "  reconnect:\n    min_delay: 1\n" SUBS,
		  "4:16: broker.reconnect.min_delay: '1' is not a duration (a number with ms, s, m, h or d)" },
		{ HEAD "  reconnect:\n    min_delay: 1sec\n" SUBS,
		  "4:16: broker.reconnect.min_delay: '1sec' is not a duration (a number with ms, s, m, h or d)" },
		{ HEAD "  reconnect:\n    max_delay: 1.5s\n" SUBS,
		  "4:16: broker.reconnect.max_delay: '1.5s' is not a duration (a number with ms, s, m, h or d)" },
		{ HEAD SUBS "dedup:\n  redelivery_window: -5s\n",
		  "6:22: dedup.redelivery_window: '-5s' is not a duration (a number with ms, s, m, h or d)" },
		{ HEAD SUBS "dedup:\n  redelivery_window: \"1 h\"\n",
		  "6:22: dedup.redelivery_window: '1 h' is not a duration (a number with ms, s, m, h or d)" },
		/* overflows int64 milliseconds */
		{ HEAD SUBS "dedup:\n  redelivery_window: 106751991168d\n",
		  "6:22: dedup.redelivery_window: '106751991168d' is not a duration (a number with ms, s, m, h or d)" },
	};

	RUN_CASES(cases);
}

TEST(test_config_duration_out_of_range)
{
	static const struct error_case cases[] = {
		{ HEAD "  reconnect:\n    min_delay: 50ms\n" SUBS,
		  "4:16: broker.reconnect.min_delay: 50ms is out of range (100ms..3600000ms)" },
		{ HEAD "  reconnect:\n    min_delay: 61m\n" SUBS,
		  "4:16: broker.reconnect.min_delay: 61m is out of range (100ms..3600000ms)" },
		{ HEAD "  reconnect:\n    max_delay: 999ms\n" SUBS,
		  "4:16: broker.reconnect.max_delay: 999ms is out of range (1000ms..86400000ms)" },
		{ HEAD "  reconnect:\n    max_delay: 2d\n" SUBS,
		  "4:16: broker.reconnect.max_delay: 2d is out of range (1000ms..86400000ms)" },
		{ HEAD SUBS "dedup:\n  redelivery_window: 31d\n",
		  "6:22: dedup.redelivery_window: 31d is out of range (1000ms..2592000000ms)" },
		{ HEAD SUBS "dedup:\n  redelivery_window: 999ms\n",
		  "6:22: dedup.redelivery_window: 999ms is out of range (1000ms..2592000000ms)" },
		{ HEAD SUBS "store:\n  retention:\n    max_age: 59m\n",
		  "7:14: store.retention.max_age: 59m is out of range (3600000ms..315360000000ms)" },
		{ HEAD SUBS "store:\n  retention:\n    max_age: 3651d\n",
		  "7:14: store.retention.max_age: 3651d is out of range (3600000ms..315360000000ms)" },
	};

	RUN_CASES(cases);
}

TEST(test_config_bad_modes)
{
	static const struct error_case cases[] = {
		{ HEAD SUBS "socket:\n  mode: \"rw-rw----\"\n",
		  "6:9: socket.mode: 'rw-rw----' is not an octal file mode such as \"0660\"" },
		{ HEAD SUBS "socket:\n  mode: \"0668\"\n",
		  "6:9: socket.mode: '0668' is not an octal file mode such as \"0660\"" },
		{ HEAD SUBS "socket:\n  mode: \"66\"\n",
		  "6:9: socket.mode: '66' is not an octal file mode such as \"0660\"" },
		{ HEAD SUBS "socket:\n  mode: \"06600\"\n",
		  "6:9: socket.mode: '06600' is not an octal file mode such as \"0660\"" },
		{ HEAD SUBS "socket:\n  mode: \"-660\"\n",
		  "6:9: socket.mode: '-660' is not an octal file mode such as \"0660\"" },
		{ HEAD SUBS "socket:\n  mode: 0o660\n",
		  "6:9: socket.mode: '0o660' is not an octal file mode such as \"0660\"" },
		/* mode out of range */
		{ HEAD SUBS "socket:\n  mode: \"1777\"\n", "6:9: socket.mode: 1777 is out of range (0000..0777)" },
		{ HEAD SUBS "socket:\n  mode: 4755\n", "6:9: socket.mode: 4755 is out of range (0000..0777)" },
	};

	RUN_CASES(cases);
}

TEST(test_config_bad_log_level)
{
	static const struct error_case cases[] = {
		{ HEAD SUBS "log:\n  level: verbose\n",
		  "6:10: log.level: 'verbose' is not one of error, warning, info, debug" },
		{ HEAD SUBS "log:\n  level: warn\n",
		  "6:10: log.level: 'warn' is not one of error, warning, info, debug" },
		{ HEAD SUBS "log:\n  level: 6\n",
		  "6:10: log.level: '6' is not one of error, warning, info, debug" },
	};

	RUN_CASES(cases);
}

TEST(test_config_strings_too_long)
{
	char yaml[8192];

	snprintf(yaml, sizeof(yaml), "broker:\n  client_id: %s\n" SUBS, repeat('c', 257));
	expect_error(yaml, "2:14: broker.client_id: length 257 is out of range (1..256)");
	snprintf(yaml, sizeof(yaml), HEAD "  host: %s\n" SUBS, repeat('h', 254));
	expect_error(yaml, "3:9: broker.host: length 254 is out of range (1..253)");
	snprintf(yaml, sizeof(yaml), HEAD "  username: %s\n" SUBS, repeat('u', 257));
	expect_error(yaml, "3:13: broker.username: length 257 is out of range (1..256)");
	snprintf(yaml, sizeof(yaml), HEAD "subscriptions:\n  - topic: %s\n", repeat('t', 1025));
	expect_error(yaml, "4:12: subscriptions[].topic: length 1025 is out of range (1..1024)");
	/* socket.path: sun_path is 108 bytes, so at most 107 */
	snprintf(yaml, sizeof(yaml), HEAD SUBS "socket:\n  path: /%s\n", repeat('p', 107));
	expect_error(yaml, "6:9: socket.path: length 108 is out of range (1..107)");
}

/* A NUL byte (YAML "\0") in any scalar, of any type, is an error, not an end. */
TEST(test_config_nul_byte)
{
	static const struct error_case cases[] = {
		/* strings */
		{ "broker:\n  client_id: \"gw\\0x\"\n" SUBS, "2:14: broker.client_id: contains a NUL byte" },
		{ HEAD "  host: \"10.0.0.1\\0.example\"\n" SUBS, "3:9: broker.host: contains a NUL byte" },
		{ HEAD "  username: \"u\\0\"\n  password_file: /etc/cmdrelay/password\n" SUBS,
		  "3:13: broker.username: contains a NUL byte" },
		{ HEAD "  username: u\n  password_file: \"/etc/cmdrelay/password\\0x\"\n" SUBS,
		  "4:18: broker.password_file: contains a NUL byte" },
		{ HEAD "subscriptions:\n  - topic: \"a/b\\0/c\"\n",
		  "4:12: subscriptions[].topic: contains a NUL byte" },
		{ HEAD SUBS "topic_fields: \"/cf/{device}\\0x\"\n", "5:15: topic_fields: contains a NUL byte" },
		{ HEAD SUBS "store:\n  path: \"/var/lib/cmdrelay/h\\0.db\"\n",
		  "6:9: store.path: contains a NUL byte" },
		/* integers: "1883\0x" once passed as 1883 */
		{ HEAD "  port: \"1883\\0x\"\n" SUBS, "3:9: broker.port: contains a NUL byte" },
		{ HEAD "  port: \"1883\\0\"\n" SUBS, "3:9: broker.port: contains a NUL byte" },
		{ HEAD "  keepalive: \"60\\0\"\n" SUBS, "3:14: broker.keepalive: contains a NUL byte" },
		{ HEAD SUBS "    qos: \"1\\0\"\n", "5:10: subscriptions[].qos: contains a NUL byte" },
		/* durations, modes, the log level */
		{ HEAD "  reconnect:\n    min_delay: \"1s\\0x\"\n" SUBS,
		  "4:16: broker.reconnect.min_delay: contains a NUL byte" },
		{ HEAD SUBS "dedup:\n  redelivery_window: \"1h\\0\"\n",
		  "6:22: dedup.redelivery_window: contains a NUL byte" },
		{ HEAD SUBS "socket:\n  mode: \"0660\\0\"\n", "6:9: socket.mode: contains a NUL byte" },
		{ HEAD SUBS "log:\n  level: \"info\\0\"\n", "6:10: log.level: contains a NUL byte" },
		/* a NUL alone */
		{ HEAD "  host: \"\\0\"\n" SUBS, "3:9: broker.host: contains a NUL byte" },
	};

	RUN_CASES(cases);
}

TEST(test_config_subscription_errors)
{
	static const struct error_case cases[] = {
		{ HEAD "subscriptions: []\n", "3:16: subscriptions: 0 entries, expected 1 to 256" },
		/* item not a mapping */
		{ HEAD "subscriptions:\n  - a/b\n",
		  "4:5: subscriptions: each entry must be a mapping with topic and qos" },
		{ HEAD "subscriptions:\n  - topic: a/b\n  - [c/d]\n",
		  "5:5: subscriptions: each entry must be a mapping with topic and qos" },
		/* without topic */
		{ HEAD "subscriptions:\n  - qos: 1\n", "4:5: subscriptions: entry has no topic" },
		{ HEAD "subscriptions:\n  - topic: a/b\n  - {}\n", "5:5: subscriptions: entry has no topic" },
		/* invalid topic filters */
		{ HEAD "subscriptions:\n  - topic: a/#/b\n",
		  "4:5: subscriptions: 'a/#/b' is not a valid MQTT topic filter" },
		{ HEAD "subscriptions:\n  - topic: a/b+\n",
		  "4:5: subscriptions: 'a/b+' is not a valid MQTT topic filter" },
		{ HEAD "subscriptions:\n  - topic: a/#x\n",
		  "4:5: subscriptions: 'a/#x' is not a valid MQTT topic filter" },
		/* duplicate */
		{ HEAD "subscriptions:\n  - topic: a/b\n    qos: 1\n  - topic: a/b\n    qos: 0\n",
		  "6:5: subscriptions: 'a/b' is listed twice" },
	};

	RUN_CASES(cases);
}

TEST(test_config_missing_required)
{
	static const struct error_case cases[] = {
		{ "# no client_id\nbroker:\n  host: 10.0.0.1\n" SUBS,
		  "2:1: missing required key 'broker.client_id'" },
		{ SUBS, "1:1: missing required key 'broker.client_id'" },
		{ HEAD "log:\n  level: info\n", "1:1: missing required key 'subscriptions'" },
	};

	RUN_CASES(cases);
}

TEST(test_config_cross_field)
{
	static const struct error_case cases[] = {
		{ HEAD "  reconnect:\n    min_delay: 5m\n    max_delay: 2m\n" SUBS,
		  "4:5: broker.reconnect: min_delay is longer than max_delay" },
		/* max_delay defaults to 60s */
		{ HEAD "  reconnect:\n    min_delay: 2m\n" SUBS,
		  "4:5: broker.reconnect: min_delay is longer than max_delay" },
		{ HEAD "  tls:\n    ca_file: ../configs/tls/ca.pem\n    cert_file: ../configs/tls/client.pem\n" SUBS,
		  "3:3: broker.tls: cert_file and key_file go together" },
		{ HEAD "  tls:\n    ca_file: ../configs/tls/ca.pem\n    key_file: ../configs/tls/client.key\n" SUBS,
		  "3:3: broker.tls: cert_file and key_file go together" },
		{ HEAD "  tls:\n    cert_file: ../configs/tls/client.pem\n    key_file: ../configs/tls/client.key\n" SUBS,
		  "3:3: broker.tls: a client certificate needs ca_file" },
		{ HEAD "  password_file: /etc/cmdrelay/password\n" SUBS,
		  "3:3: broker.password_file needs broker.username" },
	};

	RUN_CASES(cases);
}

TEST(test_config_tls_ca_only)
{
	struct config *cfg = load_ok(HEAD "  tls:\n    ca_file: ../configs/tls/ca.pem\n" SUBS);

	assert_string_equal(cfg->broker.tls_ca_file, "../configs/tls/ca.pem");
	assert_null(cfg->broker.tls_cert_file);
	assert_null(cfg->broker.tls_key_file);
	config_free(cfg);
}

TEST(test_config_bad_topic_fields)
{
	static const struct error_case cases[] = {
		{ HEAD SUBS "topic_fields: /cf/v1/AAA\n", "5:1: topic_fields: pattern names no {field}" },
		{ HEAD SUBS "topic_fields: /cf/{a}/{a}\n", "5:1: topic_fields: field '{a}' appears twice" },
		{ HEAD SUBS "topic_fields: /cf/{Device}\n",
		  "5:1: topic_fields: field name '{Device}' must be 1 to 32 of a-z, 0-9, _" },
		{ HEAD SUBS "topic_fields: /cf/{}\n",
		  "5:1: topic_fields: field name '{}' must be 1 to 32 of a-z, 0-9, _" },
		{ HEAD SUBS "topic_fields: /cf/+/{device}\n",
		  "5:1: topic_fields: segment '+' must be literal text or one {name}" },
		{ HEAD SUBS "topic_fields: \"/cf/{device}/#\"\n",
		  "5:1: topic_fields: segment '#' must be literal text or one {name}" },
		{ HEAD SUBS "topic_fields: /cf/x{device}\n",
		  "5:1: topic_fields: segment 'x{device}' must be literal text or one {name}" },
	};

	RUN_CASES(cases);
}

/* ------------------------------------------------------------------ */
/* config_load: the password */

static char *
password_config(const char *password_file)
{
	static char yaml[PATH_MAX + 256];

	snprintf(yaml, sizeof(yaml),
	    "broker:\n"
	    "  client_id: gw-1\n"
	    "  username: rabbit_user\n"
	    "  password_file: %s\n" SUBS, password_file);
	return yaml;
}

TEST(test_config_password_unreadable)
{
	char msg[PATH_MAX + 128];
	char *dir = make_tmp_dir();

	expect_error(password_config("/nonexistent/cmdrelay-password"),
	    "4:3: broker.password_file: /nonexistent/cmdrelay-password: No such file or directory");
	/* open succeeds, read fails (tests run as root, so chmod 000 would not do) */
	snprintf(msg, sizeof(msg), "4:3: broker.password_file: %s: Is a directory", dir);
	expect_error(password_config(dir), msg);
	rmdir(dir);
	free(dir);
}

TEST(test_config_password_first_line)
{
	char *dir = make_tmp_dir();
	char pw[PATH_MAX];
	struct config *cfg;

	snprintf(pw, sizeof(pw), "%s/password", dir);
	write_file(pw, "s3cret\nsecond line\n", 19);
	cfg = load_ok(password_config(pw));
	assert_string_equal(cfg->broker.password, "s3cret");
	assert_string_equal(cfg->broker.password_file, pw);
	assert_string_equal(cfg->broker.username, "rabbit_user");
	config_free(cfg);

	write_file(pw, "crlf\r\n", 6);
	cfg = load_ok(password_config(pw));
	assert_string_equal(cfg->broker.password, "crlf");
	config_free(cfg);

	write_file(pw, "no-newline", 10);
	cfg = load_ok(password_config(pw));
	assert_string_equal(cfg->broker.password, "no-newline");
	config_free(cfg);

	unlink(pw);
	rmdir(dir);
	free(dir);
}

TEST(test_config_password_length)
{
	char *dir = make_tmp_dir();
	char pw[PATH_MAX], msg[PATH_MAX + 128], buf[1100];
	struct config *cfg;

	snprintf(pw, sizeof(pw), "%s/password", dir);
	/* 1024 bytes and a newline: the longest password */
	memset(buf, 'p', 1024);
	buf[1024] = '\n';
	write_file(pw, buf, 1025);
	cfg = load_ok(password_config(pw));
	assert_int_equal(strlen(cfg->broker.password), 1024);
	config_free(cfg);

	memset(buf, 'p', 1025);
	buf[1025] = '\n';
	write_file(pw, buf, 1026);
	snprintf(msg, sizeof(msg), "4:3: broker.password_file: %s: longer than 1024 bytes", pw);
	expect_error(password_config(pw), msg);

	unlink(pw);
	rmdir(dir);
	free(dir);
}

TEST(test_config_password_credential)
{
	char *creds = make_tmp_dir();
	char *dir = make_tmp_dir();
	char cred[PATH_MAX], pw[PATH_MAX], msg[PATH_MAX + 128];
	struct config *cfg;

	snprintf(cred, sizeof(cred), "%s/mqtt-password", creds);
	snprintf(pw, sizeof(pw), "%s/password", dir);
	write_file(pw, "from-file\n", 10);

	/* CREDENTIALS_DIRECTORY without mqtt-password: password_file is used */
	setenv("CREDENTIALS_DIRECTORY", creds, 1);
	cfg = load_ok(password_config(pw));
	assert_string_equal(cfg->broker.password, "from-file");
	config_free(cfg);

	/* the credential takes precedence over password_file */
	write_file(cred, "from-credential\nignored\n", 24);
	cfg = load_ok(password_config(pw));
	assert_string_equal(cfg->broker.password, "from-credential");
	config_free(cfg);

	/* ... even over a password_file that does not exist */
	cfg = load_ok(password_config("/nonexistent/cmdrelay-password"));
	assert_string_equal(cfg->broker.password, "from-credential");
	config_free(cfg);

	/* and it is loaded without any password_file */
	cfg = load_ok(HEAD "  username: rabbit_user\n" SUBS);
	assert_string_equal(cfg->broker.password, "from-credential");
	assert_null(cfg->broker.password_file);
	config_free(cfg);

	/* a credential that is too long: named as the credential, not as the file */
	{
		char buf[1100];

		memset(buf, 'p', 1025);
		buf[1025] = '\n';
		write_file(cred, buf, 1026);
		snprintf(msg, sizeof(msg), " credential mqtt-password: %s: longer than 1024 bytes", cred);
		expect_error(password_config(pw), msg);
	}

	/* an unreadable credential: no line in the config to point at */
	unlink(cred);
	assert_int_equal(mkdir(cred, 0700), 0);
	snprintf(msg, sizeof(msg), " credential mqtt-password: %s: Is a directory", cred);
	expect_error(password_config(pw), msg);
	rmdir(cred);

	unsetenv("CREDENTIALS_DIRECTORY");
	cfg = load_ok(password_config(pw));
	assert_string_equal(cfg->broker.password, "from-file");
	config_free(cfg);

	unlink(pw);
	rmdir(dir);
	rmdir(creds);
	free(dir);
	free(creds);
}

/* ------------------------------------------------------------------ */
/* config_load: keys are plain names, scalars are strict */

/*
 * Loads yaml in a child process, so that a crash of config_load() fails the
 * test instead of killing the runner (a dotted key once wrote past the
 * subscription into struct config and config_free() crashed). Returns the
 * wait status; err gets the message the child reported, *path_out the name
 * of the (removed) file, malloc'd.
 */
static int
load_in_child(const char *yaml, char **path_out, char *err, size_t errlen)
{
	char *path = write_tmp(yaml);
	int fds[2], status;
	pid_t pid;
	ssize_t n;

	assert_int_equal(pipe(fds), 0);
	fflush(NULL);
	pid = fork();
	assert_true(pid >= 0);
	if (pid == 0) {
		char cerr[CONFIG_ERR_MAX] = "";
		struct config *cfg = NULL;
		int r;

		/* cmocka's handlers would longjmp back into the test runner */
		signal(SIGSEGV, SIG_DFL);
		signal(SIGBUS, SIG_DFL);
		signal(SIGILL, SIG_DFL);
		signal(SIGFPE, SIG_DFL);
		signal(SIGABRT, SIG_DFL);
		close(fds[0]);
		r = config_load(path, &cfg, cerr, sizeof(cerr));
		if (r == 0)
			config_free(cfg);
		if (write(fds[1], cerr, strlen(cerr)) < 0)
			_exit(3);
		_exit(r == 0 ? 0 : 1);
	}
	close(fds[1]);
	n = read(fds[0], err, errlen - 1);
	err[n > 0 ? n : 0] = '\0';
	close(fds[0]);
	assert_int_equal(waitpid(pid, &status, 0), pid);
	unlink(path);
	*path_out = path;
	return status;
}

/* Like expect_error(), in a child: a crash is a failure, not the end of the run. */
static void
expect_error_in_child(const char *yaml, const char *suffix)
{
	char err[CONFIG_ERR_MAX], expected[CONFIG_ERR_MAX + PATH_MAX];
	char *path;
	int status = load_in_child(yaml, &path, err, sizeof(err));

	snprintf(expected, sizeof(expected), "%s:%s", path, suffix);
	free(path);
	if (WIFSIGNALED(status))
		fail_msg("config_load crashed with signal %d, expected error '%s'", WTERMSIG(status),
		    expected);
	assert_true(WIFEXITED(status));
	if (WEXITSTATUS(status) == 0)
		fail_msg("config accepted, expected error '%s'", expected);
	assert_int_equal(WEXITSTATUS(status), 1);
	assert_string_equal(err, expected);
}

#define PLAIN_NAMES "keys must be plain names (nest sections instead of dots)"

/*
 * Keys are plain names: a dotted or bracketed key is not a shortcut into the
 * key table (walk_mapping() joins the prefix and the key text to look a key
 * up), wherever it stands and however it is quoted.
 */
TEST(test_config_dotted_keys_rejected)
{
	static const struct error_case cases[] = {
		/* at the top: these once named nested keys (and the first one crashed) */
		{ HEAD "subscriptions[].qos: 1\n" SUBS, "3:1: " PLAIN_NAMES },
		{ HEAD "subscriptions[].topic: x/y\n" SUBS, "3:1: " PLAIN_NAMES },
		{ HEAD "broker.port: 1884\n" SUBS, "3:1: " PLAIN_NAMES },
		{ HEAD "broker.host: 10.0.0.1\n" SUBS, "3:1: " PLAIN_NAMES },
		/* not "missing required key 'broker.client_id'" */
		{ "broker.client_id: gw-1\n" SUBS, "1:1: " PLAIN_NAMES },
		{ HEAD SUBS "store.retention.max_rows: 5000\n", "5:1: " PLAIN_NAMES },
		/* in a section */
		{ HEAD "  tls.ca_file: ../configs/tls/ca.pem\n" SUBS, "3:3: " PLAIN_NAMES },
		{ HEAD "  reconnect.min_delay: 5s\n" SUBS, "3:3: " PLAIN_NAMES },
		{ HEAD SUBS "store:\n  retention[max_age]: 1d\n", "6:3: " PLAIN_NAMES },
		/* in a subscription */
		{ HEAD SUBS "    qos[0]: 1\n", "5:5: " PLAIN_NAMES },
		{ HEAD "subscriptions:\n  - { topic: a/b, .qos: 1 }\n", "4:19: " PLAIN_NAMES },
		/* quoted, in flow style, or nothing but the character */
		{ HEAD SUBS "\"store.path\": /tmp/history.db\n", "5:1: " PLAIN_NAMES },
		{ HEAD SUBS "log: { level.x: info }\n", "5:8: " PLAIN_NAMES },
		{ HEAD SUBS "\".\": 1\n", "5:1: " PLAIN_NAMES },
		{ HEAD SUBS "\"[\": 1\n", "5:1: " PLAIN_NAMES },
		{ HEAD SUBS "\"]\": 1\n", "5:1: " PLAIN_NAMES },
	};

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
		expect_error_in_child(cases[i].yaml, cases[i].suffix);
}

/* Dots and brackets in values are just text. */
TEST(test_config_dots_in_values)
{
	struct config *cfg = load_ok(
	    "broker:\n"
	    "  client_id: gw.1[a]\n"
	    "  host: mqtt.example.org\n"
	    "subscriptions:\n"
	    "  - topic: a.b/[c]/+\n"
	    "store:\n"
	    "  path: /var/lib/cmdrelay/history.v1.db\n");

	assert_string_equal(cfg->broker.client_id, "gw.1[a]");
	assert_string_equal(cfg->broker.host, "mqtt.example.org");
	assert_string_equal(cfg->subs[0].topic, "a.b/[c]/+");
	assert_string_equal(cfg->store.path, "/var/lib/cmdrelay/history.v1.db");
	config_free(cfg);
}

/* Integers are decimal digits with an optional '-', and nothing else. */
TEST(test_config_int_strict)
{
	static const struct error_case cases[] = {
		{ HEAD "  port: \" 1883\"\n" SUBS, "3:9: broker.port: ' 1883' is not an integer" },
		{ HEAD "  port: \"  1883\"\n" SUBS, "3:9: broker.port: '  1883' is not an integer" },
		{ HEAD "  port: \"\\t1883\"\n" SUBS, "3:9: broker.port: '\t1883' is not an integer" },
		{ HEAD "  port: \"\\n1883\"\n" SUBS, "3:9: broker.port: '\n1883' is not an integer" },
		{ HEAD "  port: \"1883 \"\n" SUBS, "3:9: broker.port: '1883 ' is not an integer" },
		{ HEAD "  port: +1883\n" SUBS, "3:9: broker.port: '+1883' is not an integer" },
		{ HEAD "  port: \"-\"\n" SUBS, "3:9: broker.port: '-' is not an integer" },
		{ HEAD "  port: \"- 1\"\n" SUBS, "3:9: broker.port: '- 1' is not an integer" },
		{ HEAD "  keepalive: \" 60\"\n" SUBS, "3:14: broker.keepalive: ' 60' is not an integer" },
		{ HEAD SUBS "    qos: \" 1\"\n", "5:10: subscriptions[].qos: ' 1' is not an integer" },
		{ HEAD SUBS "socket:\n  max_consumers: \" 64\"\n",
		  "6:18: socket.max_consumers: ' 64' is not an integer" },
		{ HEAD SUBS "store:\n  retention:\n    max_rows: \" 5000\"\n",
		  "7:15: store.retention.max_rows: ' 5000' is not an integer" },
	};
	struct config *cfg;

	RUN_CASES(cases);
	/* a quoted number and leading zeros are still numbers */
	cfg = load_ok(HEAD "  port: \"1884\"\n  keepalive: 0030\n" SUBS "    qos: \"0\"\n");
	assert_int_equal(cfg->broker.port, 1884);
	assert_int_equal(cfg->broker.keepalive, 30);
	assert_int_equal(cfg->subs[0].qos, 0);
	config_free(cfg);
}
int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_duration_units),
		cmocka_unit_test(test_duration_zero),
		cmocka_unit_test(test_duration_large_and_overflow),
		cmocka_unit_test(test_duration_malformed),

		cmocka_unit_test(test_config_shipped),
		cmocka_unit_test(test_config_minimal_defaults),
		cmocka_unit_test(test_config_full_non_default),
		cmocka_unit_test(test_config_bounds_inclusive),
		cmocka_unit_test(test_config_256_subscriptions),
		cmocka_unit_test(test_config_missing_file),
		cmocka_unit_test(test_config_yaml_syntax),
		cmocka_unit_test(test_config_empty_file),
		cmocka_unit_test(test_config_top_not_mapping),
		cmocka_unit_test(test_config_unknown_keys),
		cmocka_unit_test(test_config_duplicate_keys),
		cmocka_unit_test(test_config_non_scalar_key),
		cmocka_unit_test(test_config_wrong_node_types),
		cmocka_unit_test(test_config_empty_values),
		cmocka_unit_test(test_config_bad_integers),
		cmocka_unit_test(test_config_int_out_of_range),
		cmocka_unit_test(test_config_bad_durations),
		cmocka_unit_test(test_config_duration_out_of_range),
		cmocka_unit_test(test_config_bad_modes),
		cmocka_unit_test(test_config_bad_log_level),
		cmocka_unit_test(test_config_strings_too_long),
		cmocka_unit_test(test_config_nul_byte),
		cmocka_unit_test(test_config_subscription_errors),
		cmocka_unit_test(test_config_missing_required),
		cmocka_unit_test(test_config_cross_field),
		cmocka_unit_test(test_config_tls_ca_only),
		cmocka_unit_test(test_config_bad_topic_fields),
		cmocka_unit_test(test_config_password_unreadable),
		cmocka_unit_test(test_config_password_first_line),
		cmocka_unit_test(test_config_password_length),
		cmocka_unit_test_teardown(test_config_password_credential, unset_credentials),
		cmocka_unit_test(test_config_dotted_keys_rejected),
		cmocka_unit_test(test_config_dots_in_values),
		cmocka_unit_test(test_config_int_strict),


	};

	return cmocka_run_group_tests(tests, group_setup, NULL);
}
