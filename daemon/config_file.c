/*
 * Reading a config file: its size and depth bounds before parsing, the one
 * YAML document, the checks across keys, the secrets, and the directories
 * the daemon will write in.
 */
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <mosquitto.h>

#include "config_internal.h"
#include "topic.h"

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
		return config_fail_at(p, node, "%s: %s: %s", what, path, strerror(errno));
	if (fstat(fd, &st) == 0 && (st.st_mode & S_IROTH))
		log_warnx("password file %s is readable by everyone; chmod o-r it", path);
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n < 0)
		return config_fail_at(p, node, "%s: %s: %s", what, path, strerror(errno));
	buf[n] = '\0';
	buf[strcspn(buf, "\r\n")] = '\0';
	if (strlen(buf) > CONFIG_MAX_PASSWORD)
		return config_fail_at(p, node, "%s: %s: longer than %d bytes", what, path,
		    CONFIG_MAX_PASSWORD);
	if ((*out = strdup(buf)) == NULL)
		return config_fail_at(p, node, "out of memory");
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
			return config_fail_at(p, root, "out of memory");
		cfg->broker.hosts[0].port = cfg->broker.port;
		cfg->broker.nhosts = 1;
		return 0;
	}
	if (node_at(p, root, "broker.host") || node_at(p, root, "broker.port"))
		return config_fail_at(p, key_node(p, root, "broker.hosts"),
		    "broker.hosts replaces broker.host and broker.port; give one or the other");
	free(cfg->broker.host);
	if ((cfg->broker.host = strdup(cfg->broker.hosts[0].host)) == NULL)
		return config_fail_at(p, root, "out of memory");
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
		return config_fail_at(p, root, "missing required key 'broker.client_id'");
	if (cfg->subs == NULL)
		return config_fail_at(p, root, "missing required key 'subscriptions'");
	if (validate_hosts(p, root) == -1)
		return -1;
	if (strcmp(cfg->store.on_corruption, "recover") != 0 && strcmp(cfg->store.on_corruption, "stop") != 0)
		return config_fail_at(p, key_node(p, root, "store.on_corruption"),
		    "store.on_corruption: '%s' is not recover or stop", cfg->store.on_corruption);
	if (strcmp(cfg->broker.protocol, "mqttv311") != 0 && strcmp(cfg->broker.protocol, "mqttv5") != 0 &&
	    strcmp(cfg->broker.protocol, "auto") != 0)
		return config_fail_at(p, key_node(p, root, "broker.protocol"),
		    "broker.protocol: '%s' is not auto, mqttv311 or mqttv5", cfg->broker.protocol);
	if (strcmp(cfg->broker.packet_ids, "kept") != 0 && strcmp(cfg->broker.packet_ids, "renumbered") != 0)
		return config_fail_at(p, key_node(p, root, "broker.packet_ids"),
		    "broker.packet_ids: '%s' is not kept or renumbered", cfg->broker.packet_ids);
	if (mosquitto_pub_topic_check(cfg->broker.barrier_topic) != MOSQ_ERR_SUCCESS)
		return config_fail_at(p, key_node(p, root, "broker.barrier_topic"),
		    "broker.barrier_topic: '%s' is not a topic name without wildcards",
		    cfg->broker.barrier_topic);
	if (cfg->broker.reconnect_min_ms > cfg->broker.reconnect_max_ms)
		return config_fail_at(p, key_node(p, root, "broker.reconnect.min_delay"),
		    "broker.reconnect: min_delay is longer than max_delay");
	if ((cfg->broker.tls_cert_file == NULL) != (cfg->broker.tls_key_file == NULL))
		return config_fail_at(p, key_node(p, root, "broker.tls"), "broker.tls: cert_file and key_file go together");
	if ((cfg->broker.tls_cert_file || cfg->broker.tls_key_file) && cfg->broker.tls_ca_file == NULL)
		return config_fail_at(p, key_node(p, root, "broker.tls"), "broker.tls: a client certificate needs ca_file");
	{
		static const char *const tls_keys[] = {
			"broker.tls.ca_file", "broker.tls.cert_file", "broker.tls.key_file",
		};
		const char *const tls_files[] = {
			cfg->broker.tls_ca_file, cfg->broker.tls_cert_file, cfg->broker.tls_key_file,
		};
		for (size_t i = 0; i < 3 && !p->no_secrets; i++)
			if (tls_files[i] && access(tls_files[i], R_OK) == -1)
				return config_fail_at(p, key_node(p, root, tls_keys[i]), "%s: %s: %s", tls_keys[i],
				    tls_files[i], strerror(errno));
	}
	if (cfg->socket.group && getgrnam(cfg->socket.group) == NULL)
		return config_fail_at(p, key_node(p, root, "socket.group"), "socket.group: no group '%s'",
		    cfg->socket.group);
	if (cfg->broker.password_file && cfg->broker.username == NULL)
		return config_fail_at(p, key_node(p, root, "broker.password_file"),
		    "broker.password_file needs broker.username");
	if ((pattern = topic_pattern_new(cfg->topic_fields, why, sizeof(why))) == NULL)
		return config_fail_at(p, key_node(p, root, "topic_fields"), "topic_fields: %s", why);
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
		return config_fail_at(p, NULL, "out of memory");
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
		config_fail_at(p, NULL, "the file is empty");
	else if (root->type != YAML_MAPPING_NODE)
		config_fail_at(p, root, "expected a mapping at the top, got %s", config_node_kind(root));
	else if (config_apply_defaults(p, "", p->cfg) == 0 && config_walk_mapping(p, root, "", p->cfg) == 0)
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
		return config_fail_at(p, NULL, "out of memory");
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
