/*
 * What the files of the config module share: config.c (the key table,
 * values, defaults, the mapping walk, reload and free), config_lists.c (the
 * list-valued keys) and config_file.c (the file: its bounds, the YAML
 * document, cross-field checks, secrets, directories).
 */
#ifndef CMDRELAY_CONFIG_INTERNAL_H
#define CMDRELAY_CONFIG_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <yaml.h>

#include "config.h"

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

#define HOST_MAX 253		/* the longest DNS name (RFC 1035) */

#define ITEM_PREFIX "subscriptions[]"

struct parser {
	const char *file;
	char *err;
	size_t errlen;
	yaml_document_t doc;
	struct config *cfg;
	bool no_secrets;	/* config_load_public: no password, no TLS file checks */
};

/* "<file>:<line>:<column>: <message>" into p->err (node NULL: the file); returns -1. */
int config_fail_at(struct parser *p, const yaml_node_t *node, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
const char *config_node_kind(const yaml_node_t *node);
/* {hostname} and {machine_id} in text, into out. */
int config_expand(struct parser *p, const yaml_node_t *node, const struct config_key *key,
    const char *text, char *out, size_t outlen);
/* The defaults of the keys directly below prefix ("" for the top). */
int config_apply_defaults(struct parser *p, const char *prefix, void *base);
int config_walk_mapping(struct parser *p, yaml_node_t *map, const char *prefix, void *base);

/* The list-valued keys (config_lists.c). */
int config_walk_subscriptions(struct parser *p, const struct config_key *key, yaml_node_t *seq);
int config_walk_peers(struct parser *p, const struct config_key *key, yaml_node_t *seq);
int config_walk_patterns(struct parser *p, const struct config_key *key, yaml_node_t *seq);
int config_walk_hosts(struct parser *p, const struct config_key *key, yaml_node_t *seq);

#endif
