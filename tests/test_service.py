"""cmdrelayd as a systemd service (design.md, "systemd" and "Programs"),
without systemd as PID 1: the real binary, a real Mosquitto, and a
NOTIFY_SOCKET read like systemd reads it.

    READY=1 only once config, database and consumer socket are ready (also
            with the broker down); nothing before it, no MAINPID=
    STATUS= follows the broker connection and the counts
    WATCHDOG=1 at least every WATCHDOG_USEC/2, broker up or down
    SIGHUP  RELOADING=1 + MONOTONIC_USEC ... READY=1; invalid config kept out;
            restart-only keys reported and kept; broker change reconnects
    SIGTERM STOPPING=1, exit 0
    socket activation through systemd-socket-activate with the socket unit's
            ListenStream/SocketMode/FileDescriptorName
    logging: <N> prefixes when stderr is the journal stream, "cmdrelayd: "
            otherwise; log.level

Run with /usr/bin/python3 (Debian's pytest, PyYAML and paho).
"""
import json
import os
import re
import signal
import socket
import sqlite3
import stat
import subprocess
import time

import pytest

from brokers import Mosquitto, publish
from relay import CMDRELAYD, ROOT, NotifyListener, Relay

SOCKET_UNIT = ROOT / "systemd" / "cmdrelayd.socket.in"
WATCHDOG_USEC = 1_000_000
WATCHDOG_SLACK = 0.25          # seconds over WATCHDOG_USEC/2 a gap may take


# --- harness ---------------------------------------------------------------

class ProbingListener(NotifyListener):
    """A NotifyListener that also keeps whole datagrams and, in its reading
    thread, runs probe() the instant a datagram with READY=1 arrives, before
    anybody else sees that message (what systemd would let start next)."""

    def __init__(self, path, probe=None):
        self.datagrams = []         # (monotonic time, [lines]) per datagram
        self.probe = probe
        self.probes = []            # probe() results, one per READY=1
        super().__init__(path)

    def _read(self):
        while not self.closing:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            now = time.monotonic()
            lines = data.decode().splitlines()
            result = self.probe() if self.probe and "READY=1" in lines else None
            with self.lock:
                if result is not None:
                    self.probes.append(result)
                self.datagrams.append((now, lines))
                self.messages.extend((now, line) for line in lines)


class ServiceRelay(Relay):
    """Relay.start() with the environment systemd would give: extra variables
    (WATCHDOG_USEC, ...), JOURNAL_STREAM matching the real stderr, a shell
    wrapper, or systemd-socket-activate in front of the daemon."""

    socket_path = property(lambda self: self.workdir / "cmdrelay.sock")

    def start(self, wait_subscribed=True, timeout=30, env=None, journal_stream=None, probe=None,
              watchdog_pid_self=False, activate=None):
        """journal_stream: True = "dev:inode" of the daemon's stderr, a string = that value.
        watchdog_pid_self: export WATCHDOG_PID=<the daemon's pid> (sh -c 'exec ...').
        activate: (listen path, fdname): run under systemd-socket-activate; the
        daemon starts only at the first connection, so READY=1 is not waited for."""
        assert self.proc is None, "relay already running"
        self.notify = ProbingListener(self.workdir / "notify.sock", probe)
        daemon_env = {k: v for k, v in os.environ.items()
                      if k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM", "WATCHDOG_USEC", "WATCHDOG_PID",
                                   "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")}
        daemon_env["NOTIFY_SOCKET"] = self.notify.path
        daemon_env.update(env or {})
        self.log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")
        if journal_stream is True:
            st = os.fstat(log.fileno())
            daemon_env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        elif journal_stream:
            daemon_env["JOURNAL_STREAM"] = journal_stream
        argv = [str(CMDRELAYD), "-c", str(self.conf_path)]
        popen_env = daemon_env
        if watchdog_pid_self:
            argv = ["/bin/sh", "-c", 'WATCHDOG_PID=$$; export WATCHDOG_PID; exec "$@"', "sh", *argv]
        if activate:
            path, fdname = activate
            # systemd-socket-activate hands its children only -E variables
            # (plus LISTEN_*), and says READY=1 itself if it has NOTIFY_SOCKET.
            argv = ["systemd-socket-activate", "-l", str(path), f"--fdname={fdname}",
                    *(f"-E{k}={v}" for k, v in daemon_env.items()
                      if k in ("NOTIFY_SOCKET", "JOURNAL_STREAM", "WATCHDOG_USEC", "PATH")),
                    *argv]
            popen_env = {k: v for k, v in daemon_env.items() if k != "NOTIFY_SOCKET"}
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=popen_env)
        log.close()
        if activate:
            return self
        self.wait_for(lambda: self.notify.seen("READY=1"), timeout, "READY=1")
        if wait_subscribed:
            self.wait_log("subscriptions in place", timeout)
        return self

    # -- notify messages since a mark --------------------------------------

    def mark(self):
        with self.notify.lock:
            return len(self.notify.messages)

    def since(self, mark, prefix=""):
        with self.notify.lock:
            return [m for _, m in self.notify.messages[mark:] if m.startswith(prefix)]

    def wait_notify(self, mark, predicate, what, timeout=15):
        """Waits for a message after mark with predicate(message); returns it."""
        found = []

        def check():
            found[:] = [m for m in self.since(mark) if predicate(m)]
            return found
        try:
            self.wait_for(check, timeout, what)
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- notify messages since the mark:\n"
                                 + "\n".join(self.since(mark))) from None
        return found[0]

    def wait_status(self, mark, text, timeout=15):
        return self.wait_notify(mark, lambda m: m.startswith("STATUS=") and text in m,
                                f"STATUS containing {text!r}", timeout)

    # -- log since a mark ---------------------------------------------------

    def log_mark(self):
        return self.log_path.stat().st_size

    def log_since(self, mark):
        return self.log_path.read_bytes()[mark:].decode(errors="replace")

    def wait_log_since(self, mark, text, timeout=15):
        self.wait_for(lambda: text in self.log_since(mark), timeout, repr(text))

    def signal(self, sig):
        self.proc.send_signal(sig)


def topic(uid, n=0):
    return f"/cf/v1/AAA/012C/{uid}{n or ''}/set"


def make_relay(tmp_path, broker, uid, topics=None, **overrides):
    return ServiceRelay(tmp_path / "relay", broker, f"gateway-{uid}", topics or [topic(uid)], **overrides)


def hello(path, sock=None, timeout=10, **fields):
    """Sends {"op":"hello", ...} (on sock, or a new connection to path) and
    returns (socket, the first reply line as an object)."""
    if sock is None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(str(path))
    sock.settimeout(timeout)
    sock.sendall((json.dumps({"op": "hello", **fields}) + "\n").encode())
    buf = b""
    while b"\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after hello; got {buf!r}"
        buf += chunk
    return sock, json.loads(buf.split(b"\n", 1)[0])


def ready_probe(relay):
    """What must hold the instant READY=1 is sent: the consumer socket accepts
    a connection (kept open for a hello later) and the database has its schema."""
    def probe():
        result = {"time": time.monotonic()}
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(0.5)
        try:
            s.connect(str(relay.socket_path))
            result["sock"] = s
        except OSError as e:
            result["connect_error"] = repr(e)
            s.close()
        try:
            db = sqlite3.connect(f"file:{relay.db_path}?mode=ro", uri=True, timeout=1)
            try:
                result["user_version"] = db.execute("PRAGMA user_version").fetchone()[0]
                result["tables"] = {r[0] for r in db.execute(
                    "SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")}
            finally:
                db.close()
        except sqlite3.Error as e:
            result["db_error"] = repr(e)
        return result
    return probe


@pytest.fixture
def relays():
    """Every ServiceRelay a test starts is stopped (or killed) at the end."""
    started = []
    yield started
    for r in started:
        if r.running():
            r.kill()
        elif r.notify is not None and not r.notify.closing:
            r.notify.close()


# --- 1. READY=1 ------------------------------------------------------------

def test_ready_only_when_socket_and_database_are_ready(mosquitto, tmp_path, uid, relays):
    relay = make_relay(tmp_path, mosquitto, uid)
    relays.append(relay)
    relay.start(probe=ready_probe(relay))

    _, first = relay.notify.messages[0]
    assert first == "READY=1", f"first notify message {first!r}, all: {relay.notify.messages}"
    assert not relay.notify.seen("MAINPID="), "the daemon is the main process: no MAINPID="
    assert len(relay.notify.probes) == 1, relay.notify.probes
    probe = relay.notify.probes[0]
    assert "sock" in probe, f"consumer socket refused at READY=1: {probe}"
    assert probe.get("user_version", 0) > 0, f"no schema at READY=1: {probe}"
    assert {"messages", "consumers", "commands", "consumer_lag"} <= probe["tables"], probe

    # the connection made at READY=1 is served
    s, welcome = hello(relay.socket_path, sock=probe["sock"])
    s.close()
    assert welcome["type"] == "welcome" and welcome["version"] == 1, welcome
    relay.stop()


def test_ready_with_the_broker_down(mosquitto, tmp_path, uid, relays):
    """The broker may still be connecting: READY=1 anyway, STATUS says so,
    and the relay connects when the broker comes."""
    relay = make_relay(tmp_path, mosquitto, uid)
    relays.append(relay)
    mosquitto.stop()
    t0 = time.monotonic()
    relay.start(wait_subscribed=False, probe=ready_probe(relay), timeout=10)
    ready_t = next(t for t, m in relay.notify.messages if m == "READY=1")
    assert ready_t - t0 < 3, f"READY=1 took {ready_t - t0:.1f}s with the broker down"
    assert relay.notify.messages[0][1] == "READY=1", relay.notify.messages
    assert "sock" in relay.notify.probes[0], relay.notify.probes

    where = f"{mosquitto.host}:{mosquitto.port}"
    relay.wait_status(0, f"disconnected from {where}")
    s, welcome = hello(relay.socket_path)
    s.close()
    assert welcome["type"] == "welcome", welcome

    m = relay.mark()
    mosquitto.start()
    relay.wait_status(m, f"connected to {where}")
    relay.wait_log("subscriptions in place")
    publish(mosquitto, topic(uid), b"late")
    relay.wait_count(1, "status = 'accepted'", timeout=10)
    relay.stop()


def test_status_gives_the_reason_when_the_broker_is_down_at_start(mosquitto, tmp_path, uid, relays):
    """The broker was never reached: STATUS= says why (as it does after a
    connection was lost), once the first attempt has failed."""
    relay = make_relay(tmp_path, mosquitto, uid)
    relays.append(relay)
    mosquitto.stop()
    relay.start(wait_subscribed=False, timeout=10)
    relay.wait_log("Connection refused", timeout=5)
    where = f"{mosquitto.host}:{mosquitto.port}"
    status = relay.wait_notify(0, lambda m: re.match(rf"STATUS=disconnected from {re.escape(where)} \(.+\)", m),
                               "STATUS with the reason of the disconnection", timeout=3)
    assert "refused" in status.lower(), status
    relay.stop()


# --- 2. STATUS= ------------------------------------------------------------

def test_status_follows_the_broker_and_the_counts(mosquitto, tmp_path, uid, relays):
    relay = make_relay(tmp_path, mosquitto, uid)
    relays.append(relay)
    relay.start()
    where = f"{mosquitto.host}:{mosquitto.port}"
    relay.wait_status(0, f"connected to {where}")

    m = relay.mark()
    for i in range(3):
        publish(mosquitto, topic(uid), f"cmd {i}".encode())
    status = relay.wait_status(m, "3 accepted")
    assert status.startswith(f"STATUS=connected to {where}"), status
    assert "3 received" in status, status

    m = relay.mark()
    mosquitto.stop()
    down = relay.wait_status(m, f"disconnected from {where}")
    assert re.search(r"\(.+\)", down), f"no reason in {down!r}"
    assert "3 accepted" in down, down       # the counts survive the disconnection

    m = relay.mark()
    mosquitto.start()
    up = relay.wait_status(m, f"connected to {where}")
    assert not up.startswith("STATUS=disconnected"), up
    relay.wait_log("subscriptions in place")

    m = relay.mark()
    publish(mosquitto, topic(uid), b"cmd 3")
    relay.wait_status(m, "4 accepted")
    # coalesced: no more than one STATUS per second or so, even under load
    statuses = [t for t, msg in relay.notify.messages if msg.startswith("STATUS=")]
    assert len(statuses) < 20, statuses
    relay.stop()


# --- 3. WATCHDOG=1 ---------------------------------------------------------

def watchdog_times(relay, t_from, t_to):
    with relay.notify.lock:
        return [t for t, m in relay.notify.messages if m == "WATCHDOG=1" and t_from <= t <= t_to]


def assert_gaps(times, t_from, t_to, what):
    limit = WATCHDOG_USEC / 2e6 + WATCHDOG_SLACK
    edges = [t_from] + times + [t_to]
    gaps = [b - a for a, b in zip(edges, edges[1:])]
    worst = max(gaps)
    print(f"{what}: {len(times)} WATCHDOG=1 in {t_to - t_from:.2f}s, longest gap {worst:.3f}s")
    assert worst <= limit, f"{what}: a gap of {worst:.3f}s between WATCHDOG=1 (limit {limit}s); gaps {gaps}"
    expected = int((t_to - t_from) / (WATCHDOG_USEC / 2e6)) - 1
    assert len(times) >= expected, f"{what}: {len(times)} WATCHDOG=1 in {t_to - t_from:.1f}s, expected >= {expected}"


def test_watchdog_with_the_broker_up_and_down(mosquitto, tmp_path, uid, relays):
    relay = make_relay(tmp_path, mosquitto, uid)
    relays.append(relay)
    # WATCHDOG_PID = the daemon's own pid, as systemd sets it
    relay.start(env={"WATCHDOG_USEC": str(WATCHDOG_USEC)}, watchdog_pid_self=True)
    ready_t = next(t for t, m in relay.notify.messages if m == "READY=1")

    # broker up, with commands flowing
    up_from = time.monotonic()
    for i in range(30):
        publish(mosquitto, topic(uid), f"cmd {i}".encode())
    time.sleep(max(0, up_from + 3 - time.monotonic()))
    up_to = time.monotonic()
    relay.wait_count(30, "status = 'accepted'", timeout=5)

    # broker down: the relay reconnects with backoff meanwhile
    log = relay.log_mark()
    mosquitto.stop()
    down_from = time.monotonic()
    time.sleep(3)
    down_to = time.monotonic()
    attempts = relay.log_since(log).count("reconnecting to")
    assert attempts >= 2, relay.log_since(log)

    mosquitto.start()
    relay.wait_log_since(log, "subscriptions in place")
    end = time.monotonic()

    first = watchdog_times(relay, ready_t, end)
    assert first, f"no WATCHDOG=1 at all:\n{relay.notify.messages}\n{relay.log()}"
    assert first[0] - ready_t <= WATCHDOG_USEC / 2e6 + WATCHDOG_SLACK, \
        f"first WATCHDOG=1 {first[0] - ready_t:.3f}s after READY=1"
    assert_gaps(watchdog_times(relay, up_from, up_to), up_from, up_to, "broker up")
    assert_gaps(watchdog_times(relay, down_from, down_to), down_from, down_to, "broker down")
    assert_gaps(watchdog_times(relay, ready_t, end), ready_t, end, "whole run")
    relay.stop()


def test_no_watchdog_for_another_pid(mosquitto, tmp_path, uid, relays):
    """WATCHDOG_PID names another process (a child that inherited the
    variables): the daemon must not ping on that process's behalf."""
    relay = make_relay(tmp_path, mosquitto, uid)
    relays.append(relay)
    relay.start(env={"WATCHDOG_USEC": str(WATCHDOG_USEC), "WATCHDOG_PID": "1"}, wait_subscribed=False)
    time.sleep(1.5)
    assert not relay.notify.seen("WATCHDOG=1"), relay.notify.messages
    relay.stop()


# --- 4. SIGHUP and SIGTERM -------------------------------------------------

def test_reload_and_stop_notifications(mosquitto, tmp_path, uid, relays):
    relay = make_relay(tmp_path, mosquitto, uid)
    relays.append(relay)
    relay.start()
    assert not relay.notify.seen("WATCHDOG=1"), "WATCHDOG=1 without WATCHDOG_USEC"

    for round_ in range(2):
        with relay.notify.lock:
            d0 = len(relay.notify.datagrams)
        m = relay.mark()
        before = time.monotonic()
        relay.signal(signal.SIGHUP)
        relay.wait_notify(m, lambda msg: msg == "READY=1", "READY=1 after SIGHUP")
        with relay.notify.lock:
            grams = relay.notify.datagrams[d0:]
        idx_reload = [i for i, (_, lines) in enumerate(grams) if "RELOADING=1" in lines]
        idx_ready = [i for i, (_, lines) in enumerate(grams) if "READY=1" in lines]
        assert len(idx_reload) == 1 and len(idx_ready) == 1, grams
        assert idx_reload[0] < idx_ready[0] or \
            grams[idx_reload[0]][1].index("RELOADING=1") < grams[idx_ready[0]][1].index("READY=1"), grams
        t_recv, lines = grams[idx_reload[0]]
        # systemd (Type=notify-reload) wants MONOTONIC_USEC in the same message
        mono = [line for line in lines if line.startswith("MONOTONIC_USEC=")]
        assert len(mono) == 1, f"no MONOTONIC_USEC= with RELOADING=1: {lines}"
        usec = int(mono[0].split("=", 1)[1])
        assert before - 0.01 <= usec / 1e6 <= t_recv + 0.01, \
            f"MONOTONIC_USEC={usec} not CLOCK_MONOTONIC between {before} and {t_recv}"
        relay.wait_log("reloaded")

    m = relay.mark()
    log = relay.log_mark()
    relay.proc.send_signal(signal.SIGTERM)
    rc = relay.proc.wait(15)
    relay.proc = None
    time.sleep(0.2)                       # the listener has read everything
    relay.notify.close()
    after = relay.since(m)
    assert rc == 0, f"exit status {rc}\n{relay.log()}"
    assert "STOPPING=1" in after, after
    assert "READY=1" not in after[after.index("STOPPING=1"):], after
    assert "shutting down" in relay.log_since(log)
    assert not relay.socket_path.exists(), "the daemon created the socket and must remove it"


# --- 5. reload -------------------------------------------------------------

def test_reload_adds_a_filter(mosquitto, tmp_path, uid, relays):
    relay = make_relay(tmp_path, mosquitto, uid)
    relays.append(relay)
    relay.start()
    old, new = topic(uid), topic(uid, 2)

    relay.write_config([old, new])
    log = relay.log_mark()
    relay.signal(signal.SIGHUP)
    relay.wait_log_since(log, "reloaded")
    relay.wait_log_since(log, "subscriptions in place: 2 filters")
    text = relay.log_since(log)
    assert f"subscribing to {new}" in text, text
    assert f"subscribing to {old}" not in text, "G8: the kept filter must not be subscribed again"

    publish(mosquitto, new, b"on the new filter")
    publish(mosquitto, old, b"on the old filter")
    relay.wait_count(2, "status = 'accepted'", timeout=10)
    assert {(r["topic"], bytes(r["payload"])) for r in relay.accepted()} == {
        (new, b"on the new filter"), (old, b"on the old filter")}
    relay.stop()


def test_reload_with_an_invalid_config_keeps_the_old_one(mosquitto, tmp_path, uid, relays):
    relay = make_relay(tmp_path, mosquitto, uid)
    relays.append(relay)
    relay.start()
    old, new = topic(uid), topic(uid, 2)

    relay.write_config([old, new], broker__bogus=1)
    lines = relay.conf_path.read_text().splitlines()
    line_no = next(i for i, line in enumerate(lines, 1) if "bogus:" in line)
    col = lines[line_no - 1].index("bogus") + 1
    log = relay.log_mark()
    m = relay.mark()
    relay.signal(signal.SIGHUP)
    relay.wait_log_since(log, "keeping the running configuration")
    text = relay.log_since(log)
    assert f"{relay.conf_path}:{line_no}:{col}:" in text and "bogus" in text, text
    assert "reloaded" not in text and f"subscribing to {new}" not in text, text
    status = relay.wait_status(m, "reload failed")
    assert f"{relay.conf_path}:{line_no}:{col}" in status, status
    ready = relay.since(m)
    assert "RELOADING=1" in ready and "READY=1" in ready[ready.index("RELOADING=1"):], ready
    assert relay.running()

    publish(mosquitto, old, b"old filter still delivers")
    publish(mosquitto, new, b"not subscribed")
    relay.wait_count(1, "status = 'accepted'", timeout=10)
    time.sleep(0.3)
    assert [(r["topic"], bytes(r["payload"])) for r in relay.rows()] == [(old, b"old filter still delivers")]

    # fixed config: now it applies
    relay.write_config([old, new])
    log = relay.log_mark()
    relay.signal(signal.SIGHUP)
    relay.wait_log_since(log, "subscriptions in place: 2 filters")
    publish(mosquitto, new, b"now subscribed")
    relay.wait_count(2, "status = 'accepted'", timeout=10)
    relay.stop()


def test_reload_keeps_restart_only_settings(mosquitto, tmp_path, uid, relays):
    relay = make_relay(tmp_path, mosquitto, uid)
    relays.append(relay)
    relay.start()
    old_sock = relay.socket_path
    new_db, new_sock = tmp_path / "relay" / "other.db", tmp_path / "relay" / "other.sock"
    publish(mosquitto, topic(uid), b"before")
    relay.wait_count(1)

    relay.write_config([topic(uid), topic(uid, 2)], store__path=str(new_db), socket__path=str(new_sock))
    log = relay.log_mark()
    relay.signal(signal.SIGHUP)
    relay.wait_log_since(log, "reloaded")
    text = relay.log_since(log)
    for key in ("store.path", "socket.path"):
        assert re.search(rf"{re.escape(key)}\b.*only when cmdrelayd restarts", text), f"{key}:\n{text}"
    relay.wait_log_since(log, "subscriptions in place: 2 filters")   # the rest did apply

    publish(mosquitto, topic(uid), b"after")
    publish(mosquitto, topic(uid, 2), b"new filter")
    relay.wait_count(3, timeout=10)
    assert not new_db.exists(), "store.path applied at reload"
    assert not new_sock.exists(), "socket.path applied at reload"
    s, welcome = hello(old_sock)
    s.close()
    assert welcome["type"] == "welcome"

    relay.stop()
    assert not old_sock.exists(), "the socket the daemon created must be removed at exit"
    assert [bytes(r["payload"]) for r in relay.rows()] == [b"before", b"after", b"new filter"]

    # and at the next start they do apply
    relay.start(wait_subscribed=False)
    assert new_db.exists() and new_sock.exists()
    s, welcome = hello(new_sock)
    s.close()
    relay.stop()


def read_lines(sock, quiet=1.0, timeout=10):
    """JSON lines from sock until none came for `quiet` seconds."""
    buf, out = b"", []
    deadline = time.monotonic() + timeout
    sock.settimeout(quiet)
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            break
        if not chunk:
            break
        buf += chunk
        *lines, buf = buf.split(b"\n")
        out += [json.loads(line) for line in lines]
    return out


# A config that config_load() accepts but relay_reload() rejects: TLS to a CA
# file that does not exist (libmosquitto checks it in mosquitto_tls_set()).
FAILING_IN_RELAY_RELOAD = {"broker__tls": {"ca_file": "/nonexistent/cmdrelay-test/ca.pem"}}


def test_reload_failing_late_changes_no_restart_only_setting(mosquitto, tmp_path, uid, relays):
    """A reload that passes the config parser but fails when applied must keep
    the running configuration whole. Here socket.path changes too: the daemon
    must still remove its own socket at exit, and not another file."""
    relay = make_relay(tmp_path, mosquitto, uid)
    relays.append(relay)
    relay.start()
    own = relay.socket_path
    foreign = tmp_path / "someone-else.sock"          # another service's live socket
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(foreign))
    other.listen(1)
    try:
        relay.write_config([topic(uid)], socket__path=str(foreign), **FAILING_IN_RELAY_RELOAD)
        log = relay.log_mark()
        relay.signal(signal.SIGHUP)
        relay.wait_log_since(log, "keeping the running configuration")
        assert "broker.tls" in relay.log_since(log), relay.log_since(log)
        relay.stop()
        assert foreign.exists(), ("cmdrelayd removed a socket file it did not create (the socket.path of "
                                  f"a rejected reload):\n{relay.log_since(log)}")
        assert not own.exists(), f"cmdrelayd left its own socket file behind:\n{relay.log_since(log)}"
    finally:
        other.close()


def test_reload_failing_late_keeps_the_consumer_window(mosquitto, tmp_path, uid, relays):
    """socket.window changes only at restart; a rejected reload must not change
    it either (each consumer's in-flight ring was allocated with the old size)."""
    relay = make_relay(tmp_path, mosquitto, uid, socket__window=2)
    relays.append(relay)
    relay.start()
    s, welcome = hello(relay.socket_path, consumer="lamp", filter="#", **{"from": "stored"})
    assert welcome["type"] == "welcome", welcome

    relay.write_config([topic(uid)], socket__window=64, **FAILING_IN_RELAY_RELOAD)
    log = relay.log_mark()
    relay.signal(signal.SIGHUP)
    relay.wait_log_since(log, "keeping the running configuration")
    for i in range(8):
        publish(mosquitto, topic(uid), f"cmd {i}".encode())
    relay.wait_count(8, timeout=10)
    got = read_lines(s, quiet=1.0)
    s.close()
    commands = [m for m in got if m.get("type") == "command"]
    assert len(commands) == 2, (f"window 2 (running config), yet {len(commands)} unacknowledged commands "
                                f"were sent after a rejected reload with socket.window: 64")
    relay.stop()


def test_reload_to_another_broker(mosquitto, tmp_path, uid, relays):
    relay = make_relay(tmp_path, mosquitto, uid)
    relays.append(relay)
    relay.start()
    second = Mosquitto(tmp_path / "mosquitto2")
    try:
        second.start()
        assert second.port != mosquitto.port
        relay.write_config([topic(uid)], broker__port=second.port)
        log = relay.log_mark()
        m = relay.mark()
        relay.signal(signal.SIGHUP)
        relay.wait_log_since(log, "broker settings changed; reconnecting")
        relay.wait_log_since(log, f"connected to {second.host}:{second.port}")
        relay.wait_log_since(log, "subscriptions in place")
        relay.wait_status(m, f"connected to {second.host}:{second.port}")

        publish(second, topic(uid), b"via the second broker")
        relay.wait_count(1, "status = 'accepted'", timeout=10)
        publish(mosquitto, topic(uid), b"via the first broker: waits there")
        time.sleep(0.5)
        assert [bytes(r["payload"]) for r in relay.rows()] == [b"via the second broker"]
        relay.stop()
    finally:
        second.stop()


# --- 6. socket activation --------------------------------------------------

def socket_unit():
    settings = {}
    section = None
    for line in SOCKET_UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Socket":
            key, _, value = line.partition("=")
            settings[key] = value
    return settings


def test_socket_activation(mosquitto, tmp_path, uid, relays):
    unit = socket_unit()
    assert unit["ListenStream"].startswith("/"), unit
    mode = int(unit["SocketMode"], 8)
    fdname = unit.get("FileDescriptorName", SOCKET_UNIT.name[:-len(".in")])
    path = tmp_path / "run" / os.path.basename(unit["ListenStream"])
    path.parent.mkdir(mode=int(unit.get("DirectoryMode", "0755"), 8))

    relay = make_relay(tmp_path, mosquitto, uid, socket__path=str(path), socket__mode=unit["SocketMode"])
    relays.append(relay)
    relay.start(activate=(path, fdname))
    relay.wait_for(path.exists, 10, f"systemd-socket-activate listening on {path}")
    os.chmod(path, mode)                 # what systemd does with SocketMode=
    inode = path.stat().st_ino

    # the first connection starts the daemon, which answers it
    s, welcome = hello(path, timeout=15)
    assert welcome["type"] == "welcome" and welcome["version"] == 1, welcome
    relay.wait_for(lambda: relay.notify.seen("READY=1"), 10, "READY=1")
    relay.wait_log("subscriptions in place")
    text = relay.log(since_start=True)
    assert "consumer socket from systemd" in text, text
    assert f"{path} created" not in text, text

    publish(mosquitto, topic(uid), b"through the activated socket")
    buf = b""
    s.settimeout(10)
    while b"\n" not in buf:
        chunk = s.recv(65536)
        assert chunk, buf
        buf += chunk
    cmd = json.loads(buf.split(b"\n", 1)[0])
    assert cmd["type"] == "command" and cmd["payload"] == "through the activated socket", cmd
    s.close()
    st = path.stat()
    assert stat.S_IMODE(st.st_mode) == mode and st.st_ino == inode, "the daemon must leave systemd's socket alone"

    relay.stop()
    # systemd owns the socket file (RemoveOnStop= of the socket unit): still
    # there, the same inode, for the next activation
    assert path.exists() and path.stat().st_ino == inode, "the daemon removed systemd's socket"


# --- 7. logging ------------------------------------------------------------

def test_log_prefixes_for_the_journal(mosquitto, tmp_path, uid, relays):
    relay = make_relay(tmp_path, mosquitto, uid)
    relays.append(relay)
    mosquitto.stop()             # warnings: connection refused
    relay.start(journal_stream=True, wait_subscribed=False)
    relay.wait_log("reconnecting to")
    relay.write_config([topic(uid)], broker__bogus=1)   # an error at reload
    relay.signal(signal.SIGHUP)
    relay.wait_log("keeping the running configuration")
    relay.stop()

    lines = relay.log(since_start=True).splitlines()
    prefixes = {}
    for line in lines:
        mt = re.match(r"<([0-7])>", line)
        assert mt, f"line without a priority prefix: {line!r}\n{lines}"
        prefixes.setdefault(int(mt.group(1)), line)
    assert 6 in prefixes and 4 in prefixes and 3 in prefixes, prefixes
    assert any(l.startswith("<6>started ") for l in lines), lines
    assert any(l.startswith("<3>") and "keeping the running configuration" in l for l in lines), lines
    assert not any(l.startswith("cmdrelayd:") for l in lines), lines


@pytest.mark.parametrize("journal_stream", [None, "stale"], ids=["no-JOURNAL_STREAM", "JOURNAL_STREAM-of-another-file"])
def test_log_prefix_without_the_journal(mosquitto, tmp_path, uid, relays, journal_stream):
    relay = make_relay(tmp_path, mosquitto, uid)
    relays.append(relay)
    if journal_stream == "stale":
        # inherited from a parent whose stderr was the journal: not ours
        st = os.stat(tmp_path)
        journal_stream = f"{st.st_dev}:{st.st_ino}"
    relay.start(journal_stream=journal_stream)
    relay.stop()
    lines = relay.log(since_start=True).splitlines()
    assert lines, "no log at all"
    bad = [l for l in lines if not l.startswith("cmdrelayd: ")]
    assert not bad, bad
    assert any(l.startswith("cmdrelayd: started ") for l in lines), lines


def test_log_level_warning_hides_info(mosquitto, tmp_path, uid, relays):
    relay = make_relay(tmp_path, mosquitto, uid, log__level="warning")
    relays.append(relay)
    mosquitto.stop()             # a warning to see
    relay.start(wait_subscribed=False)
    relay.wait_log("Connection refused", timeout=5)
    mosquitto.start()
    relay.wait_status(0, "connected to")
    relay.stop()
    text = relay.log(since_start=True)
    assert "started" not in text and "subscribing" not in text and "connected to" not in text \
        and "shutting down" not in text, text
    assert all(l.startswith("cmdrelayd: ") for l in text.splitlines()), text
