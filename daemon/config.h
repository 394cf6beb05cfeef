/* The YAML configuration: parsed into a fresh struct, handed over only when valid. */
#ifndef CMDRELAY_CONFIG_H
#define CMDRELAY_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "log.h"

#define EX_CONFIG_STATUS 78	/* sysexits.h EX_CONFIG */
#define CONFIG_ERR_MAX 512
#define CONFIG_MAX_SUBSCRIPTIONS 256
#define CONFIG_MAX_STRING 4096
#define CONFIG_MAX_PASSWORD 1024
#define CONFIG_MAX_PEERS 64
#define CONFIG_MAX_UPLINK_PATTERNS 64
/* A cluster has a handful of nodes; each dead one costs a backoff step. */
#define CONFIG_MAX_HOSTS 16
/* A config is a page or two; anything near this is not one (and a reload parses on the loop). */
#define CONFIG_MAX_BYTES (1024 * 1024)
/* The deepest key is three levels down (broker.tls.ca_file); libyaml slows down quadratically with depth. */
#define CONFIG_MAX_DEPTH 16

/* One broker endpoint of broker.hosts (or broker.host and broker.port). */
struct config_endpoint {
	char *host;
	int64_t port;
};

struct config_subscription {
	char *topic;
	int64_t qos;
};

/* A user or group that socket.allow lets in. */
struct config_peer {
	bool group;
	unsigned id;		/* uid or gid */
};

struct config {
	char *file;
	struct {
		char *host;			/* hosts[0] */
		int64_t port;
		struct config_endpoint *hosts;	/* tried in turn; at least one */
		size_t nhosts;
		char *client_id;
		int64_t keepalive;
		char *protocol;			/* "auto", "mqttv311" or "mqttv5" */
		int64_t session_expiry_ms;	/* MQTT 5 only */
		int64_t receive_maximum;	/* MQTT 5 only: the broker's window toward us */
		char *packet_ids;		/* "kept" or "renumbered" on redelivery */
		char *barrier_topic;		/* subscribed and unsubscribed as a barrier */
		char *username;
		char *password_file;
		char *password;		/* loaded from the credential or password_file */
		char *tls_ca_file;
		char *tls_cert_file;
		char *tls_key_file;
		int64_t reconnect_min_ms;
		int64_t reconnect_max_ms;
	} broker;
	struct config_subscription *subs;
	size_t nsubs;
	char *topic_fields;
	int64_t redelivery_window_ms;
	struct {
		char *path;
		int64_t max_age_ms;
		int64_t max_rows;
		int64_t max_topics;	/* topics whose newest command retention keeps */
		int64_t max_payload;
		char *on_corruption;	/* "recover" (move aside, salvage) or "stop" */
	} store;
	struct {
		char *path;
		int64_t mode;
		char *group;
		struct config_peer *allow;	/* NULL: whoever the file mode lets in */
		size_t nallow;
		int64_t max_consumers;
		int64_t window;
		int64_t max_cursors;
		int64_t cursor_expiry_ms;
	} socket;
	struct {
		char **allow;		/* MQTT filters; NULL: no uplink */
		size_t nallow;
		int64_t max_queued;
	} uplink;
	struct {
		char *textfile;		/* Prometheus textfile; NULL: none */
		int64_t mode;		/* its file mode, whatever the umask */
		int64_t interval_ms;
	} metrics;
	int64_t log_level;
};

/*
 * Parses FILE into a new config. On failure returns -1 and puts into err a
 * message of the form "FILE:LINE:COLUMN: what is wrong".
 */
int config_load(const char *file, struct config **out, char *err, size_t errlen);
/*
 * The same without what only the daemon needs: the password is not read
 * (broker.password stays NULL) and the TLS files are not opened. For
 * cmdrelayctl, whose users may read the config but not the secrets.
 */
int config_load_public(const char *file, struct config **out, char *err, size_t errlen);
void config_free(struct config *cfg);
/*
 * The directories of store.path, socket.path and metrics.textfile: with
 * create false (-t) -1 unless each exists or can be made, with create true
 * made; the message names the key and the directory.
 */
int config_dirs(const struct config *cfg, bool create, char *err, size_t errlen);

/*
 * For a reload: puts back into next the values of running for the keys a
 * reload cannot change (store.path, socket.*), and names those that differed.
 */
size_t config_keep_restart_keys(struct config *next, struct config *running,
    const char **changed, size_t max);

/* "500ms", "30s", "5m", "1h", "90d" into milliseconds; -1 if malformed. */
int parse_duration_ms(const char *text, int64_t *out_ms);

#endif
