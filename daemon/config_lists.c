/*
 * The list-valued keys: subscriptions, socket.allow (users and @groups),
 * uplink.allow (topic patterns) and broker.hosts (host:port).
 */
#include <errno.h>
#include <grp.h>
#include <inttypes.h>
#include <pwd.h>
#include <stdlib.h>
#include <string.h>

#include <mosquitto.h>

#include "config_internal.h"
#include "topic.h"

/* The number of entries of a list key, within its bounds. */
static int
sequence_length(struct parser *p, const struct config_key *key, yaml_node_t *seq, size_t *n)
{
	*n = (size_t)(seq->data.sequence.items.top - seq->data.sequence.items.start);
	if ((int64_t)*n < key->min || (int64_t)*n > key->max)
		return config_fail_at(p, seq, "%s: %zu entries, expected %" PRId64 " to %" PRId64,
		    key->path, *n, key->min, key->max);
	return 0;
}

int
config_walk_subscriptions(struct parser *p, const struct config_key *key, yaml_node_t *seq)
{
	struct config *cfg = p->cfg;
	size_t n;

	if (sequence_length(p, key, seq, &n) == -1)
		return -1;
	cfg->subs = calloc(n, sizeof(*cfg->subs));
	if (cfg->subs == NULL)
		return config_fail_at(p, seq, "out of memory");
	for (size_t i = 0; i < n; i++) {
		yaml_node_t *item = yaml_document_get_node(&p->doc, seq->data.sequence.items.start[i]);
		struct config_subscription *sub = &cfg->subs[i];

		cfg->nsubs = i + 1;
		if (item->type != YAML_MAPPING_NODE)
			return config_fail_at(p, item, "subscriptions: each entry must be a mapping with topic and qos");
		if (config_apply_defaults(p, ITEM_PREFIX, sub) == -1 ||
		    config_walk_mapping(p, item, ITEM_PREFIX, sub) == -1)
			return -1;
		if (sub->topic == NULL)
			return config_fail_at(p, item, "subscriptions: entry has no topic");
		if (mosquitto_sub_topic_check(sub->topic) != MOSQ_ERR_SUCCESS)
			return config_fail_at(p, item, "subscriptions: '%s' is not a valid MQTT topic filter", sub->topic);
		for (size_t j = 0; j < i; j++)
			if (strcmp(cfg->subs[j].topic, sub->topic) == 0)
				return config_fail_at(p, item, "subscriptions: '%s' is listed twice", sub->topic);
	}
	return 0;
}

/* socket.allow: user names, and group names with a leading '@'. */
int
config_walk_peers(struct parser *p, const struct config_key *key, yaml_node_t *seq)
{
	struct config *cfg = p->cfg;
	size_t n;

	if (sequence_length(p, key, seq, &n) == -1)
		return -1;
	if ((cfg->socket.allow = calloc(n, sizeof(*cfg->socket.allow))) == NULL)
		return config_fail_at(p, seq, "out of memory");
	for (size_t i = 0; i < n; i++) {
		yaml_node_t *item = yaml_document_get_node(&p->doc, seq->data.sequence.items.start[i]);
		struct config_peer *peer = &cfg->socket.allow[i];
		const char *name;

		if (item->type != YAML_SCALAR_NODE || item->data.scalar.length == 0)
			return config_fail_at(p, item, "%s: each entry is a user name or @group", key->path);
		name = (const char *)item->data.scalar.value;
		peer->group = name[0] == '@';
		if (peer->group) {
			struct group *gr = getgrnam(name + 1);
			if (gr == NULL)
				return config_fail_at(p, item, "%s: no group '%s'", key->path, name + 1);
			peer->id = gr->gr_gid;
		} else {
			struct passwd *pw = getpwnam(name);
			if (pw == NULL)
				return config_fail_at(p, item, "%s: no user '%s'", key->path, name);
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
int
config_walk_patterns(struct parser *p, const struct config_key *key, yaml_node_t *seq)
{
	struct config *cfg = p->cfg;
	size_t n;

	if (sequence_length(p, key, seq, &n) == -1)
		return -1;
	if ((cfg->uplink.allow = calloc(n, sizeof(char *))) == NULL)
		return config_fail_at(p, seq, "out of memory");
	for (size_t i = 0; i < n; i++) {
		yaml_node_t *item = yaml_document_get_node(&p->doc, seq->data.sequence.items.start[i]);
		const char *text;
		char *filter;

		if (item->type != YAML_SCALAR_NODE || item->data.scalar.length == 0 ||
		    item->data.scalar.length > 1024)
			return config_fail_at(p, item, "%s: each entry is a topic of at most 1024 bytes", key->path);
		text = (const char *)item->data.scalar.value;
		if ((filter = malloc(strlen(text) + 1)) == NULL)
			return config_fail_at(p, item, "out of memory");
		cfg->uplink.allow[i] = filter;
		cfg->uplink.nallow = i + 1;
		if (topic_pattern_filter(text, filter) == -1)
			return config_fail_at(p, item, "%s: '%s': each level is literal text or one {name}",
			    key->path, text);
	}
	return 0;
}

/* broker.hosts: "host:port" each, the port always given (brokers differ). */
int
config_walk_hosts(struct parser *p, const struct config_key *key, yaml_node_t *seq)
{
	struct config *cfg = p->cfg;
	size_t n;

	if (sequence_length(p, key, seq, &n) == -1)
		return -1;
	if ((cfg->broker.hosts = calloc(n, sizeof(*cfg->broker.hosts))) == NULL)
		return config_fail_at(p, seq, "out of memory");
	for (size_t i = 0; i < n; i++) {
		yaml_node_t *item = yaml_document_get_node(&p->doc, seq->data.sequence.items.start[i]);
		struct config_endpoint *e = &cfg->broker.hosts[i];
		char expanded[CONFIG_MAX_STRING + 1];
		const char *text, *colon;
		char *end;
		long port;

		if (item->type != YAML_SCALAR_NODE || item->data.scalar.length > CONFIG_MAX_STRING)
			return config_fail_at(p, item, "%s: each entry is host:port", key->path);
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
			return config_fail_at(p, item, "%s: '%s' is not host:port (port 1..65535)", key->path, text);
		if (colon - text > HOST_MAX)
			return config_fail_at(p, item, "%s: a host of %td bytes: at most %d", key->path, colon - text,
			    HOST_MAX);
		if ((e->host = strndup(text, (size_t)(colon - text))) == NULL)
			return config_fail_at(p, item, "out of memory");
		e->port = port;
		cfg->broker.nhosts = i + 1;
	}
	return 0;
}
