/* cmdrelayd: relays MQTT device commands into an SQLite history. */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <mosquitto.h>
#include <systemd/sd-daemon.h>

#include "config.h"
#include "consumer.h"
#include "event.h"
#include "log.h"
#include "metrics.h"
#include "mqtt.h"
#include "relay.h"
#include "retention.h"
#include "version.h"

#define DEFAULT_CONFIG "/etc/cmdrelay/cmdrelay.yaml"

static volatile sig_atomic_t quit_signal;
static volatile sig_atomic_t reload_signal;

static void
daemon_on_signal(int sig)
{
	if (sig == SIGHUP)
		reload_signal = 1;
	else
		quit_signal = sig;
}

static void __attribute__((noreturn))
daemon_usage(int status)
{
	fprintf(status ? stderr : stdout,
	    "usage: cmdrelayd [-c FILE] [-t] [-v] [--version]\n"
	    "  -c FILE    configuration (default " DEFAULT_CONFIG ")\n"
	    "  -t         check the configuration and exit (0 valid, 78 invalid)\n"
	    "  -v         log debug messages\n");
	exit(status);
}

/* STATUS= at most this often: counts change with every commit. */
#define STATUS_INTERVAL_MS 1000
/* Consumers connect, leave and acknowledge without a relay event: their part is looked at this often. */
#define STATUS_REFRESH_MS 5000
/* After damage is found: time for consumers to read the history_corrupt line before the exit. */
#define CORRUPT_EXIT_MS 1000

struct daemon_state {
	struct config *cfg;
	struct event_loop *loop;
	struct relay *relay;
	struct consumers *consumers;
	struct retention *retention;
	struct metrics *metrics;
	struct event_timer watchdog;
	uint64_t watchdog_ms;
	struct event_timer status_timer;
	struct event_timer status_refresh;
	struct event_timer corrupt_timer;
	bool corrupt_exit;	/* the grace after finding damage is over */
	uint64_t status_sent_ms;
	char status_sent[512];
};

static void
daemon_on_corrupt_timer(void *arg)
{
	struct daemon_state *d = arg;

	d->corrupt_exit = true;
}

/* "; consumers 1/2 connected, 1 behind": the named ones, from the stats reply. */
static void
daemon_status_consumers(struct daemon_state *d, char *buf, size_t len)
{
	json_t *stats = consumers_stats(d->consumers), *list = json_object_get(stats, "consumers"), *c;
	size_t i, connected = 0, behind = 0, n = strlen(buf);

	json_array_foreach(list, i, c) {
		connected += json_is_true(json_object_get(c, "connected"));
		behind += json_integer_value(json_object_get(c, "lag")) > 0;
	}
	if (stats != NULL)
		snprintf(buf + n, len - n, "; consumers %zu/%zu connected, %zu behind", connected,
		    json_array_size(list), behind);
	json_decref(stats);
}

static void
daemon_send_status(void *arg)
{
	struct daemon_state *d = arg;
	char status[sizeof(d->status_sent)];

	relay_status(d->relay, status, sizeof(status));
	daemon_status_consumers(d, status, sizeof(status));
	if (strcmp(status, d->status_sent) == 0)
		return;
	sd_notifyf(0, "STATUS=%s", status);
	memcpy(d->status_sent, status, sizeof(status));
	d->status_sent_ms = event_now_ms();
}

static void
daemon_notify_status(void *arg)
{
	struct daemon_state *d = arg;
	uint64_t next = d->status_sent_ms + STATUS_INTERVAL_MS, now = event_now_ms();

	if (now >= next)
		daemon_send_status(d);
	else if (d->status_timer.due_ms == 0)
		event_timer_arm(d->loop, &d->status_timer, next - now);
}

static void
daemon_on_status_refresh(void *arg)
{
	struct daemon_state *d = arg;

	daemon_notify_status(d);
	event_timer_arm(d->loop, &d->status_refresh, STATUS_REFRESH_MS);
}

static void
daemon_on_commit(void *arg)
{
	struct daemon_state *d = arg;

	consumers_notify(d->consumers);
}

static void
daemon_on_queued(void *arg)
{
	struct daemon_state *d = arg;

	relay_uplink_kick(d->relay);
}

static int
daemon_on_inject(const struct delivery *dv, int64_t *row, void *arg)
{
	struct daemon_state *d = arg;

	return relay_inject(d->relay, dv, row);
}

static void
daemon_add_relay_stats(json_t *reply, void *arg)
{
	struct daemon_state *d = arg;

	relay_stats(d->relay, reply);
	retention_stats(d->retention, reply);
}

static void
daemon_on_watchdog(void *arg)
{
	struct daemon_state *d = arg;

	sd_notify(0, "WATCHDOG=1");
	event_timer_arm(d->loop, &d->watchdog, d->watchdog_ms);
}

/* Blocks our signals except while the loop sleeps, so no wake-up is lost. */
static void
daemon_setup_signals(sigset_t *sleep_mask)
{
	static const int handled[] = { SIGTERM, SIGINT, SIGHUP };
	struct sigaction sa = { .sa_handler = daemon_on_signal };
	sigset_t block;

	signal(SIGPIPE, SIG_IGN);
	sigemptyset(&block);
	sigemptyset(&sa.sa_mask);
	for (size_t i = 0; i < sizeof(handled) / sizeof(handled[0]); i++)
		sigaddset(&block, handled[i]);
	sigprocmask(SIG_BLOCK, &block, sleep_mask);
	for (size_t i = 0; i < sizeof(handled) / sizeof(handled[0]); i++) {
		sigdelset(sleep_mask, handled[i]);
		sigaction(handled[i], &sa, NULL);
	}
}

/*
 * SIGHUP: the new config is parsed into a fresh struct and swapped in only
 * when valid; what a reload cannot change keeps its running value.
 */
static void
daemon_reload(struct daemon_state *d, const char *file, bool verbose)
{
	const char *changed[16];
	char err[CONFIG_ERR_MAX];
	struct config *next;
	size_t n;

	sd_notifyf(0, "RELOADING=1\nMONOTONIC_USEC=%llu", (unsigned long long)event_now_ms() * 1000);
	if (config_load(file, &next, err, sizeof(err)) == -1) {
		log_errx("reload: %s; keeping the running configuration", err);
		sd_notifyf(0, "READY=1\nSTATUS=reload failed, running the previous configuration: %s", err);
		return;
	}
	n = config_keep_restart_keys(next, d->cfg, changed, sizeof(changed) / sizeof(changed[0]));
	for (size_t i = 0; i < n; i++)
		log_warnx("reload: %s changed; it takes effect only when cmdrelayd restarts", changed[i]);
	if (relay_reload(d->relay, next, err, sizeof(err)) == -1) {
		log_errx("reload: %s; keeping the running configuration", err);
		sd_notifyf(0, "READY=1\nSTATUS=reload failed, running the previous configuration: %s", err);
		/* Swapping again gives the running config its own values back. */
		config_keep_restart_keys(next, d->cfg, changed, sizeof(changed) / sizeof(changed[0]));
		config_free(next);
		return;
	}
	consumers_set_config(d->consumers, next);
	retention_set_config(d->retention, next);
	/* The textfile follows the new config: stop the old writer, start anew. */
	metrics_free(d->metrics);
	d->metrics = metrics_new(d->loop, next, d->consumers);
	log_set_level(verbose ? LOG_LEVEL_DEBUG : (enum log_level)next->log_level);
	config_free(d->cfg);
	d->cfg = next;
	log_info("reloaded %s", file);
	d->status_sent[0] = '\0';
	sd_notify(0, "READY=1");
	daemon_send_status(d);
}

/* -t -v: the values after {hostname}/{machine_id}, as the daemon will use them. */
static void
daemon_check_print(const struct config *cfg)
{
	printf("broker:");
	for (size_t i = 0; i < cfg->broker.nhosts; i++)
		printf(" %s:%d,", cfg->broker.hosts[i].host, (int)cfg->broker.hosts[i].port);
	printf(" client_id %s\n", cfg->broker.client_id);
	for (size_t i = 0; i < cfg->nsubs; i++)
		printf("subscription: %s (qos %d)\n", cfg->subs[i].topic, (int)cfg->subs[i].qos);
	printf("store.path: %s\nsocket.path: %s\n", cfg->store.path, cfg->socket.path);
	if (cfg->metrics.textfile)
		printf("metrics.textfile: %s\n", cfg->metrics.textfile);
}

int
main(int argc, char *argv[])
{
	static const struct option longopts[] = {
		{ "version", no_argument, NULL, 'V' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	const char *config_file = DEFAULT_CONFIG;
	char err[CONFIG_ERR_MAX];
	struct daemon_state d = { 0 };
	const struct consumers_hooks hooks = {
		.stats = daemon_add_relay_stats, .queued = daemon_on_queued, .inject = daemon_on_inject, .arg = &d,
	};
	bool check_only = false, verbose = false, corrupt;
	sigset_t sleep_mask;
	uint64_t usec;
	int ch;

	log_init("cmdrelayd");
	while ((ch = getopt_long(argc, argv, "c:tvh", longopts, NULL)) != -1) {
		switch (ch) {
		case 'c':
			config_file = optarg;
			break;
		case 't':
			check_only = true;
			break;
		case 'v':
			verbose = true;
			break;
		case 'V':
			printf("cmdrelayd %s\n", CMDRELAY_VERSION);
			return 0;
		case 'h':
			daemon_usage(0);
		default:
			daemon_usage(64);
		}
	}
	if (optind != argc)
		daemon_usage(64);

	if (config_load(config_file, &d.cfg, err, sizeof(err)) == -1) {
		log_errx("%s", err);
		return EX_CONFIG_STATUS;
	}
	if (check_only) {
		if (config_dirs(d.cfg, false, err, sizeof(err)) == -1) {
			log_errx("%s", err);
			config_free(d.cfg);
			return EX_CONFIG_STATUS;
		}
		if (verbose)
			daemon_check_print(d.cfg);
		printf("%s: configuration OK\n", config_file);
		config_free(d.cfg);
		return 0;
	}
	log_set_level(verbose ? LOG_LEVEL_DEBUG : (enum log_level)d.cfg->log_level);
	if (config_dirs(d.cfg, true, err, sizeof(err)) == -1) {
		log_errx("%s", err);
		config_free(d.cfg);
		return EX_CONFIG_STATUS;
	}
	if (mqtt_library_check(err, sizeof(err)) == -1)
		fatalx("%s", err);
	mosquitto_lib_init();
	daemon_setup_signals(&sleep_mask);
	if ((d.loop = event_loop_new()) == NULL)
		fatalx("out of memory");
	if ((d.relay = relay_new(d.loop, d.cfg, err, sizeof(err))) == NULL)
		fatalx("%s", err);
	if ((d.consumers = consumers_new(d.loop, d.cfg, relay_store(d.relay), &hooks,
	    err, sizeof(err))) == NULL)
		fatalx("%s", err);
	if ((d.retention = retention_new(d.loop, d.cfg, relay_store(d.relay))) == NULL)
		fatalx("out of memory");
	d.metrics = metrics_new(d.loop, d.cfg, d.consumers);
	event_timer_init(&d.status_timer, daemon_send_status, &d);
	relay_on_status_change(d.relay, daemon_notify_status, &d);
	relay_on_commit(d.relay, daemon_on_commit, &d);
	relay_start(d.relay);

	if (sd_watchdog_enabled(0, &usec) > 0) {
		/* WatchdogSec is in microseconds; pinging at half of it leaves a whole half of slack. */
		d.watchdog_ms = usec / 1000 / 2;
		event_timer_init(&d.watchdog, daemon_on_watchdog, &d);
		event_timer_arm(d.loop, &d.watchdog, d.watchdog_ms);
	}
	if (store_created(relay_store(d.relay)))
		log_warnx("%s did not exist: began a new, empty history; consumer positions and the "
		    "session's subscriptions start afresh", d.cfg->store.path);
	if (!store_check_complete(relay_store(d.relay)))
		log_warnx("%s: the integrity check was cut short by its time budget; damage in the rest"
		    " is found when it is read", d.cfg->store.path);
	if (store_corruptions(relay_store(d.relay)) > 0)
		log_errx("%s: %s (cmdrelayctl store ack-corruption clears this alarm)", d.cfg->store.path,
		    store_corruption(relay_store(d.relay)));
	log_info("started %s, history %s", CMDRELAY_VERSION, d.cfg->store.path);
	sd_notify(0, "READY=1");
	daemon_notify_status(&d);
	event_timer_init(&d.status_refresh, daemon_on_status_refresh, &d);
	event_timer_arm(d.loop, &d.status_refresh, STATUS_REFRESH_MS);

	/*
	 * Damage found while running: nothing more is committed (G6), and the
	 * restart (Restart=on-failure) recovers it before the broker connection.
	 */
	event_timer_init(&d.corrupt_timer, daemon_on_corrupt_timer, &d);
	while (!quit_signal && !d.corrupt_exit) {
		if (store_corrupt(relay_store(d.relay)) && d.corrupt_timer.due_ms == 0)
			event_timer_arm(d.loop, &d.corrupt_timer, CORRUPT_EXIT_MS);
		if (event_loop_once(d.loop, &sleep_mask) == -1)
			fatalx("poll: %s", strerror(errno));
		if (reload_signal) {
			reload_signal = 0;
			daemon_reload(&d, config_file, verbose);
		}
	}

	event_timer_disarm(d.loop, &d.corrupt_timer);
	event_timer_disarm(d.loop, &d.status_refresh);
	corrupt = store_corrupt(relay_store(d.relay));
	if (corrupt) {
		log_errx("%s is corrupt (%s); nothing more is acknowledged; exiting so that the restart"
		    " moves it aside and recovers it", d.cfg->store.path, store_errmsg(relay_store(d.relay)));
		sd_notify(0, "STATUS=HISTORY CORRUPT: exiting so that the restart recovers it");
	} else {
		log_info("received %s, shutting down", strsignal(quit_signal));
	}
	sd_notify(0, "STOPPING=1");
	relay_stop(d.relay);
	metrics_free(d.metrics);
	retention_free(d.retention);
	consumers_free(d.consumers);
	relay_free(d.relay);
	event_loop_free(d.loop);
	config_free(d.cfg);
	mosquitto_lib_cleanup();
	return corrupt ? 1 : 0;
}
