#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <inttypes.h>
#include <limits.h>
#include <pwd.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <mosquitto.h>
#include <yaml.h>

#include "topic.h"

enum key_type {
	KEY_SECTION,
	KEY_STRING,
	KEY_INT,
	KEY_DURATION,
	KEY_MODE,
	KEY_LOG_LEVEL,
	KEY_SUBSCRIPTIONS,
	KEY_PEERS,
	KEY_PATTERNS,
	KEY_HOSTS,
};

struct config_key {
	const char *path;	/* dotted; "subscriptions[]." for list items */
	enum key_type type;
	int64_t min, max;	/* value bounds; length bounds for strings */
	const char *def;	/* default, in config syntax; NULL: unset */
	size_t offset;
	bool restart;		/* a reload cannot change it */
};

#define CFG(field) offsetof(struct config, field)
#define SUB(field) offsetof(struct config_subscription, field)
#define DAY_MS (24LL * 3600 * 1000)
#define HOST_MAX 253		/* the longest DNS name (RFC 1035) */

static const struct config_key config_keys[] = {
	{ "broker", KEY_SECTION, 0, 0, NULL, 0, false },
	{ "broker.host", KEY_STRING, 1, HOST_MAX, "127.0.0.1", CFG(broker.host), false },
	{ "broker.port", KEY_INT, 1, 65535, "1883", CFG(broker.port), false },
	{ "broker.hosts", KEY_HOSTS, 1, CONFIG_MAX_HOSTS, NULL, 0, false },
	{ "broker.client_id", KEY_STRING, 1, 256, NULL, CFG(broker.client_id), false },
	{ "broker.keepalive", KEY_INT, 5, 65535, "60", CFG(broker.keepalive), false },
	{ "broker.protocol", KEY_STRING, 1, 16, "mqttv311", CFG(broker.protocol), false },
	{ "broker.session_expiry", KEY_DURATION, 1000, 4294967295LL * 1000, "7d", CFG(broker.session_expiry_ms), false },
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

#define ITEM_PREFIX "subscriptions[]"

struct parser {
	const char *file;
	char *err;
	size_t errlen;
	yaml_document_t doc;
	struct config *cfg;
	bool no_secrets;	/* config_load_public: no password, no TLS file checks */
};

static int __attribute__((format(printf, 3, 4)))
fail_at(struct parser *p, const yaml_node_t *node, const char *fmt, ...)
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

static const char *
node_kind(const yaml_node_t *node)
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
static int
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
				return fail_at(p, node, "%s: {hostname}: %s", key->path, strerror(errno));
			host[sizeof(host) - 1] = '\0';
			value = host, skip = 10;
		} else if (strncmp(t, "{machine_id}", 12) == 0) {
			if (id[0] == '\0' && config_machine_id(machine_id_file, id, sizeof(id)) == -1)
				return fail_at(p, node, "%s: {machine_id}: %s: %s", key->path, machine_id_file,
				    errno ? strerror(errno) : "empty");
			value = id, skip = 12;
		} else {
			value = t, skip = 1;
		}
		if (o + (value == t ? 1 : strlen(value)) >= outlen)
			return fail_at(p, node, "%s: longer than %zu bytes once expanded", key->path, outlen - 1);
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
			return fail_at(p, node, "%s: length %zu is out of range (%" PRId64 "..%" PRId64 ")",
			    key->path, len, key->min, key->max);
		free(*s);
		if ((*s = strdup(text)) == NULL)
			return fail_at(p, node, "out of memory");
		return 0;
	}
	case KEY_INT:
		if (parse_int(text, &n) == -1)
			return fail_at(p, node, "%s: '%s' is not an integer", key->path, text);
		break;
	case KEY_DURATION:
		if (parse_duration_ms(text, &n) == -1)
			return fail_at(p, node, "%s: '%s' is not a duration (a number with ms, s, m, h or d)",
			    key->path, text);
		break;
	case KEY_MODE:
		if (parse_mode(text, &n) == -1)
			return fail_at(p, node, "%s: '%s' is not an octal file mode such as \"0660\"",
			    key->path, text);
		break;
	case KEY_LOG_LEVEL: {
		enum log_level level;
		if (log_level_parse(text, &level) == -1)
			return fail_at(p, node, "%s: '%s' is not one of error, warning, info, debug",
			    key->path, text);
		*(int64_t *)field = level;
		return 0;
	}
	default:
		return fail_at(p, node, "%s: internal error: bad key type", key->path);
	}
	if (n < key->min || n > key->max) {
		if (key->type == KEY_DURATION)
			return fail_at(p, node, "%s: %s is out of range (%" PRId64 "ms..%" PRId64 "ms)",
			    key->path, text, key->min, key->max);
		if (key->type == KEY_MODE)
			return fail_at(p, node, "%s: %s is out of range (0000..0777)", key->path, text);
		return fail_at(p, node, "%s: %s is out of range (%" PRId64 "..%" PRId64 ")",
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
static int
apply_defaults(struct parser *p, const char *prefix, void *base)
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

static int walk_mapping(struct parser *p, yaml_node_t *map, const char *prefix, void *base);

/* The number of entries of a list key, within its bounds. */
static int
sequence_length(struct parser *p, const struct config_key *key, yaml_node_t *seq, size_t *n)
{
	*n = (size_t)(seq->data.sequence.items.top - seq->data.sequence.items.start);
	if ((int64_t)*n < key->min || (int64_t)*n > key->max)
		return fail_at(p, seq, "%s: %zu entries, expected %" PRId64 " to %" PRId64,
		    key->path, *n, key->min, key->max);
	return 0;
}
static yaml_node_t *node_at(struct parser *p, yaml_node_t *map, const char *path);

static int
walk_subscriptions(struct parser *p, const struct config_key *key, yaml_node_t *seq)
{
	struct config *cfg = p->cfg;
	size_t n;

	if (sequence_length(p, key, seq, &n) == -1)
		return -1;
	cfg->subs = calloc(n, sizeof(*cfg->subs));
	if (cfg->subs == NULL)
		return fail_at(p, seq, "out of memory");
	for (size_t i = 0; i < n; i++) {
		yaml_node_t *item = yaml_document_get_node(&p->doc, seq->data.sequence.items.start[i]);
		struct config_subscription *sub = &cfg->subs[i];

		cfg->nsubs = i + 1;
		if (item->type != YAML_MAPPING_NODE)
			return fail_at(p, item, "subscriptions: each entry must be a mapping with topic and qos");
		if (apply_defaults(p, ITEM_PREFIX, sub) == -1 ||
		    walk_mapping(p, item, ITEM_PREFIX, sub) == -1)
			return -1;
		if (sub->topic == NULL)
			return fail_at(p, item, "subscriptions: entry has no topic");
		if (mosquitto_sub_topic_check(sub->topic) != MOSQ_ERR_SUCCESS)
			return fail_at(p, item, "subscriptions: '%s' is not a valid MQTT topic filter", sub->topic);
		for (size_t j = 0; j < i; j++)
			if (strcmp(cfg->subs[j].topic, sub->topic) == 0)
				return fail_at(p, item, "subscriptions: '%s' is listed twice", sub->topic);
	}
	return 0;
}

/* socket.allow: user names, and group names with a leading '@'. */
static int
walk_peers(struct parser *p, const struct config_key *key, yaml_node_t *seq)
{
	struct config *cfg = p->cfg;
	size_t n;

	if (sequence_length(p, key, seq, &n) == -1)
		return -1;
	if ((cfg->socket.allow = calloc(n, sizeof(*cfg->socket.allow))) == NULL)
		return fail_at(p, seq, "out of memory");
	for (size_t i = 0; i < n; i++) {
		yaml_node_t *item = yaml_document_get_node(&p->doc, seq->data.sequence.items.start[i]);
		struct config_peer *peer = &cfg->socket.allow[i];
		const char *name;

		if (item->type != YAML_SCALAR_NODE || item->data.scalar.length == 0)
			return fail_at(p, item, "%s: each entry is a user name or @group", key->path);
		name = (const char *)item->data.scalar.value;
		peer->group = name[0] == '@';
		if (peer->group) {
			struct group *gr = getgrnam(name + 1);
			if (gr == NULL)
				return fail_at(p, item, "%s: no group '%s'", key->path, name + 1);
			peer->id = gr->gr_gid;
		} else {
			struct passwd *pw = getpwnam(name);
			if (pw == NULL)
				return fail_at(p, item, "%s: no user '%s'", key->path, name);
			peer->id = pw->pw_uid;
		}
		cfg->socket.nallow = i + 1;
	}
	return 0;
}

/*
 * uplink.allow: topics local programs may publish to, with {name} for one
 * topic level; kept as MQTT filters ({name} as +) for topic_matches().
 */
static int
walk_patterns(struct parser *p, const struct config_key *key, yaml_node_t *seq)
{
	struct config *cfg = p->cfg;
	size_t n;

	if (sequence_length(p, key, seq, &n) == -1)
		return -1;
	if ((cfg->uplink.allow = calloc(n, sizeof(char *))) == NULL)
		return fail_at(p, seq, "out of memory");
	for (size_t i = 0; i < n; i++) {
		yaml_node_t *item = yaml_document_get_node(&p->doc, seq->data.sequence.items.start[i]);
		const char *text;
		char *filter;

		if (item->type != YAML_SCALAR_NODE || item->data.scalar.length == 0 ||
		    item->data.scalar.length > 1024)
			return fail_at(p, item, "%s: each entry is a topic of at most 1024 bytes", key->path);
		text = (const char *)item->data.scalar.value;
		if ((filter = malloc(strlen(text) + 1)) == NULL)
			return fail_at(p, item, "out of memory");
		cfg->uplink.allow[i] = filter;
		cfg->uplink.nallow = i + 1;
		if (topic_pattern_filter(text, filter) == -1)
			return fail_at(p, item, "%s: '%s': each level is literal text or one {name}",
			    key->path, text);
	}
	return 0;
}

/* broker.hosts: "host:port" each, the port always given (brokers differ). */
static int
walk_hosts(struct parser *p, const struct config_key *key, yaml_node_t *seq)
{
	struct config *cfg = p->cfg;
	size_t n;

	if (sequence_length(p, key, seq, &n) == -1)
		return -1;
	if ((cfg->broker.hosts = calloc(n, sizeof(*cfg->broker.hosts))) == NULL)
		return fail_at(p, seq, "out of memory");
	for (size_t i = 0; i < n; i++) {
		yaml_node_t *item = yaml_document_get_node(&p->doc, seq->data.sequence.items.start[i]);
		struct config_endpoint *e = &cfg->broker.hosts[i];
		char expanded[CONFIG_MAX_STRING + 1];
		const char *text, *colon;
		char *end;
		long port;

		if (item->type != YAML_SCALAR_NODE || item->data.scalar.length > CONFIG_MAX_STRING)
			return fail_at(p, item, "%s: each entry is host:port", key->path);
		text = (const char *)item->data.scalar.value;
		if (strchr(text, '{') != NULL) {
			if (config_expand(p, item, key, text, expanded, sizeof(expanded)) == -1)
				return -1;
			text = expanded;
		}
		colon = strrchr(text, ':');
		errno = 0;
		port = colon ? strtol(colon + 1, &end, 10) : 0;
		if (colon == NULL || colon == text || colon[1] == '\0' || *end != '\0' || errno ||
		    port < 1 || port > 65535 || memchr(text, ':', (size_t)(colon - text)))
			return fail_at(p, item, "%s: '%s' is not host:port (port 1..65535)", key->path, text);
		if (colon - text > HOST_MAX)
			return fail_at(p, item, "%s: a host of %td bytes: at most %d", key->path, colon - text,
			    HOST_MAX);
		if ((e->host = strndup(text, (size_t)(colon - text))) == NULL)
			return fail_at(p, item, "out of memory");
		e->port = port;
		cfg->broker.nhosts = i + 1;
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

static int
walk_mapping(struct parser *p, yaml_node_t *map, const char *prefix, void *base)
{
	for (yaml_node_pair_t *pair = map->data.mapping.pairs.start;
	    pair < map->data.mapping.pairs.top; pair++) {
		yaml_node_t *k = yaml_document_get_node(&p->doc, pair->key);
		yaml_node_t *v = yaml_document_get_node(&p->doc, pair->value);
		const struct config_key *key;
		char path[256];

		if (k->type != YAML_SCALAR_NODE ||
		    strpbrk((const char *)k->data.scalar.value, ".[]") != NULL)
			return fail_at(p, k, "keys must be plain names (nest sections instead of dots)");
		snprintf(path, sizeof(path), "%s%s%s", prefix, *prefix ? "." : "",
		    (const char *)k->data.scalar.value);
		if ((key = find_key(path)) == NULL)
			return fail_at(p, k, "unknown key '%s'", path);
		for (yaml_node_pair_t *prev = map->data.mapping.pairs.start; prev < pair; prev++) {
			yaml_node_t *pk = yaml_document_get_node(&p->doc, prev->key);
			if (pk->type == YAML_SCALAR_NODE &&
			    strcmp((char *)pk->data.scalar.value, (char *)k->data.scalar.value) == 0)
				return fail_at(p, k, "key '%s' appears twice", path);
		}
		switch (key->type) {
		case KEY_SECTION:
			if (v->type != YAML_MAPPING_NODE)
				return fail_at(p, v, "%s: expected a mapping, got %s", path, node_kind(v));
			if (walk_mapping(p, v, path, base) == -1)
				return -1;
			break;
		case KEY_SUBSCRIPTIONS:
		case KEY_PEERS:
		case KEY_PATTERNS:
		case KEY_HOSTS:
			if (v->type != YAML_SEQUENCE_NODE)
				return fail_at(p, v, "%s: expected a list, got %s", path, node_kind(v));
			if ((key->type == KEY_SUBSCRIPTIONS ? walk_subscriptions(p, key, v) :
			    key->type == KEY_PEERS ? walk_peers(p, key, v) :
			    key->type == KEY_HOSTS ? walk_hosts(p, key, v) : walk_patterns(p, key, v)) == -1)
				return -1;
			break;
		default:
			if (v->type != YAML_SCALAR_NODE)
				return fail_at(p, v, "%s: expected %s, got %s", path,
				    type_name(key->type), node_kind(v));
			if (config_is_null(v))
				return fail_at(p, v, "%s: needs a value", path);
			if (strlen((const char *)v->data.scalar.value) != v->data.scalar.length)
				return fail_at(p, v, "%s: contains a NUL byte", path);
			if (set_value(p, key, v, (const char *)v->data.scalar.value, base) == -1)
				return -1;
		}
	}
	return 0;
}

/* Reads a secret file: the first line, at most CONFIG_MAX_PASSWORD bytes. */
static int
read_secret(struct parser *p, const yaml_node_t *node, const char *what, const char *path,
    char **out)
{
	char buf[CONFIG_MAX_PASSWORD + 2];
	struct stat st;
	ssize_t n;
	int fd;

	if ((fd = open(path, O_RDONLY | O_CLOEXEC)) == -1)
		return fail_at(p, node, "%s: %s: %s", what, path, strerror(errno));
	if (fstat(fd, &st) == 0 && (st.st_mode & S_IROTH))
		log_warnx("password file %s is readable by everyone; chmod o-r it", path);
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n < 0)
		return fail_at(p, node, "%s: %s: %s", what, path, strerror(errno));
	buf[n] = '\0';
	buf[strcspn(buf, "\r\n")] = '\0';
	if (strlen(buf) > CONFIG_MAX_PASSWORD)
		return fail_at(p, node, "%s: %s: longer than %d bytes", what, path,
		    CONFIG_MAX_PASSWORD);
	if ((*out = strdup(buf)) == NULL)
		return fail_at(p, node, "out of memory");
	return 0;
}

static int
load_password(struct parser *p, yaml_node_t *root)
{
	const char *credentials = getenv("CREDENTIALS_DIRECTORY");
	char path[PATH_MAX];

	if (credentials) {
		snprintf(path, sizeof(path), "%s/mqtt-password", credentials);
		if (access(path, F_OK) == 0 && read_secret(p, NULL, "credential mqtt-password", path,
		    &p->cfg->broker.password) == -1)
			return -1;
		/* The unit's SetCredential= default is an empty line: no password. */
		if (p->cfg->broker.password && p->cfg->broker.password[0] != '\0')
			return 0;
		free(p->cfg->broker.password);
		p->cfg->broker.password = NULL;
	}
	if (p->cfg->broker.password_file)
		return read_secret(p, node_at(p, root, "broker.password_file"), "broker.password_file",
		    p->cfg->broker.password_file, &p->cfg->broker.password);
	return 0;
}

/* Finds the node of a dotted key so that cross-field errors can name its line. */
static yaml_node_t *
node_at(struct parser *p, yaml_node_t *map, const char *path)
{
	const char *dot = strchr(path, '.');
	size_t len = dot ? (size_t)(dot - path) : strlen(path);

	if (map == NULL || map->type != YAML_MAPPING_NODE)
		return NULL;
	for (yaml_node_pair_t *pair = map->data.mapping.pairs.start;
	    pair < map->data.mapping.pairs.top; pair++) {
		yaml_node_t *k = yaml_document_get_node(&p->doc, pair->key);
		if (k->type == YAML_SCALAR_NODE && k->data.scalar.length == len &&
		    memcmp(k->data.scalar.value, path, len) == 0) {
			yaml_node_t *v = yaml_document_get_node(&p->doc, pair->value);
			return dot ? node_at(p, v, dot + 1) : k;
		}
	}
	return NULL;
}

/* The line of the key an error is about, or the top when it is absent. */
static yaml_node_t *
key_node(struct parser *p, yaml_node_t *root, const char *path)
{
	yaml_node_t *n = node_at(p, root, path);
	return n ? n : root;
}

/*
 * broker.host and broker.port are the one-endpoint form of broker.hosts;
 * afterwards host and port name the first endpoint, which names the session.
 */
static int
validate_hosts(struct parser *p, yaml_node_t *root)
{
	struct config *cfg = p->cfg;

	if (cfg->broker.nhosts == 0) {
		if ((cfg->broker.hosts = calloc(1, sizeof(*cfg->broker.hosts))) == NULL ||
		    (cfg->broker.hosts[0].host = strdup(cfg->broker.host)) == NULL)
			return fail_at(p, root, "out of memory");
		cfg->broker.hosts[0].port = cfg->broker.port;
		cfg->broker.nhosts = 1;
		return 0;
	}
	if (node_at(p, root, "broker.host") || node_at(p, root, "broker.port"))
		return fail_at(p, key_node(p, root, "broker.hosts"),
		    "broker.hosts replaces broker.host and broker.port; give one or the other");
	free(cfg->broker.host);
	if ((cfg->broker.host = strdup(cfg->broker.hosts[0].host)) == NULL)
		return fail_at(p, root, "out of memory");
	cfg->broker.port = cfg->broker.hosts[0].port;
	return 0;
}

static int
validate(struct parser *p, yaml_node_t *root)
{
	struct config *cfg = p->cfg;
	struct topic_pattern *pattern;
	char why[256];

	if (cfg->broker.client_id == NULL)
		return fail_at(p, root, "missing required key 'broker.client_id'");
	if (cfg->subs == NULL)
		return fail_at(p, root, "missing required key 'subscriptions'");
	if (validate_hosts(p, root) == -1)
		return -1;
	if (strcmp(cfg->store.on_corruption, "recover") != 0 && strcmp(cfg->store.on_corruption, "stop") != 0)
		return fail_at(p, key_node(p, root, "store.on_corruption"),
		    "store.on_corruption: '%s' is not recover or stop", cfg->store.on_corruption);
	if (strcmp(cfg->broker.protocol, "mqttv311") != 0 && strcmp(cfg->broker.protocol, "mqttv5") != 0)
		return fail_at(p, key_node(p, root, "broker.protocol"),
		    "broker.protocol: '%s' is not mqttv311 or mqttv5", cfg->broker.protocol);
	if (strcmp(cfg->broker.packet_ids, "kept") != 0 && strcmp(cfg->broker.packet_ids, "renumbered") != 0)
		return fail_at(p, key_node(p, root, "broker.packet_ids"),
		    "broker.packet_ids: '%s' is not kept or renumbered", cfg->broker.packet_ids);
	if (mosquitto_pub_topic_check(cfg->broker.barrier_topic) != MOSQ_ERR_SUCCESS)
		return fail_at(p, key_node(p, root, "broker.barrier_topic"),
		    "broker.barrier_topic: '%s' is not a topic name without wildcards",
		    cfg->broker.barrier_topic);
	if (cfg->broker.reconnect_min_ms > cfg->broker.reconnect_max_ms)
		return fail_at(p, key_node(p, root, "broker.reconnect.min_delay"),
		    "broker.reconnect: min_delay is longer than max_delay");
	if ((cfg->broker.tls_cert_file == NULL) != (cfg->broker.tls_key_file == NULL))
		return fail_at(p, key_node(p, root, "broker.tls"), "broker.tls: cert_file and key_file go together");
	if ((cfg->broker.tls_cert_file || cfg->broker.tls_key_file) && cfg->broker.tls_ca_file == NULL)
		return fail_at(p, key_node(p, root, "broker.tls"), "broker.tls: a client certificate needs ca_file");
	{
		static const char *const tls_keys[] = {
			"broker.tls.ca_file", "broker.tls.cert_file", "broker.tls.key_file",
		};
		const char *const tls_files[] = {
			cfg->broker.tls_ca_file, cfg->broker.tls_cert_file, cfg->broker.tls_key_file,
		};
		for (size_t i = 0; i < 3 && !p->no_secrets; i++)
			if (tls_files[i] && access(tls_files[i], R_OK) == -1)
				return fail_at(p, key_node(p, root, tls_keys[i]), "%s: %s: %s", tls_keys[i],
				    tls_files[i], strerror(errno));
	}
	if (cfg->socket.group && getgrnam(cfg->socket.group) == NULL)
		return fail_at(p, key_node(p, root, "socket.group"), "socket.group: no group '%s'",
		    cfg->socket.group);
	if (cfg->broker.password_file && cfg->broker.username == NULL)
		return fail_at(p, key_node(p, root, "broker.password_file"),
		    "broker.password_file needs broker.username");
	if ((pattern = topic_pattern_new(cfg->topic_fields, why, sizeof(why))) == NULL)
		return fail_at(p, key_node(p, root, "topic_fields"), "topic_fields: %s", why);
	topic_pattern_free(pattern);
	return p->no_secrets ? 0 : load_password(p, root);
}

static int
fail_syntax(struct parser *p, const yaml_parser_t *yp)
{
	snprintf(p->err, p->errlen, "%s:%zu:%zu: %s", p->file,
	    yp->problem_mark.line + 1, yp->problem_mark.column + 1,
	    yp->problem ? yp->problem : "YAML syntax error");
	return -1;
}

/* A second document after "---" would be ignored silently: refuse it. */
static int
parse_only_document(struct parser *p, yaml_parser_t *yp)
{
	yaml_document_t next;
	bool more;

	if (!yaml_parser_load(yp, &next))
		return fail_syntax(p, yp);
	more = yaml_document_get_root_node(&next) != NULL;
	if (more)
		snprintf(p->err, p->errlen, "%s:%zu:%zu: a second YAML document; "
		    "the configuration is one document", p->file,
		    next.start_mark.line + 1, next.start_mark.column + 1);
	yaml_document_delete(&next);
	return more ? -1 : 0;
}

static int
parse_document(struct parser *p, FILE *fp)
{
	yaml_parser_t yp;
	yaml_node_t *root;
	int rc = -1;

	if (!yaml_parser_initialize(&yp))
		return fail_at(p, NULL, "out of memory");
	yaml_parser_set_input_file(&yp, fp);
	if (!yaml_parser_load(&yp, &p->doc)) {
		fail_syntax(p, &yp);
		yaml_parser_delete(&yp);
		return -1;
	}
	root = yaml_document_get_root_node(&p->doc);
	if (root != NULL && parse_only_document(p, &yp) == -1) {
		yaml_parser_delete(&yp);
		yaml_document_delete(&p->doc);
		return -1;
	}
	yaml_parser_delete(&yp);
	if (root == NULL)
		fail_at(p, NULL, "the file is empty");
	else if (root->type != YAML_MAPPING_NODE)
		fail_at(p, root, "expected a mapping at the top, got %s", node_kind(root));
	else if (apply_defaults(p, "", p->cfg) == 0 && walk_mapping(p, root, "", p->cfg) == 0)
		rc = validate(p, root);
	yaml_document_delete(&p->doc);
	return rc;
}

/*
 * Before the document is built: the file's size, and its nesting depth,
 * read as events and given up at the first level too deep, so that no
 * input costs more than a linear pass over 1 MiB. Syntax errors are left
 * to the parse proper, which reports them.
 */
static int
config_check_bounds(struct parser *p, FILE *fp)
{
	yaml_parser_t yp;
	yaml_event_t ev;
	struct stat sb;
	int depth = 0, rc = 0;
	bool done = false;

	if (fstat(fileno(fp), &sb) == 0 && sb.st_size > CONFIG_MAX_BYTES) {
		snprintf(p->err, p->errlen, "%s: %jd bytes; a config may have at most %d",
		    p->file, (intmax_t)sb.st_size, CONFIG_MAX_BYTES);
		return -1;
	}
	if (!yaml_parser_initialize(&yp))
		return fail_at(p, NULL, "out of memory");
	yaml_parser_set_input_file(&yp, fp);
	while (!done && rc == 0 && yaml_parser_parse(&yp, &ev)) {
		if (ev.type == YAML_MAPPING_START_EVENT || ev.type == YAML_SEQUENCE_START_EVENT)
			depth++;
		else if (ev.type == YAML_MAPPING_END_EVENT || ev.type == YAML_SEQUENCE_END_EVENT)
			depth--;
		if (depth > CONFIG_MAX_DEPTH) {
			snprintf(p->err, p->errlen, "%s:%zu:%zu: nested more than %d levels deep",
			    p->file, ev.start_mark.line + 1, ev.start_mark.column + 1, CONFIG_MAX_DEPTH);
			rc = -1;
		}
		done = ev.type == YAML_STREAM_END_EVENT;
		yaml_event_delete(&ev);
	}
	yaml_parser_delete(&yp);
	rewind(fp);
	return rc;
}

static int
config_load_as(const char *file, bool no_secrets, struct config **out, char *err, size_t errlen)
{
	struct parser p = { .file = file, .err = err, .errlen = errlen, .no_secrets = no_secrets };
	FILE *fp;
	int rc;

	if ((p.cfg = calloc(1, sizeof(*p.cfg))) == NULL ||
	    (p.cfg->file = strdup(file)) == NULL) {
		config_free(p.cfg);
		snprintf(err, errlen, "%s: out of memory", file);
		return -1;
	}
	if ((fp = fopen(file, "re")) == NULL) {
		snprintf(err, errlen, "%s: %s", file, strerror(errno));
		config_free(p.cfg);
		return -1;
	}
	rc = config_check_bounds(&p, fp) == 0 ? parse_document(&p, fp) : -1;
	fclose(fp);
	if (rc == -1) {
		config_free(p.cfg);
		return -1;
	}
	*out = p.cfg;
	return 0;
}

int
config_load(const char *file, struct config **out, char *err, size_t errlen)
{
	return config_load_as(file, false, out, err, errlen);
}

int
config_load_public(const char *file, struct config **out, char *err, size_t errlen)
{
	return config_load_as(file, true, out, err, errlen);
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

/*
 * dir exists, or can be made below its nearest existing ancestor; with
 * create, made (0750, like StateDirectoryMode=). -1 with errno.
 */
static int
config_dir(char *dir, bool create)
{
	struct stat st;
	char *slash;
	int rc;

	if (stat(dir, &st) == 0) {
		if (S_ISDIR(st.st_mode))
			return 0;
		errno = ENOTDIR;
		return -1;
	}
	if (errno != ENOENT || (slash = strrchr(dir, '/')) == NULL || slash == dir)
		return -1;
	*slash = '\0';
	rc = config_dir(dir, create);
	if (rc == 0 && !create && access(dir, W_OK | X_OK) == -1)
		rc = -1;
	*slash = '/';
	if (rc == 0 && create && mkdir(dir, 0750) == -1 && errno != EEXIST)
		rc = -1;
	return rc;
}

/*
 * The directories the daemon creates files in: for -t (create false) they
 * must exist or be creatable, at start they are made. A check that says OK
 * must not be followed by a start that fails on a missing /run/cmdrelay.
 */
int
config_dirs(const struct config *cfg, bool create, char *err, size_t errlen)
{
	const struct {
		const char *key, *path;
	} files[] = {
		{ "store.path", cfg->store.path },
		{ "socket.path", cfg->socket.path },
		{ "metrics.textfile", cfg->metrics.textfile },
	};

	for (size_t i = 0; i < sizeof(files) / sizeof(files[0]); i++) {
		char dir[PATH_MAX];
		const char *slash;

		if (files[i].path == NULL || (slash = strrchr(files[i].path, '/')) == NULL ||
		    slash == files[i].path)
			continue;	/* unset, in the working directory, or in / */
		snprintf(dir, sizeof(dir), "%.*s", (int)(slash - files[i].path), files[i].path);
		if (config_dir(dir, create) == -1) {
			snprintf(err, errlen, "%s: %s: directory %s %s: %s", cfg->file, files[i].key, dir,
			    create ? "cannot be made" : "does not exist and cannot be made", strerror(errno));
			return -1;
		}
	}
	return 0;
}
