#include "server.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <systemd/sd-daemon.h>

#include "log.h"


struct conn {
	struct server *srv;
	int fd;
	void *state;
	char in[SERVER_LINE_MAX + 1];
	size_t inlen;
	char *out;
	size_t outlen, outpos, outcap;
	bool closing;		/* nothing more is read or answered */
	struct event_timer close_timer;
	bool write_failed;	/* the peer is gone for output; its input still counts */
	bool corked;		/* conn_send() queues only, until conn_uncork() */
	size_t cork_queued;	/* what was queued when the cork began */
	struct ucred cred;
	struct conn *next;
};

struct server {
	struct event_loop *loop;
	const struct config *cfg;
	struct server_handler h;
	int listen_fd;
	bool activated;		/* the socket came from systemd */
	bool created;		/* we bound the path and remove it at exit */
	struct conn *conns;
	size_t nconns;
	size_t limit;
	struct event_timer accept_timer;	/* armed while accepting pauses */
};

/* How long a closing connection may take to read our last line and leave. */
#define CLOSE_LINGER_MS 2000
/*
 * Descriptors besides the connections: stdio, the listening socket, the
 * broker, the database with its WAL and shm, metrics, sd_notify, with room
 * for a reconnect while the old socket is still open.
 */
#define SERVER_FD_RESERVE 64
/* Out of descriptors, accepting waits this long (as tmux does) rather than spin. */
#define ACCEPT_PAUSE_MS 1000
/* Connections the kernel may queue before we accept: a burst of clients at boot. */
#define SERVER_BACKLOG 64

static void conn_io(int fd, short revents, void *arg);

void
server_set_config(struct server *srv, const struct config *cfg)
{
	srv->cfg = cfg;
}

size_t
server_connections(const struct server *srv)
{
	return srv->nconns;
}

size_t
conn_queued(const struct conn *c)
{
	return c->outlen - c->outpos;
}

pid_t
conn_pid(const struct conn *c)
{
	return c->cred.pid;
}

uid_t
conn_uid(const struct conn *c)
{
	return c->cred.uid;
}

void
server_foreach(struct server *srv, void (*fn)(struct conn *c, void *state, void *arg), void *arg)
{
	struct conn *next;

	for (struct conn *c = srv->conns; c; c = next) {
		next = c->next;
		if (!c->closing)
			fn(c, c->state, arg);
	}
}

static void
conn_free(struct conn *c)
{
	struct server *srv = c->srv;

	for (struct conn **p = &srv->conns; *p; p = &(*p)->next) {
		if (*p == c) {
			*p = c->next;
			break;
		}
	}
	srv->nconns--;
	event_timer_disarm(srv->loop, &c->close_timer);
	if (c->state)
		srv->h.close(c, c->state, srv->h.arg);
	event_io_del(srv->loop, c->fd);
	close(c->fd);
	free(c->out);
	free(c);
}

/* While its output is backed up, a connection's input waits in the kernel. */
static bool
conn_paused(const struct conn *c)
{
	return !c->closing && conn_queued(c) >= SERVER_OUT_LOW_WATER;
}

static void
conn_watch(struct conn *c)
{
	short events = (conn_paused(c) ? 0 : POLLIN) | (conn_queued(c) ? POLLOUT : 0);

	if (event_io_set(c->srv->loop, c->fd, events, conn_io, c) == -1) {
		log_warnx("consumer pid %d: no room in the event loop; closing", (int)c->cred.pid);
		c->closing = true;
		event_timer_arm(c->srv->loop, &c->close_timer, 0);
	}
}

/* Writes what the socket takes; returns -1 when the peer is gone. */
static int
conn_flush(struct conn *c)
{
	while (conn_queued(c) > 0) {
		ssize_t n = send(c->fd, c->out + c->outpos, conn_queued(c), MSG_NOSIGNAL);
		if (n == -1) {
			if (errno == EAGAIN || errno == EINTR)
				break;
			c->outpos = c->outlen = 0;
			c->write_failed = true;
			return -1;
		}
		c->outpos += (size_t)n;
	}
	if (c->outpos == c->outlen)
		c->outpos = c->outlen = 0;
	return 0;
}

void
conn_send(struct conn *c, const char *data, size_t len)
{
	if (c->write_failed || c->closing)
		return;
	if (conn_queued(c) + len > SERVER_OUT_MAX) {
		log_warnx("consumer pid %d uid %d: %zu bytes of output unread; closing",
		    (int)c->cred.pid, (int)c->cred.uid, conn_queued(c));
		c->outpos = c->outlen = 0;
		conn_close(c);
		return;
	}
	if (c->outpos > 0 && c->outlen + len > c->outcap) {
		memmove(c->out, c->out + c->outpos, conn_queued(c));
		c->outlen -= c->outpos;
		c->outpos = 0;
	}
	if (c->outlen + len > c->outcap) {
		size_t cap = c->outcap ? c->outcap : 4096;
		char *grown;
		while (cap < c->outlen + len)
			cap *= 2;
		if ((grown = realloc(c->out, cap)) == NULL) {
			log_warnx("consumer pid %d: out of memory; closing", (int)c->cred.pid);
			c->closing = true;
			return;
		}
		c->out = grown;
		c->outcap = cap;
	}
	memcpy(c->out + c->outlen, data, len);
	c->outlen += len;
	if (c->corked)
		return;
	/*
	 * A failed write does not end the connection here: an ack the peer sent
	 * before it closed may still wait to be read, and must count.
	 */
	conn_flush(c);
	conn_watch(c);
}

void
conn_cork(struct conn *c)
{
	c->corked = true;
	c->cork_queued = conn_queued(c);
}

void
conn_uncork(struct conn *c, bool discard)
{
	c->corked = false;
	/* Output dropped meanwhile (a failed write, too much unread) is gone already. */
	if (discard && conn_queued(c) >= c->cork_queued)
		c->outlen = c->outpos + c->cork_queued;
	if (!c->closing && !c->write_failed)
		conn_flush(c);
	conn_watch(c);
}

static void
on_close_timeout(void *arg)
{
	conn_free(arg);
}

/* Our last line is out: the peer sees EOF, and has a while to leave. */
static void
start_linger(struct conn *c)
{
	shutdown(c->fd, SHUT_WR);
	event_timer_arm(c->srv->loop, &c->close_timer, CLOSE_LINGER_MS);
}

/*
 * Once the error line is written we shut down our side and read what the
 * peer still sends until its EOF: closing with unread input would make the
 * kernel send a reset, and the peer might never read our error line.
 */
void
conn_close(struct conn *c)
{
	if (c->closing)
		return;
	c->closing = true;
	if (conn_queued(c) == 0)
		start_linger(c);
	conn_watch(c);
}

/* Hands over the complete lines read, as long as the peer reads our answers. */
static void
conn_lines(struct conn *c)
{
	char *start = c->in, *nl;

	while (!c->closing && !conn_paused(c) &&
	    (nl = memchr(start, '\n', c->inlen - (size_t)(start - c->in)))) {
		*nl = '\0';
		c->srv->h.line(c, c->state, start, (size_t)(nl - start), c->srv->h.arg);
		start = nl + 1;
	}
	c->inlen -= (size_t)(start - c->in);
	memmove(c->in, start, c->inlen);
	if (!c->closing && !conn_paused(c) && c->inlen > SERVER_LINE_MAX) {
		static const char msg[] = "{\"type\":\"error\",\"code\":\"line_too_long\","
		    "\"message\":\"a line may be at most 65536 bytes\"}\n";
		log_warnx("consumer pid %d uid %d: line longer than %d bytes; closing",
		    (int)c->cred.pid, (int)c->cred.uid, SERVER_LINE_MAX);
		conn_send(c, msg, sizeof(msg) - 1);
		conn_close(c);
	}
}

static void
conn_read(struct conn *c)
{
	ssize_t n = recv(c->fd, c->in + c->inlen, SERVER_LINE_MAX + 1 - c->inlen, 0);

	if (n == 0 || (n == -1 && errno != EAGAIN && errno != EINTR)) {
		conn_free(c);
		return;
	}
	if (n == -1)
		return;
	c->inlen += (size_t)n;
	conn_lines(c);
}

static void
conn_io(int fd, short revents, void *arg)
{
	struct conn *c = arg;
	size_t before = conn_queued(c);

	(void)fd;
	if (c->closing) {
		char discard[4096];
		if ((revents & (POLLIN | POLLHUP | POLLERR)) && recv(c->fd, discard, sizeof(discard), 0) <= 0) {
			conn_free(c);
			return;
		}
		if (conn_queued(c) && (conn_flush(c) == -1 || conn_queued(c) == 0))
			start_linger(c);
		conn_watch(c);
		return;
	}
	if (revents & (POLLIN | POLLHUP | POLLERR)) {
		conn_read(c);
		return;		/* c may be gone */
	}
	/* A failed write is noted in the conn; its input is still read to EOF. */
	conn_flush(c);
	if (before >= SERVER_OUT_LOW_WATER && !conn_paused(c) && !c->closing) {
		c->srv->h.drained(c, c->state, c->srv->h.arg);
		conn_lines(c);
	}
	conn_watch(c);
}

/*
 * socket.allow, checked against SO_PEERCRED and SO_PEERGROUPS: root and our
 * own user are always in; otherwise the peer's user, or one of the groups
 * the peer process holds (as the kernel sees them, SupplementaryGroups=
 * and sg included).
 */
static bool
peer_allowed(const struct config *cfg, int fd, const struct ucred *cred)
{
	gid_t groups[NGROUPS_MAX];
	socklen_t len = sizeof(groups);
	size_t ngroups;

	if (cfg->socket.allow == NULL || cred->uid == 0 || cred->uid == geteuid())
		return true;
	ngroups = getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, groups, &len) == 0 ? len / sizeof(gid_t) : 0;
	for (size_t i = 0; i < cfg->socket.nallow; i++) {
		const struct config_peer *peer = &cfg->socket.allow[i];
		if (!peer->group && peer->id == cred->uid)
			return true;
		if (peer->group && peer->id == cred->gid)
			return true;
		for (size_t g = 0; peer->group && g < ngroups; g++)
			if (groups[g] == peer->id)
				return true;
	}
	return false;
}

static void
on_accept(int fd, short revents, void *arg)
{
	struct server *srv = arg;
	socklen_t len = sizeof(struct ucred);
	struct conn *c;
	int cfd;

	(void)revents;
	if ((cfd = accept4(fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) == -1) {
		if (errno == EMFILE || errno == ENFILE) {
			log_warn("accept: not accepting for %d ms", ACCEPT_PAUSE_MS);
			event_io_del(srv->loop, fd);
			event_timer_arm(srv->loop, &srv->accept_timer, ACCEPT_PAUSE_MS);
		} else if (errno != EAGAIN && errno != EINTR) {
			log_warn("accept");
		}
		return;
	}
	if ((c = calloc(1, sizeof(*c))) == NULL) {
		log_warnx("accept: out of memory");
		close(cfd);
		return;
	}
	c->srv = srv;
	c->fd = cfd;
	event_timer_init(&c->close_timer, on_close_timeout, c);
	getsockopt(cfd, SOL_SOCKET, SO_PEERCRED, &c->cred, &len);
	c->next = srv->conns;
	srv->conns = c;
	srv->nconns++;
	if (srv->nconns > srv->limit) {
		static const char msg[] = "{\"type\":\"error\",\"code\":\"too_many_connections\","
		    "\"message\":\"socket.max_consumers connections are open already\"}\n";
		log_warnx("refused consumer pid %d uid %d: %zu connections are the limit",
		    (int)c->cred.pid, (int)c->cred.uid, srv->limit);
		conn_send(c, msg, sizeof(msg) - 1);
		conn_close(c);
		return;
	}
	if (!peer_allowed(srv->cfg, cfd, &c->cred)) {
		static const char msg[] = "{\"type\":\"error\",\"code\":\"not_allowed\","
		    "\"message\":\"this user may not use cmdrelayd (socket.allow)\"}\n";
		log_warnx("refused consumer pid %d uid %d gid %d: not in socket.allow",
		    (int)c->cred.pid, (int)c->cred.uid, (int)c->cred.gid);
		conn_send(c, msg, sizeof(msg) - 1);
		conn_close(c);
		return;
	}
	/* debug: a monitor's stats poll would otherwise log two lines each time;
	 * consumers are logged at info when they say hello */
	log_debug("consumer connected: pid %d uid %d gid %d", (int)c->cred.pid, (int)c->cred.uid,
	    (int)c->cred.gid);
	if ((c->state = srv->h.open(c, srv->h.arg)) == NULL) {
		conn_close(c);
		return;
	}
	conn_watch(c);
}

static void
on_accept_resume(void *arg)
{
	struct server *srv = arg;

	if (event_io_set(srv->loop, srv->listen_fd, POLLIN, on_accept, srv) == -1)
		event_timer_arm(srv->loop, &srv->accept_timer, ACCEPT_PAUSE_MS);
}

/* Enough descriptors for socket.max_consumers connections, as far as the hard limit allows. */
static void
server_raise_nofile(size_t conns)
{
	rlim_t want = (rlim_t)conns + SERVER_FD_RESERVE;
	struct rlimit rl;

	if (getrlimit(RLIMIT_NOFILE, &rl) == -1 || rl.rlim_cur >= want)
		return;
	rl.rlim_cur = rl.rlim_max != RLIM_INFINITY && rl.rlim_max < want ? rl.rlim_max : want;
	if (setrlimit(RLIMIT_NOFILE, &rl) == -1)
		getrlimit(RLIMIT_NOFILE, &rl);
	if (rl.rlim_cur < want)
		log_warnx("only %ju file descriptors (RLIMIT_NOFILE); socket.max_consumers %zu needs %ju",
		    (uintmax_t)rl.rlim_cur, conns, (uintmax_t)want);
}

/* A socket file left by a daemon that died is removed; a live one is not. */
static int
remove_stale(const char *path, char *err, size_t errlen)
{
	struct sockaddr_un sun = { .sun_family = AF_UNIX };
	struct stat st;
	int fd, rc;

	if (lstat(path, &st) == -1)
		return errno == ENOENT ? 0 : (snprintf(err, errlen, "%s: %s", path, strerror(errno)), -1);
	if (!S_ISSOCK(st.st_mode)) {
		snprintf(err, errlen, "%s exists and is not a socket", path);
		return -1;
	}
	snprintf(sun.sun_path, sizeof(sun.sun_path), "%s", path);
	if ((fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0)) == -1) {
		snprintf(err, errlen, "socket: %s", strerror(errno));
		return -1;
	}
	rc = connect(fd, (struct sockaddr *)&sun, sizeof(sun));
	close(fd);
	if (rc == 0) {
		snprintf(err, errlen, "%s: another process is listening on it", path);
		return -1;
	}
	if (unlink(path) == -1) {
		snprintf(err, errlen, "%s: %s", path, strerror(errno));
		return -1;
	}
	return 0;
}

static int
create_socket(struct server *srv, char *err, size_t errlen)
{
	const struct config *cfg = srv->cfg;
	struct sockaddr_un sun = { .sun_family = AF_UNIX };
	mode_t old_umask;
	int rc;

	if (remove_stale(cfg->socket.path, err, errlen) == -1)
		return -1;
	snprintf(sun.sun_path, sizeof(sun.sun_path), "%s", cfg->socket.path);
	if ((srv->listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)) == -1) {
		snprintf(err, errlen, "socket: %s", strerror(errno));
		return -1;
	}
	/* The socket file is born with the configured mode, never wider. */
	old_umask = umask(0777 & ~(mode_t)cfg->socket.mode);
	rc = bind(srv->listen_fd, (struct sockaddr *)&sun, sizeof(sun));
	umask(old_umask);
	if (rc == -1) {
		snprintf(err, errlen, "%s: %s", cfg->socket.path, strerror(errno));
		return -1;
	}
	srv->created = true;
	if (chmod(cfg->socket.path, (mode_t)cfg->socket.mode) == -1) {
		snprintf(err, errlen, "%s: chmod: %s", cfg->socket.path, strerror(errno));
		return -1;
	}
	if (cfg->socket.group) {
		struct group *gr = getgrnam(cfg->socket.group);
		if (gr == NULL) {
			snprintf(err, errlen, "socket.group: no group '%s'", cfg->socket.group);
			return -1;
		}
		/* The unit's sandbox filters chown(); skip it when nothing changes. */
		if (getegid() != gr->gr_gid && chown(cfg->socket.path, (uid_t)-1, gr->gr_gid) == -1) {
			snprintf(err, errlen, "%s: chown to group %s: %s", cfg->socket.path,
			    cfg->socket.group, strerror(errno));
			return -1;
		}
	}
	if (listen(srv->listen_fd, SERVER_BACKLOG) == -1) {
		snprintf(err, errlen, "%s: listen: %s", cfg->socket.path, strerror(errno));
		return -1;
	}
	return 0;
}

static int
inherit_socket(struct server *srv, int n, char *err, size_t errlen)
{
	if (n != 1 || sd_is_socket_unix(SD_LISTEN_FDS_START, SOCK_STREAM, 1, NULL, 0) <= 0) {
		snprintf(err, errlen, "socket activation: expected one listening UNIX stream socket, got %d fds", n);
		return -1;
	}
	srv->listen_fd = SD_LISTEN_FDS_START;
	srv->activated = true;
	if (fcntl(srv->listen_fd, F_SETFL, fcntl(srv->listen_fd, F_GETFL) | O_NONBLOCK) == -1 ||
	    fcntl(srv->listen_fd, F_SETFD, FD_CLOEXEC) == -1) {
		snprintf(err, errlen, "socket activation: %s", strerror(errno));
		return -1;
	}
	return 0;
}

struct server *
server_new(struct event_loop *loop, const struct config *cfg, const struct server_handler *handler,
    char *err, size_t errlen)
{
	struct server *srv;
	int n, rc;

	if ((srv = calloc(1, sizeof(*srv))) == NULL) {
		snprintf(err, errlen, "out of memory");
		return NULL;
	}
	srv->loop = loop;
	srv->cfg = cfg;
	srv->h = *handler;
	srv->listen_fd = -1;
	srv->limit = (size_t)cfg->socket.max_consumers;
	event_timer_init(&srv->accept_timer, on_accept_resume, srv);
	server_raise_nofile(srv->limit);
	n = sd_listen_fds(1);
	rc = n > 0 ? inherit_socket(srv, n, err, errlen) : create_socket(srv, err, errlen);
	if (rc == -1 || event_io_set(loop, srv->listen_fd, POLLIN, on_accept, srv) == -1) {
		if (rc == 0)
			snprintf(err, errlen, "too many file descriptors");
		server_free(srv);
		return NULL;
	}
	log_info("consumer socket %s%s", srv->activated ? "from systemd" : cfg->socket.path,
	    srv->activated ? "" : " created");
	return srv;
}

void
server_free(struct server *srv)
{
	if (srv == NULL)
		return;
	while (srv->conns)
		conn_free(srv->conns);
	event_timer_disarm(srv->loop, &srv->accept_timer);
	if (srv->listen_fd >= 0) {
		event_io_del(srv->loop, srv->listen_fd);
		close(srv->listen_fd);
	}
	if (srv->created)
		unlink(srv->cfg->socket.path);
	free(srv);
}
