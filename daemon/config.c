#include "config.h"
#include "config_internal.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/un.h>
#include <unistd.h>

#include <yaml.h>


#define CFG(field) offsetof(struct config, field)
#define SUB(field) offsetof(struct config_subscription, field)
#define DAY_MS (24LL * 3600 * 1000)

static const struct config_key config_keys[] = {
	{ "broker", KEY_SECTION, 0, 0, NULL, 0, false },
	{ "broker.host", KEY_STRING, 1, HOST_MAX, "127.0.0.1", CFG(broker.host), false },
	{ "broker.port", KEY_INT, 1, 65535, "1883", CFG(broker.port), false },
	{ "broker.hosts", KEY_HOSTS, 1, CONFIG_MAX_HOSTS, NULL, 0, false },
	{ "broker.client_id", KEY_STRING, 1, 256, NULL, CFG(broker.client_id), false },
	{ "broker.keepalive", KEY_INT, 5, 65535, "60", CFG(broker.keepalive), false },
	{ "broker.protocol", KEY_STRING, 1, 16, "auto", CFG(broker.protocol), false },
	/* MQTT 5's 0xFFFFFFFF s: the session never expires, as a 3.1.1 one under protocol auto. */
	{ "broker.session_expiry", KEY_DURATION, 1000, 4294967295LL * 1000, "4294967295s", CFG(broker.session_expiry_ms), false },
	/* One read pass commits at most 1024 messages (MQTT_MAX_BATCH): a window of that fills it. */
	{ "broker.receive_maximum", KEY_INT, 1, 65535, "1024", CFG(broker.receive_maximum), false },
	{ "broker.packet_ids", KEY_STRING, 1, 16, "renumbered", CFG(broker.packet_ids), false },
	{ "broker.barrier_topic", KEY_STRING, 1, 1024, "$cmdrelay/barrier", CFG(broker.barrier_topic), false },
	{ "broker.username", KEY_STRING, 1, 256, NULL, CFG(broker.username), false },
	{ "broker.password_file", KEY_STRING, 1, PATH_MAX, NULL, CFG(broker.password_file), false },
	{ "broker.tls", KEY_SECTION, 0, 0, NULL, 0, false },
	{ "broker.tls.ca_file", KEY_STRING, 1, PATH_MAX, NULL, CFG(broker.tls_ca_file), false },
	{ "broker.tls.cert_file", KEY_STRING, 1, PATH_MAX, NULL, CFG(broker.tls_cert_file), false },
	{ "broker.tls.key_file", KEY_STRING, 1, PATH_MAX, NULL, CFG(broker.tls_key_file), false },
	{ "broker.reconnect", KEY_SECTION, 0, 0, NULL, 0, false },
	{ "broker.reconnect.min_delay", KEY_DURATION, 100, 3600 * 1000, "1s", CFG(broker.reconnect_min_ms), false },
	{ "broker.reconnect.max_delay", KEY_DURATION, 1000, DAY_MS, "60s", CFG(broker.reconnect_max_ms), false },
	{ "subscriptions", KEY_SUBSCRIPTIONS, 1, CONFIG_MAX_SUBSCRIPTIONS, NULL, 0, false },
	{ "subscriptions[].topic", KEY_STRING, 1, 1024, NULL, SUB(topic), false },
	{ "subscriptions[].qos", KEY_INT, 0, 1, "1", SUB(qos), false },
	{ "topic_fields", KEY_STRING, 1, 1024, "/cf/v1/{product}/{model}/{device}/{action}", CFG(topic_fields), false },
	{ "dedup", KEY_SECTION, 0, 0, NULL, 0, false },
	{ "dedup.redelivery_window", KEY_DURATION, 1000, 30 * DAY_MS, "1h", CFG(redelivery_window_ms), false },
	{ "store", KEY_SECTION, 0, 0, NULL, 0, false },
	{ "store.path", KEY_STRING, 1, PATH_MAX, "/var/lib/cmdrelay/history.db", CFG(store.path), true },
	/* 4 MiB: a command line (escaped or base64) stays within the socket's output bound. */
	{ "store.on_corruption", KEY_STRING, 1, 16, "recover", CFG(store.on_corruption), true },
	{ "store.max_payload", KEY_INT, 1, 4 * 1024 * 1024, "262144", CFG(store.max_payload), false },
	/*
	 * Topics whose newest command outlives retention, for the retained-replay
	 * proof: a gateway's devices; each costs a pass a look-up (0.4 us).
	 */
	{ "store.max_topics", KEY_INT, 100, 100000, "10000", CFG(store.max_topics), false },
	{ "store.retention", KEY_SECTION, 0, 0, NULL, 0, false },
	{ "store.retention.max_age", KEY_DURATION, 3600 * 1000, 3650 * DAY_MS, "90d", CFG(store.max_age_ms), false },
	{ "store.retention.max_rows", KEY_INT, 1000, 1000000000, "10000000", CFG(store.max_rows), false },
	{ "socket", KEY_SECTION, 0, 0, NULL, 0, false },
	{ "socket.path", KEY_STRING, 1, sizeof(((struct sockaddr_un *)0)->sun_path) - 1,
	  "/run/cmdrelay/cmdrelay.sock", CFG(socket.path), true },
	{ "socket.mode", KEY_MODE, 0, 0777, "0660", CFG(socket.mode), true },
	{ "socket.group", KEY_STRING, 1, 64, NULL, CFG(socket.group), true },
	{ "socket.allow", KEY_PEERS, 1, CONFIG_MAX_PEERS, NULL, 0, false },
	{ "socket.max_consumers", KEY_INT, 1, 1024, "64", CFG(socket.max_consumers), true },
	{ "socket.window", KEY_INT, 1, 65536, "256", CFG(socket.window), true },
	/* Each cursor holds back retention and costs stats a count: a few thousand at most. */
	{ "socket.max_cursors", KEY_INT, 1, 100000, "1000", CFG(socket.max_cursors), false },
	/* As long as retention's max_age by default: what such a cursor would resume is gone. */
	{ "socket.cursor_expiry", KEY_DURATION, 3600 * 1000, 3650 * DAY_MS, "90d", CFG(socket.cursor_expiry_ms), false },
	{ "uplink", KEY_SECTION, 0, 0, NULL, 0, false },
	{ "uplink.allow", KEY_PATTERNS, 1, CONFIG_MAX_UPLINK_PATTERNS, NULL, 0, false },
	{ "uplink.max_queued", KEY_INT, 1, 10000000, "100000", CFG(uplink.max_queued), false },
	{ "metrics", KEY_SECTION, 0, 0, NULL, 0, false },
	{ "metrics.textfile", KEY_STRING, 1, PATH_MAX, NULL, CFG(metrics.textfile), false },
	{ "metrics.mode", KEY_MODE, 0, 0777, "0644", CFG(metrics.mode), false },
	{ "metrics.interval", KEY_DURATION, 1000, 3600 * 1000, "5s", CFG(metrics.interval_ms), false },
	{ "log", KEY_SECTION, 0, 0, NULL, 0, false },
	{ "log.level", KEY_LOG_LEVEL, 0, 0, "info", CFG(log_level), false },
};
#define NKEYS (sizeof(config_keys) / sizeof(config_keys[0]))

int
config_fail_at(struct parser *p, const yaml_node_t *node, const char *fmt, ...)
{
	char msg[CONFIG_ERR_MAX];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (node)
		snprintf(p->err, p->errlen, "%s:%zu:%zu: %s", p->file,
		    node->start_mark.line + 1, node->start_mark.column + 1, msg);
	else
		snprintf(p->err, p->errlen, "%s: %s", p->file, msg);
	return -1;
}

int
parse_duration_ms(const char *text, int64_t *out_ms)
{
	static const struct {
		const char *suffix;
		int64_t ms;
	} units[] = {
		{ "ms", 1 }, { "s", 1000 }, { "m", 60 * 1000 }, { "h", 3600 * 1000 }, { "d", DAY_MS },
	};
	char *end;
	long long n;

	if (text[0] < '0' || text[0] > '9')
		return -1;
	errno = 0;
	n = strtoll(text, &end, 10);
	if (errno != 0 || end == text)
		return -1;
	for (size_t i = 0; i < sizeof(units) / sizeof(units[0]); i++) {
		if (strcmp(end, units[i].suffix) == 0) {
			if (n > INT64_MAX / units[i].ms)
				return -1;
			*out_ms = n * units[i].ms;
			return 0;
		}
	}
	return -1;
}

static int
parse_int(const char *text, int64_t *out)
{
	char *end;
	long long n;

	if (!(text[0] == '-' || (text[0] >= '0' && text[0] <= '9')))
		return -1;
	errno = 0;
	n = strtoll(text, &end, 10);
	if (errno != 0 || end == text || *end != '\0')
		return -1;
	*out = n;
	return 0;
}

static int
parse_mode(const char *text, int64_t *out)
{
	char *end;
	long n;

	if (strlen(text) < 3 || strlen(text) > 4 || strspn(text, "01234567") != strlen(text))
		return -1;
	n = strtol(text, &end, 8);
	*out = n;
	return 0;
}

static const char *
type_name(enum key_type type)
{
	switch (type) {
	case KEY_SECTION:
		return "a mapping";
	case KEY_SUBSCRIPTIONS:
	case KEY_PEERS:
	case KEY_PATTERNS:
	case KEY_HOSTS:
		return "a list";
	default:
		return "a single value";
	}
}

const char *
config_node_kind(const yaml_node_t *node)
{
	switch (node->type) {
	case YAML_MAPPING_NODE:
		return "a mapping";
	case YAML_SEQUENCE_NODE:
		return "a list";
	default:
		return "a single value";
	}
}

/* The first line of machine-id(5); -1 with errno (0: the file is empty). */
static int
config_machine_id(const char *file, char *id, size_t len)
{
	FILE *fp = fopen(file, "re");
	bool ok;

	if (fp == NULL)
		return -1;
	errno = 0;
	ok = fgets(id, (int)len, fp) != NULL;
	fclose(fp);
	if (!ok)
		return -1;
	id[strcspn(id, "\n")] = '\0';
	return id[0] == '\0' ? -1 : 0;
}

/*
 * {hostname} and {machine_id} in a string value, so that one file serves a
 * fleet: client_id, topics and paths name the gateway they run on. Other
 * braces stay (topic_fields has its own {name} segments and is not expanded).
 */
int
config_expand(struct parser *p, const yaml_node_t *node, const struct config_key *key,
    const char *text, char *out, size_t outlen)
{
	static const char machine_id_file[] = "/etc/machine-id";	/* machine-id(5) */
	char host[HOST_NAME_MAX + 1], id[64] = "";
	size_t o = 0;

	for (const char *t = text; *t != '\0'; ) {
		const char *value = NULL;
		size_t skip = 0;

		if (strncmp(t, "{hostname}", 10) == 0) {
			if (gethostname(host, sizeof(host)) == -1)
				return config_fail_at(p, node, "%s: {hostname}: %s", key->path, strerror(errno));
			host[sizeof(host) - 1] = '\0';
			value = host, skip = 10;
		} else if (strncmp(t, "{machine_id}", 12) == 0) {
			if (id[0] == '\0' && config_machine_id(machine_id_file, id, sizeof(id)) == -1)
				return config_fail_at(p, node, "%s: {machine_id}: %s: %s", key->path, machine_id_file,
				    errno ? strerror(errno) : "empty");
			value = id, skip = 12;
		} else {
			value = t, skip = 1;
		}
		if (o + (value == t ? 1 : strlen(value)) >= outlen)
			return config_fail_at(p, node, "%s: longer than %zu bytes once expanded", key->path, outlen - 1);
		if (value == t)
			out[o++] = *t;
		else
			o += (size_t)snprintf(out + o, outlen - o, "%s", value);
		t += skip;
	}
	out[o] = '\0';
	return 0;
}

/* Converts one scalar into the field; node is NULL when text is a default. */
static int
set_value(struct parser *p, const struct config_key *key, const yaml_node_t *node,
    const char *text, void *base)
{
	void *field = (char *)base + key->offset;
	int64_t n;

	switch (key->type) {
	case KEY_STRING: {
		char expanded[CONFIG_MAX_STRING + 1];
		size_t len;
		char **s = field;
		if (strcmp(key->path, "topic_fields") != 0 && strchr(text, '{') != NULL) {
			if (config_expand(p, node, key, text, expanded, sizeof(expanded)) == -1)
				return -1;
			text = expanded;
		}
		len = strlen(text);
		if ((int64_t)len < key->min || (int64_t)len > key->max)
			return config_fail_at(p, node, "%s: length %zu is out of range (%" PRId64 "..%" PRId64 ")",
			    key->path, len, key->min, key->max);
		free(*s);
		if ((*s = strdup(text)) == NULL)
			return config_fail_at(p, node, "out of memory");
		return 0;
	}
	case KEY_INT:
		if (parse_int(text, &n) == -1)
			return config_fail_at(p, node, "%s: '%s' is not an integer", key->path, text);
		break;
	case KEY_DURATION:
		if (parse_duration_ms(text, &n) == -1)
			return config_fail_at(p, node, "%s: '%s' is not a duration (a number with ms, s, m, h or d)",
			    key->path, text);
		break;
	case KEY_MODE:
		if (parse_mode(text, &n) == -1)
			return config_fail_at(p, node, "%s: '%s' is not an octal file mode such as \"0660\"",
			    key->path, text);
		break;
	case KEY_LOG_LEVEL: {
		enum log_level level;
		if (log_level_parse(text, &level) == -1)
			return config_fail_at(p, node, "%s: '%s' is not one of error, warning, info, debug",
			    key->path, text);
		*(int64_t *)field = level;
		return 0;
	}
	default:
		return config_fail_at(p, node, "%s: internal error: bad key type", key->path);
	}
	if (n < key->min || n > key->max) {
		if (key->type == KEY_DURATION)
			return config_fail_at(p, node, "%s: %s is out of range (%" PRId64 "ms..%" PRId64 "ms)",
			    key->path, text, key->min, key->max);
		if (key->type == KEY_MODE)
			return config_fail_at(p, node, "%s: %s is out of range (0000..0777)", key->path, text);
		return config_fail_at(p, node, "%s: %s is out of range (%" PRId64 "..%" PRId64 ")",
		    key->path, text, key->min, key->max);
	}
	*(int64_t *)field = n;
	return 0;
}

static const struct config_key *
find_key(const char *path)
{
	for (size_t i = 0; i < NKEYS; i++)
		if (strcmp(config_keys[i].path, path) == 0)
			return &config_keys[i];
	return NULL;
}

/* Applies the defaults of the keys directly below prefix ("" for the top). */
int
config_apply_defaults(struct parser *p, const char *prefix, void *base)
{
	size_t plen = strlen(prefix);

	for (size_t i = 0; i < NKEYS; i++) {
		const struct config_key *key = &config_keys[i];

		if (key->def == NULL || strncmp(key->path, prefix, plen) != 0 ||
		    (plen && key->path[plen] != '.'))
			continue;
		if (strcmp(prefix, ITEM_PREFIX) != 0 && strncmp(key->path, ITEM_PREFIX, strlen(ITEM_PREFIX)) == 0)
			continue;
		if (set_value(p, key, NULL, key->def, base) == -1)
			return -1;
	}
	return 0;
}






/*
 * YAML's null (empty, ~, null): YAML means "no value" by it, so taking
 * the text "~" as a topic or a path would configure something else.
 */
static bool
config_is_null(const yaml_node_t *v)
{
	static const char *const nulls[] = { "", "~", "null", "Null", "NULL" };
	const char *text = (const char *)v->data.scalar.value;

	if (v->data.scalar.style != YAML_PLAIN_SCALAR_STYLE)
		return false;
	for (size_t i = 0; i < sizeof(nulls) / sizeof(nulls[0]); i++)
		if (strcmp(text, nulls[i]) == 0)
			return true;
	return false;
}

int
config_walk_mapping(struct parser *p, yaml_node_t *map, const char *prefix, void *base)
{
	for (yaml_node_pair_t *pair = map->data.mapping.pairs.start;
	    pair < map->data.mapping.pairs.top; pair++) {
		yaml_node_t *k = yaml_document_get_node(&p->doc, pair->key);
		yaml_node_t *v = yaml_document_get_node(&p->doc, pair->value);
		const struct config_key *key;
		char path[256];

		if (k->type != YAML_SCALAR_NODE ||
		    strpbrk((const char *)k->data.scalar.value, ".[]") != NULL)
			return config_fail_at(p, k, "keys must be plain names (nest sections instead of dots)");
		snprintf(path, sizeof(path), "%s%s%s", prefix, *prefix ? "." : "",
		    (const char *)k->data.scalar.value);
		if ((key = find_key(path)) == NULL)
			return config_fail_at(p, k, "unknown key '%s'", path);
		for (yaml_node_pair_t *prev = map->data.mapping.pairs.start; prev < pair; prev++) {
			yaml_node_t *pk = yaml_document_get_node(&p->doc, prev->key);
			if (pk->type == YAML_SCALAR_NODE &&
			    strcmp((char *)pk->data.scalar.value, (char *)k->data.scalar.value) == 0)
				return config_fail_at(p, k, "key '%s' appears twice", path);
		}
		switch (key->type) {
		case KEY_SECTION:
			if (v->type != YAML_MAPPING_NODE)
				return config_fail_at(p, v, "%s: expected a mapping, got %s", path, config_node_kind(v));
			if (config_walk_mapping(p, v, path, base) == -1)
				return -1;
			break;
		case KEY_SUBSCRIPTIONS:
		case KEY_PEERS:
		case KEY_PATTERNS:
		case KEY_HOSTS:
			if (v->type != YAML_SEQUENCE_NODE)
				return config_fail_at(p, v, "%s: expected a list, got %s", path, config_node_kind(v));
			if ((key->type == KEY_SUBSCRIPTIONS ? config_walk_subscriptions(p, key, v) :
			    key->type == KEY_PEERS ? config_walk_peers(p, key, v) :
			    key->type == KEY_HOSTS ? config_walk_hosts(p, key, v) : config_walk_patterns(p, key, v)) == -1)
				return -1;
			break;
		default:
			if (v->type != YAML_SCALAR_NODE)
				return config_fail_at(p, v, "%s: expected %s, got %s", path,
				    type_name(key->type), config_node_kind(v));
			if (config_is_null(v))
				return config_fail_at(p, v, "%s: needs a value", path);
			if (strlen((const char *)v->data.scalar.value) != v->data.scalar.length)
				return config_fail_at(p, v, "%s: contains a NUL byte", path);
			if (set_value(p, key, v, (const char *)v->data.scalar.value, base) == -1)
				return -1;
		}
	}
	return 0;
}














static bool
field_equal(const struct config_key *key, const struct config *a, const struct config *b)
{
	const void *fa = (const char *)a + key->offset, *fb = (const char *)b + key->offset;

	if (key->type == KEY_STRING) {
		const char *sa = *(char *const *)fa, *sb = *(char *const *)fb;
		return sa == sb || (sa && sb && strcmp(sa, sb) == 0);
	}
	return *(const int64_t *)fa == *(const int64_t *)fb;
}

size_t
config_keep_restart_keys(struct config *next, struct config *running,
    const char **changed, size_t max)
{
	size_t n = 0;

	for (size_t i = 0; i < NKEYS; i++) {
		const struct config_key *key = &config_keys[i];
		char *fn = (char *)next + key->offset, *fr = (char *)running + key->offset;
		char tmp[sizeof(int64_t)];
		size_t size = key->type == KEY_STRING ? sizeof(char *) : sizeof(int64_t);

		if (!key->restart || field_equal(key, next, running))
			continue;
		/* Swapped, not copied: each struct still owns what it frees. */
		memcpy(tmp, fn, size);
		memcpy(fn, fr, size);
		memcpy(fr, tmp, size);
		if (n < max)
			changed[n++] = key->path;
	}
	return n;
}

void
config_free(struct config *cfg)
{
	if (cfg == NULL)
		return;
	for (size_t i = 0; i < NKEYS; i++)
		if (config_keys[i].type == KEY_STRING &&
		    strncmp(config_keys[i].path, ITEM_PREFIX, strlen(ITEM_PREFIX)) != 0)
			free(*(char **)((char *)cfg + config_keys[i].offset));
	for (size_t i = 0; i < cfg->nsubs; i++)
		free(cfg->subs[i].topic);
	free(cfg->subs);
	for (size_t i = 0; i < cfg->broker.nhosts; i++)
		free(cfg->broker.hosts[i].host);
	free(cfg->broker.hosts);
	free(cfg->socket.allow);
	for (size_t i = 0; i < cfg->uplink.nallow; i++)
		free(cfg->uplink.allow[i]);
	free(cfg->uplink.allow);
	if (cfg->broker.password)
		explicit_bzero(cfg->broker.password, strlen(cfg->broker.password));
	free(cfg->broker.password);
	free(cfg->file);
	free(cfg);
}


