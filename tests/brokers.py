"""Real MQTT brokers on loopback for the cmdrelay tests, plus small MQTT helpers.

Everything here talks to brokers on 127.0.0.1 only, on ports picked at run
time, with state kept in private directories (pytest's tmp dirs).

Brokers
    Mosquitto(workdir)     one ``mosquitto -c <private conf>`` child process
    RabbitMQ(workdir)      one foreground ``rabbitmq-server`` node (MQTT plugin)
                           run as the ``rabbitmq`` user, with its own epmd

Both have: ``name``, ``host``, ``port`` (the MQTT port), ``log_path``,
``start()``, ``stop()``, ``restart()``, ``is_running()``, ``read_log()``.
A broker that cannot start raises ``BrokerStartError`` carrying its log.

MQTT helpers
    publish(broker, topic, payload, qos=1, retain=False)
    publish_many(broker, topic, payloads, qos=1, retain=False, window=...)
    clear_retained(broker, topic)
    drop_session(broker, client_id)
    Subscriber(broker, client_id, topics)      paho-based, records every message
    Proxy(host, port, delay=0)                 TCP proxy: swallows the relay's bytes, cuts,
                                               holds the broker's bytes `delay` seconds
    RawMQTTClient(host, port, client_id, ...)  minimal MQTT 3.1.1 client on a raw
                                               socket: PUBACKs only when told to

Only the standard library and paho-mqtt 1.6 (Debian's python3-paho-mqtt) are
used. Run with /usr/bin/python3.
"""

from __future__ import annotations

import atexit
import collections
import os
import pwd
import secrets
import select
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Union

import paho.mqtt.client as paho

LOOPBACK = "127.0.0.1"
Payload = Union[bytes, str]


class BrokerStartError(RuntimeError):
    """A broker did not come up. The message carries the tail of its logs."""


# --------------------------------------------------------------------------
# process and port utilities
# --------------------------------------------------------------------------

def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free right now on host (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_ports(n: int, host: str = LOOPBACK) -> List[int]:
    """n distinct free ports (all sockets held open while picking)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_accepts(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_port(host: str, port: int, timeout: float, proc: Optional[subprocess.Popen] = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        if port_accepts(host, port):
            return True
        time.sleep(0.05)
    return False


def wait_port_closed(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not port_accepts(host, port, timeout=0.2):
            return True
        time.sleep(0.05)
    return False


def mqtt_connack(host: str, port: int, timeout: float = 5.0) -> Optional[int]:
    """CONNECT with paho (clean session) and return the CONNACK code, None if none came."""
    rc: List[Optional[int]] = [None]
    c = paho.Client(client_id="probe-" + secrets.token_hex(4), clean_session=True,
                    protocol=paho.MQTTv311)
    c.on_connect = lambda _c, _u, _f, code: rc.__setitem__(0, code)
    try:
        c.connect(host, port, keepalive=10)
        deadline = time.monotonic() + timeout
        while rc[0] is None and time.monotonic() < deadline:
            if c.loop(0.1) not in (paho.MQTT_ERR_SUCCESS,):
                break
        if rc[0] == 0:
            c.disconnect()
            c.loop(0.1)
    except (OSError, ValueError):
        return None
    finally:
        try:
            c.socket() and c.socket().close()
        except Exception:
            pass
    return rc[0]


def _proc_children_map() -> dict:
    children = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        # the command name is in parentheses and may contain spaces
        rest = data[data.rfind(b")") + 2:].split()
        children[int(rest[1])].append(int(entry))
    return children


def process_tree(pid: int) -> List[int]:
    """pid and all its descendants (whatever session or group they moved to)."""
    children = _proc_children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    state = data[data.rfind(b")") + 2:].split()[0]
    return state not in (b"Z", b"X")


def pids_listening(port: int) -> List[int]:
    """Pids of processes holding a listening TCP socket on port (any address)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    local, st, inode = parts[1], parts[3], parts[9]
                    if st == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                        inodes.add(f"socket:[{inode}]")
        except OSError:
            pass
    pids = []
    if not inodes:
        return pids
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{entry}/fd"):
                try:
                    if os.readlink(f"/proc/{entry}/fd/{fd}") in inodes:
                        pids.append(int(entry))
                        break
                except OSError:
                    continue
        except OSError:
            continue
    return pids


def _signal_pids(pids: Iterable[int], sig: int) -> None:
    for p in pids:
        try:
            os.kill(p, sig)
        except (ProcessLookupError, PermissionError):
            pass


def stop_process_tree(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20.0,
                      extra_pids: Sequence[int] = ()) -> None:
    """Send sig to proc's process group, wait up to timeout, then SIGKILL the
    whole tree (descendants that left the group included) and reap proc."""
    if proc is None:
        return
    tree = process_tree(proc.pid) if proc.poll() is None else []
    tree = list(dict.fromkeys(tree + list(extra_pids)))
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            _signal_pids([proc.pid], sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    # whatever is left, including children in other sessions (erl_child_setup...)
    deadline = time.monotonic() + 5
    leftovers = [p for p in tree if _alive(p)]
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    while leftovers and time.monotonic() < deadline:
        _signal_pids(leftovers, signal.SIGKILL if time.monotonic() > deadline - 4.5 else signal.SIGTERM)
        time.sleep(0.1)
        leftovers = [p for p in leftovers if _alive(p)]
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


_WATCHDOG = r"""
owner=$1; shift
while kill -0 "$owner" 2>/dev/null; do sleep 1; done
for g in "$@"; do kill -TERM "-$g" 2>/dev/null; done
i=0
while [ $i -lt 30 ]; do
    alive=0
    for g in "$@"; do kill -0 "-$g" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && exit 0
    sleep 0.5; i=$((i + 1))
done
for g in "$@"; do kill -KILL "-$g" 2>/dev/null; done
"""


def start_watchdog(pgids: Sequence[int]) -> subprocess.Popen:
    """A small sh process (own session) that stops the given process groups
    if this Python process dies without stopping them (SIGKILL, crash).
    Kill it (stop_watchdog) when the groups are stopped normally."""
    return subprocess.Popen(["/bin/sh", "-c", _WATCHDOG, "broker-watchdog", str(os.getpid()),
                             *[str(g) for g in pgids]],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def stop_watchdog(w: Optional[subprocess.Popen]) -> None:
    if w is not None and w.poll() is None:
        try:
            os.killpg(w.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        w.wait(timeout=5)


def _tail(path: Path, max_bytes: int = 20000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            return f.read().decode("utf-8", "replace")
    except OSError as e:
        return f"<cannot read {path}: {e}>"


_LIVE: "set[object]" = set()


@atexit.register
def _stop_everything() -> None:   # last resort; fixtures normally stop brokers
    for b in list(_LIVE):
        try:
            if hasattr(b, "close"):
                b.close()
            else:
                b.stop(timeout=5)
        except Exception:
            pass


# --------------------------------------------------------------------------
# Mosquitto
# --------------------------------------------------------------------------

def _binary(name: str, *fallbacks: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for f in fallbacks:
        if os.access(f, os.X_OK):
            return f
    raise BrokerStartError(f"{name} not found (run scripts/install-deps.sh)")


class Mosquitto:
    """A private mosquitto on 127.0.0.1:<free port>; restart() keeps the port."""

    name = "mosquitto"
    # Mosquitto redelivers with the original packet id (asserted in
    # test_broker_facts.py): the relay's broker.packet_ids for it.
    packet_ids = "kept"

    def __init__(self, workdir: Union[str, Path], port: Optional[int] = None, verbose: bool = False,
                 autosave_interval: Optional[int] = None):
        self.dir = Path(workdir)
        self.autosave_interval = autosave_interval   # seconds; None = mosquitto's default
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host = LOOPBACK
        self.port = port or free_port()
        self.verbose = verbose
        self.persistence = False
        self.conf_path = self.dir / "mosquitto.conf"
        self.log_path = self.dir / "mosquitto.log"
        self.stdout_path = self.dir / "mosquitto.stdout"
        self.persistence_dir = self.dir / "persist"
        self.proc: Optional[subprocess.Popen] = None
        self.watchdog: Optional[subprocess.Popen] = None
        self.start_seconds: Optional[float] = None
        self.restart_seconds: Optional[float] = None

    def __repr__(self) -> str:
        return f"<Mosquitto {self.host}:{self.port} running={self.is_running()}>"

    def _write_conf(self) -> None:
        lines = [
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            # stay root when started as root: the private dir is root's
            "user root" if os.geteuid() == 0 else "# not root: no privilege drop",
            # README "Broker requirements": the default 1,000 drops commands
            # beyond it for an offline client ("Outgoing messages are being
            # dropped"); tests queue 20,000, so no limit here (production: a
            # bound above the longest outage times the command rate)
            "max_queued_messages 0",
            "max_queued_bytes 0",
            # the default; the relay commits each read batch before its
            # PUBACKs, so a wider window only batches more per commit
            "max_inflight_messages 20",
            "max_keepalive 65535",
            # sessions of an offline relay expire after this (the default is
            # never); longer than any test's outage, short enough that
            # crashed tests leave nothing behind
            "persistent_client_expiration 1d",
            f"log_dest file {self.log_path}",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
            "connection_messages true",
        ]
        types = ["error", "warning", "notice", "information", "subscribe", "unsubscribe"]
        if self.verbose:
            types.append("debug")
        lines += [f"log_type {t}" for t in types]
        # Production needs persistence true (without it a restart loses every
        # session and its queue); here it is the test's choice, because tests
        # restart the broker both ways (tests/test_session_loss.py needs the
        # loss), and a fresh per-test broker has nothing to keep.
        if self.persistence:
            self.persistence_dir.mkdir(exist_ok=True)
            lines += [
                "persistence true",
                f"persistence_location {self.persistence_dir}/",
                "persistence_file mosquitto.db",
            ]
            if self.autosave_interval is not None:
                lines.append(f"autosave_interval {self.autosave_interval}")
        else:
            lines.append("persistence false")
        self.conf_path.write_text("\n".join(lines) + "\n")

    def start(self, persistence: Optional[bool] = None, timeout: float = 15.0) -> "Mosquitto":
        if self.is_running():
            return self
        if persistence is not None:
            self.persistence = bool(persistence)
        self._write_conf()
        exe = _binary("mosquitto", "/usr/sbin/mosquitto")
        t0 = time.monotonic()
        out = open(self.stdout_path, "ab")
        try:
            self.proc = subprocess.Popen([exe, "-c", str(self.conf_path)], stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT, cwd=self.dir,
                                         start_new_session=True)
        finally:
            out.close()
        _LIVE.add(self)
        stop_watchdog(self.watchdog)
        self.watchdog = start_watchdog([self.proc.pid])
        if not wait_port(self.host, self.port, timeout, self.proc):
            status = self.proc.poll()
            self.stop(timeout=2)
            raise BrokerStartError(
                f"mosquitto did not listen on {self.host}:{self.port} within {timeout}s "
                f"(exit status {status})\n--- {self.stdout_path}\n{_tail(self.stdout_path)}"
                f"\n--- {self.log_path}\n{_tail(self.log_path)}")
        self.start_seconds = time.monotonic() - t0
        return self

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
        """SIGTERM (mosquitto then saves its persistence db) or sig=SIGKILL for a crash."""
        if self.proc is not None:
            stop_process_tree(self.proc, sig=sig, timeout=timeout)
            wait_port_closed(self.host, self.port, 5)
        stop_watchdog(self.watchdog)
        self.watchdog = None
        _LIVE.discard(self)

    def kill(self) -> None:
        self.stop(sig=signal.SIGKILL)

    def restart(self, persistence: Optional[bool] = None, timeout: float = 15.0) -> "Mosquitto":
        """Clean stop (state saved when persistence is on) and start on the same port."""
        t0 = time.monotonic()
        self.stop()
        self.start(persistence=persistence, timeout=timeout)
        self.restart_seconds = time.monotonic() - t0
        return self

    def read_log(self) -> str:
        return _tail(self.stdout_path) + _tail(self.log_path)


# --------------------------------------------------------------------------
# RabbitMQ
# --------------------------------------------------------------------------

RABBITMQ_BIN = "/usr/lib/rabbitmq/bin"


RUNDIR_PREFIX = "cmdrelay-rabbitmq-"


def _remove_stale_rundirs(base: str) -> None:
    """Remove run dirs left by test runs that were killed (owner pid gone)."""
    try:
        entries = os.listdir(base)
    except OSError:
        return
    for e in entries:
        if not e.startswith(RUNDIR_PREFIX):
            continue
        d = os.path.join(base, e)
        try:
            owner = int(Path(d, "owner.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            if time.time() - os.path.getmtime(d) < 3600:
                continue            # being set up right now, perhaps
            owner = None
        if owner is not None and _alive(owner):
            continue
        beam_alive = any(f"{d}/" in _cmdline(pid) for pid in pids_of_user("rabbitmq"))
        if not beam_alive:
            shutil.rmtree(d, ignore_errors=True)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def pids_of_user(user: str) -> List[int]:
    try:
        uid = pwd.getpwnam(user).pw_uid
    except KeyError:
        return []
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    out.append(int(entry))
            except OSError:
                pass
    return out


class RabbitMQ:
    """One private RabbitMQ node with the MQTT plugin.

    The node runs in the foreground (``/usr/lib/rabbitmq/bin/rabbitmq-server``)
    as the ``rabbitmq`` user when we are root, with its own mnesia, log,
    config, enabled-plugins file, HOME (Erlang cookie), node name and ports:
    AMQP, Erlang distribution, epmd and MQTT, all on 127.0.0.1. Its epmd is a
    child we start ourselves on the private epmd port, so that it is always
    ours to stop and never collides with a system epmd on 4369.

    The node's files live in a run dir of their own, /tmp/cmdrelay-rabbitmq-*
    (owned by rabbitmq, 0700), because the rabbitmq user cannot rely on
    getting through pytest's 0700 /tmp/pytest-of-root: every pytest session
    that starts resets its mode. `workdir` (a pytest tmp dir) gets a symlink
    ``run`` to it while it exists; close() copies the logs into workdir and
    removes the run dir.
    """

    packet_ids = "renumbered"   # RabbitMQ 3.x numbers each delivery anew

    name = "rabbitmq"

    def __init__(self, workdir: Union[str, Path], rundir_base: Optional[str] = None,
                 cluster_with: Optional["RabbitMQ"] = None, durable_queue_type: str = "classic"):
        """cluster_with: an earlier node whose epmd and Erlang cookie this one
        shares, so that join_cluster() can make them one cluster."""
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        base = rundir_base or tempfile.gettempdir()
        _remove_stale_rundirs(base)
        self.dir = Path(tempfile.mkdtemp(prefix=RUNDIR_PREFIX, dir=base))
        (self.dir / "owner.pid").write_text(f"{os.getpid()}\n")
        try:
            (self.workdir / "run").symlink_to(self.dir)
        except OSError:
            pass
        self.host = LOOPBACK
        self.port, self.amqp_port, self.dist_port, self.epmd_port = free_ports(4)
        self.durable_queue_type = durable_queue_type
        self.cluster_with = cluster_with
        if cluster_with is not None:
            self.epmd_port = cluster_with.epmd_port     # nodes find each other through one epmd
        self.nodename = f"cmdrelay-test-{secrets.token_hex(3)}@localhost"
        self.home = self.dir / "home"
        self.mnesia_base = self.dir / "mnesia"
        self.log_base = self.dir / "log"
        self.conf_path = self.dir / "rabbitmq.conf"
        self.plugins_file = self.dir / "enabled_plugins"
        self.stdout_path = self.dir / "rabbitmq.stdout"
        self.epmd_log_path = self.dir / "epmd.log"
        self.log_path = self.log_base / "rabbit.log"
        self.proc: Optional[subprocess.Popen] = None
        self.epmd: Optional[subprocess.Popen] = None
        self.watchdog: Optional[subprocess.Popen] = None
        self.start_seconds: Optional[float] = None     # last start
        self.first_start_seconds: Optional[float] = None
        self.stop_seconds: Optional[float] = None       # last stop
        self.restart_seconds: Optional[float] = None    # last restart (stop + start)
        self._prepared = False

    def __repr__(self) -> str:
        return f"<RabbitMQ {self.nodename} mqtt={self.host}:{self.port} running={self.is_running()}>"

    # ---- environment -------------------------------------------------------

    def _as_rabbitmq(self) -> List[str]:
        if os.geteuid() != 0:
            return []
        setpriv = _binary("setpriv", "/usr/bin/setpriv")
        return [setpriv, "--reuid=rabbitmq", "--regid=rabbitmq", "--init-groups", "--"]

    @property
    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update({
            "HOME": str(self.home),
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": self.host,
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": self.host,
            "RABBITMQ_MNESIA_BASE": str(self.mnesia_base),
            "RABBITMQ_LOG_BASE": str(self.log_base),
            "RABBITMQ_LOGS": str(self.log_path),
            "RABBITMQ_CONFIG_FILE": str(self.conf_path),
            "RABBITMQ_CONFIG_FILES": str(self.dir / "conf.d" / "*.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.dir / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.plugins_file),
            "RABBITMQ_PID_FILE": str(self.dir / "rabbitmq.pid"),
            # the distribution listener on loopback only
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        })
        return env

    def _prepare(self) -> None:
        if self._prepared:
            return
        for d in (self.home, self.mnesia_base, self.log_base, self.dir / "conf.d"):
            d.mkdir(parents=True, exist_ok=True)
        (self.dir / "rabbitmq-env.conf").write_text("# private, intentionally empty\n")
        if self.cluster_with is not None:
            cookie = self.home / ".erlang.cookie"   # cluster members must share it
            shutil.copy2(self.cluster_with.home / ".erlang.cookie", cookie)
            os.chmod(cookie, 0o400)
        self.conf_path.write_text("\n".join([
            f"listeners.tcp.1 = {self.host}:{self.amqp_port}",
            f"mqtt.listeners.tcp.1 = {self.host}:{self.port}",
            "mqtt.allow_anonymous = true",
            "mqtt.default_user = guest",
            "mqtt.default_pass = guest",
            "mqtt.vhost = /",
            "mqtt.exchange = amq.topic",
            # README "Broker requirements", the defaults written out: a
            # session (durable queue) lives 24 h after its client left, then
            # its queued commands are gone (3.13: max_session_expiry_interval_seconds)
            "mqtt.subscription_ttl = 86400000",
            # at most 10 deliveries unacknowledged: the relay's batch per commit
            "mqtt.prefetch = 10",
            # one node: a classic queue is as safe as a quorum one; a cluster
            # needs quorum, or the session dies with the node it lives on
            f"mqtt.durable_queue_type = {self.durable_queue_type}",
            "default_user = guest",
            "default_pass = guest",
            "loopback_users = none",
            "log.file.level = info",
            "log.console = false",
            "disk_free_limit.absolute = 50MB",
        ]) + "\n")
        if os.geteuid() == 0:
            rmq = pwd.getpwnam("rabbitmq")
            for root, dirs, files in os.walk(self.dir):
                os.chown(root, rmq.pw_uid, rmq.pw_gid)
                for n in files:
                    os.chown(os.path.join(root, n), rmq.pw_uid, rmq.pw_gid)
        if not os.access(f"{RABBITMQ_BIN}/rabbitmq-server", os.X_OK):
            raise BrokerStartError(f"{RABBITMQ_BIN}/rabbitmq-server missing (run scripts/install-deps.sh)")
        r = subprocess.run(self._as_rabbitmq() + [f"{RABBITMQ_BIN}/rabbitmq-plugins", "enable",
                                                  "--offline", "rabbitmq_mqtt"],
                           env=self.env, cwd=self.dir, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
        if r.returncode != 0 or "rabbitmq_mqtt" not in self.plugins_file.read_text():
            raise BrokerStartError("rabbitmq-plugins enable --offline rabbitmq_mqtt failed "
                                   f"(status {r.returncode}):\n{r.stdout.decode(errors='replace')}")
        self._prepared = True

    # ---- life cycle ----------------------------------------------------------

    def start(self, timeout: float = 120.0) -> "RabbitMQ":
        if self.is_running():
            return self
        self._prepare()
        t0 = time.monotonic()
        _LIVE.add(self)
        if self.cluster_with is None and (self.epmd is None or self.epmd.poll() is not None):
            with open(self.epmd_log_path, "ab") as out:
                self.epmd = subprocess.Popen(
                    self._as_rabbitmq() + [_binary("epmd", "/usr/bin/epmd"), "-port", str(self.epmd_port),
                                           "-address", self.host],
                    env=self.env, cwd=self.dir, stdin=subprocess.DEVNULL, stdout=out,
                    stderr=subprocess.STDOUT, start_new_session=True)
            if not wait_port(self.host, self.epmd_port, 10, self.epmd):
                self.stop(timeout=2)
                raise BrokerStartError(f"epmd did not listen on {self.epmd_port}:\n{_tail(self.epmd_log_path)}")
        with open(self.stdout_path, "ab") as out:
            out.write(f"\n===== start {time.strftime('%H:%M:%S')} =====\n".encode())
            out.flush()
            self.proc = subprocess.Popen(self._as_rabbitmq() + [f"{RABBITMQ_BIN}/rabbitmq-server"],
                                         env=self.env, cwd=self.dir, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        stop_watchdog(self.watchdog)
        self.watchdog = start_watchdog([self.proc.pid] + ([self.epmd.pid] if self.epmd else []))
        deadline = t0 + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if port_accepts(self.host, self.port):
                last = mqtt_connack(self.host, self.port, timeout=5)
                if last == 0:
                    self.start_seconds = time.monotonic() - t0
                    if self.first_start_seconds is None:
                        self.first_start_seconds = self.start_seconds
                    return self
            time.sleep(0.2)
        status = self.proc.poll()
        log = self.read_log()
        self.stop(timeout=10)
        why = (f"exited with status {status} before accepting" if status is not None
               else f"did not accept within {timeout:.0f}s")
        raise BrokerStartError(
            f"RabbitMQ node {self.nodename} {why} an MQTT CONNECT on {self.host}:{self.port} "
            f"(last CONNACK code {last})\n{log}")

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ensure_running(self) -> "RabbitMQ":
        if not (self.is_running() and port_accepts(self.host, self.port)):
            self.stop(timeout=10)
            self.start()
        return self

    def stop(self, timeout: float = 60.0, sig: int = signal.SIGTERM, keep_epmd: bool = False) -> None:
        """SIGTERM: the node shuts down cleanly (durable queues and messages kept).
        sig=SIGKILL simulates a crash. epmd is stopped too unless keep_epmd."""
        t0 = time.monotonic()
        if self.proc is not None:
            stop_process_tree(self.proc, sig=sig, timeout=timeout)
            self.proc = None
        if not keep_epmd:
            if self.epmd is not None:
                stop_process_tree(self.epmd, sig=signal.SIGTERM, timeout=5)
                self.epmd = None
        # anything of this node still listening (e.g. an epmd the VM spawned
        # itself had ours died): only processes provably ours, by HOME
        ports = (self.port, self.amqp_port, self.dist_port) + (() if keep_epmd else (self.epmd_port,))
        for p in ports:
            _signal_pids([pid for pid in pids_listening(p) if self._owns(pid)], signal.SIGKILL)
        stop_watchdog(self.watchdog)
        self.watchdog = None
        if keep_epmd and self.epmd is not None and self.epmd.poll() is None:
            self.watchdog = start_watchdog([self.epmd.pid])
        self.stop_seconds = time.monotonic() - t0

    def _owns(self, pid: int) -> bool:
        if pid == os.getpid():
            return False
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            return False
        return f"HOME={self.home}".encode() in env

    def kill(self) -> None:
        """Crash the node (SIGKILL); start() or restart() brings it back."""
        self.stop(sig=signal.SIGKILL, keep_epmd=True)

    def close(self) -> None:
        """Stop the node and epmd, keep the logs in workdir, remove the run dir."""
        self.stop()
        _LIVE.discard(self)
        if not self.dir.exists():
            return
        saved = self.workdir / "logs"
        saved.mkdir(exist_ok=True)
        for f in (self.stdout_path, self.epmd_log_path, self.conf_path):
            if f.exists():
                shutil.copy2(f, saved / f.name)
        if self.log_base.exists():
            shutil.copytree(self.log_base, saved / "log", dirs_exist_ok=True)
        try:
            (self.workdir / "run").unlink()
        except OSError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)
        self.log_path = saved / "log" / self.log_path.name
        self.stdout_path = saved / self.stdout_path.name
        self.epmd_log_path = saved / self.epmd_log_path.name

    def restart(self, timeout: float = 120.0) -> "RabbitMQ":
        """Clean stop and start of the same node: same data dir, name and ports."""
        t0 = time.monotonic()
        self.stop(keep_epmd=True)
        self.start(timeout=timeout)
        self.restart_seconds = time.monotonic() - t0
        return self

    def join_cluster(self, first: "RabbitMQ") -> None:
        """Makes this running node a member of first's cluster."""
        for args in (("stop_app",), ("join_cluster", first.nodename), ("start_app",)):
            r = self.rabbitmqctl(*args, timeout=120)
            if r.returncode != 0:
                raise BrokerStartError(f"rabbitmqctl {' '.join(args)} on {self.nodename}: {r.stdout}{r.stderr}")
        deadline = time.monotonic() + 60
        while mqtt_connack(self.host, self.port, timeout=5) != 0:
            if time.monotonic() > deadline:
                raise BrokerStartError(f"{self.nodename} takes no MQTT CONNECT after join_cluster")
            time.sleep(0.2)

    def rabbitmqctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(self._as_rabbitmq() + [f"{RABBITMQ_BIN}/rabbitmqctl", "-n", self.nodename, *args],
                              env=self.env, cwd=self.dir, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=timeout)

    def read_log(self) -> str:
        return (f"--- {self.stdout_path}\n{_tail(self.stdout_path, 8000)}\n"
                f"--- {self.log_path}\n{_tail(self.log_path)}\n"
                f"--- {self.epmd_log_path}\n{_tail(self.epmd_log_path, 2000)}")


Broker = Union[Mosquitto, RabbitMQ]


# --------------------------------------------------------------------------
# raw MQTT 3.1.1 client
# --------------------------------------------------------------------------

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14


@dataclass
class Message:
    """One PUBLISH as received (by RawMQTTClient or Subscriber)."""
    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    mid: Optional[int]
    received: float = field(default_factory=time.monotonic)

    @property
    def text(self) -> str:
        return self.payload.decode("utf-8", "replace")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n % 128, n // 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s: Union[str, bytes]) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


class MQTTProtocolError(RuntimeError):
    pass


def take_str(body: bytes, pos: int):
    """An MQTT string at pos of body: (its bytes, the position after it)."""
    n = struct.unpack_from("!H", body, pos)[0]
    return body[pos + 2:pos + 2 + n], pos + 2 + n


def mqtt_packet(ptype: int, flags: int, body: bytes = b"") -> bytes:
    """One MQTT packet: fixed header, remaining length, body."""
    return bytes([(ptype << 4) | flags]) + _varint(len(body)) + body


def parse_packet(buf: bytearray):
    """Takes one whole packet off the front of buf: (type, flags, body), or
    None while it is incomplete. Raises MQTTProtocolError on a remaining
    length over four bytes."""
    if len(buf) < 2:
        return None
    mult, length, i = 1, 0, 1
    while True:
        if i >= len(buf):
            return None
        b = buf[i]
        length += (b & 0x7F) * mult
        mult *= 128
        i += 1
        if not b & 0x80:
            break
        if i > 4:
            raise MQTTProtocolError("bad remaining length")
    if len(buf) < i + length:
        return None
    first = buf[0]
    body = bytes(buf[i:i + length])
    del buf[:i + length]
    return first >> 4, first & 0x0F, body


def _bytes(p: Payload) -> bytes:
    return p.encode() if isinstance(p, str) else bytes(p)


def encode_publish(topic: str, payload: Payload, qos: int = 1, retain: bool = False,
                   dup: bool = False, mid: Optional[int] = None) -> bytes:
    body = _str(topic) + (struct.pack("!H", mid) if qos else b"") + _bytes(payload)
    return mqtt_packet(PUBLISH, (int(dup) << 3) | (qos << 1) | int(retain), body)


class RawMQTTClient:
    """A minimal MQTT 3.1.1 client on a plain socket, for tests that must
    control exactly which packets are sent: nothing is acknowledged unless
    auto_ack=True or puback() is called, nothing is resent, no keepalive pings
    are sent unless ping() is called.

        c = RawMQTTClient(host, port, "dev-1", clean_session=False)
        present = c.connect()
        c.subscribe("/a/b", qos=1)
        m = c.recv_publish(timeout=5)   # Message or None
        c.puback(m.mid)
        c.abort()                       # die without DISCONNECT (TCP RST)
    """

    def __init__(self, host: str, port: int, client_id: str, clean_session: bool = False,
                 keepalive: int = 60, username: Optional[str] = None, password: Optional[str] = None,
                 auto_ack: bool = False, timeout: float = 10.0):
        self.host, self.port = host, port
        self.client_id = client_id
        self.clean_session = clean_session
        self.keepalive = keepalive
        self.username, self.password = username, password
        self.auto_ack = auto_ack
        self.timeout = timeout
        self.sock: Optional[socket.socket] = None
        self._buf = bytearray()
        self._next_mid = 0
        self.pending: "collections.deque[Message]" = collections.deque()
        self.acked: "set[int]" = set()
        self.subacks: dict = {}
        self.unsubacks: "set[int]" = set()
        self.session_present: Optional[bool] = None

    @classmethod
    def for_broker(cls, broker: Broker, client_id: str, **kw) -> "RawMQTTClient":
        return cls(broker.host, broker.port, client_id, **kw)

    # ---- transport -------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        if self.sock is None:
            raise MQTTProtocolError("not connected")
        self.sock.sendall(data)

    def _fill(self, deadline: float) -> bool:
        """Read more bytes; False on timeout (a past deadline still polls
        once). Raises ConnectionError on EOF."""
        remaining = max(0.0, deadline - time.monotonic())
        r, _, _ = select.select([self.sock], [], [], remaining)
        if not r:
            return False
        data = self.sock.recv(1 << 16)
        if not data:
            raise ConnectionError("broker closed the connection")
        self._buf += data
        return True

    def read_packet(self, timeout: Optional[float] = None):
        """(type, flags, body) of the next packet, None on timeout."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            pkt = parse_packet(self._buf)
            if pkt is not None:
                return pkt
            if not self._fill(deadline):
                return None

    def _dispatch(self, ptype: int, flags: int, body: bytes) -> None:
        if ptype == PUBLISH:
            qos = (flags >> 1) & 3
            tlen = struct.unpack("!H", body[:2])[0]
            topic = body[2:2 + tlen].decode("utf-8", "replace")
            pos = 2 + tlen
            mid = None
            if qos:
                mid = struct.unpack("!H", body[pos:pos + 2])[0]
                pos += 2
            if qos == 2:
                raise MQTTProtocolError("QoS 2 not supported by RawMQTTClient")
            m = Message(topic, body[pos:], qos, bool(flags & 1), bool(flags & 8), mid)
            self.pending.append(m)
        elif ptype == PUBACK:
            self.acked.add(struct.unpack("!H", body[:2])[0])
        elif ptype == SUBACK:
            self.subacks[struct.unpack("!H", body[:2])[0]] = list(body[2:])
        elif ptype == UNSUBACK:
            self.unsubacks.add(struct.unpack("!H", body[:2])[0])
        elif ptype == PINGRESP:
            pass
        else:
            raise MQTTProtocolError(f"unexpected packet type {ptype}")

    def _pump(self, until, timeout: Optional[float]) -> bool:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not until():
            pkt = self.read_packet(max(0.0, deadline - time.monotonic()))
            if pkt is None:
                return until()
            self._dispatch(*pkt)
        return True

    def new_mid(self) -> int:
        self._next_mid = self._next_mid % 65535 + 1
        return self._next_mid

    # ---- MQTT --------------------------------------------------------------------

    def connect(self, timeout: Optional[float] = None) -> bool:
        """Open TCP, CONNECT, wait for CONNACK; returns session present."""
        self.close()
        self.sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = bytearray()
        self.pending.clear()
        flags = 0x02 if self.clean_session else 0
        payload = _str(self.client_id)
        if self.username is not None:
            flags |= 0x80
            payload += _str(self.username)
        if self.password is not None:
            flags |= 0x40
            payload += _str(self.password)
        var = _str("MQTT") + bytes([4, flags]) + struct.pack("!H", self.keepalive)
        body = var + payload
        self._send(mqtt_packet(CONNECT, 0, body))
        pkt = self.read_packet(timeout)
        if pkt is None:
            raise MQTTProtocolError("no CONNACK")
        ptype, _, body = pkt
        if ptype != CONNACK:
            raise MQTTProtocolError(f"expected CONNACK, got packet type {ptype}")
        if body[1] != 0:
            raise MQTTProtocolError(f"CONNACK return code {body[1]}")
        self.session_present = bool(body[0] & 1)
        return self.session_present

    def subscribe(self, topics: Union[str, Sequence[str]], qos: int = 1,
                  timeout: Optional[float] = None) -> List[int]:
        """SUBSCRIBE and wait for SUBACK (PUBLISHes arriving meanwhile are kept
        in self.pending, in order). Returns the granted QoS list."""
        if isinstance(topics, str):
            topics = [topics]
        mid = self.new_mid()
        body = struct.pack("!H", mid) + b"".join(_str(t) + bytes([qos]) for t in topics)
        self._send(mqtt_packet(SUBSCRIBE, 2, body))
        if not self._pump(lambda: mid in self.subacks, timeout):
            raise MQTTProtocolError("no SUBACK")
        granted = self.subacks.pop(mid)
        if any(g == 0x80 for g in granted):
            raise MQTTProtocolError(f"subscription refused: {granted}")
        return granted

    def unsubscribe(self, topics: Union[str, Sequence[str]], timeout: Optional[float] = None) -> None:
        if isinstance(topics, str):
            topics = [topics]
        mid = self.new_mid()
        body = struct.pack("!H", mid) + b"".join(_str(t) for t in topics)
        self._send(mqtt_packet(UNSUBSCRIBE, 2, body))
        if not self._pump(lambda: mid in self.unsubacks, timeout):
            raise MQTTProtocolError("no UNSUBACK")
        self.unsubacks.discard(mid)

    def recv_publish(self, timeout: Optional[float] = None) -> Optional[Message]:
        """Next received PUBLISH (not acknowledged unless auto_ack), None on timeout."""
        if not self.pending:
            self._pump(lambda: bool(self.pending), timeout)
        if not self.pending:
            return None
        m = self.pending.popleft()
        if self.auto_ack and m.qos == 1:
            self.puback(m.mid)
        return m

    def recv_all(self, quiet: float = 0.5, timeout: float = 10.0) -> List[Message]:
        """Every PUBLISH until none arrives for `quiet` seconds (or timeout)."""
        out = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = self.recv_publish(timeout=min(quiet, max(0.0, deadline - time.monotonic())))
            if m is None:
                break
            out.append(m)
        return out

    def puback(self, mid: int) -> None:
        self._send(bytes([PUBACK << 4, 2]) + struct.pack("!H", mid))

    def publish(self, topic: str, payload: Payload, qos: int = 1, retain: bool = False,
                dup: bool = False, mid: Optional[int] = None, wait: bool = True,
                timeout: Optional[float] = None) -> Optional[int]:
        """PUBLISH; with qos 1 and wait, block until its PUBACK. Returns the mid."""
        if qos not in (0, 1):
            raise ValueError("RawMQTTClient publishes QoS 0 or 1 only")
        if qos and mid is None:
            mid = self.new_mid()
        self.acked.discard(mid)
        self._send(encode_publish(topic, payload, qos, retain, dup, mid))
        if qos and wait:
            if not self._pump(lambda: mid in self.acked, timeout):
                raise MQTTProtocolError(f"no PUBACK for mid {mid}")
            self.acked.discard(mid)
        return mid

    def wait_acked(self, mids: Iterable[int], timeout: Optional[float] = None) -> bool:
        """Reads until each of mids (publish(..., wait=False)) has its PUBACK,
        which stays in .acked; False on timeout."""
        want = set(mids)
        return self._pump(lambda: want <= self.acked, timeout)

    def publish_many(self, topic: str, payloads: Iterable[Payload], qos: int = 1,
                     retain: bool = False, window: int = 500, timeout: float = 120.0) -> int:
        """Pipelined publishing with at most `window` unacknowledged QoS 1
        messages; returns when every PUBACK is in. Returns the count."""
        window = max(1, min(window, 32000))
        inflight: "set[int]" = set()
        deadline = time.monotonic() + timeout
        it = iter(payloads)
        count = 0
        exhausted = False
        while True:
            batch = []
            while not exhausted and (qos == 0 or len(inflight) < window) and len(batch) < 256:
                try:
                    p = next(it)
                except StopIteration:
                    exhausted = True
                    break
                mid = None
                if qos:
                    mid = self.new_mid()
                    while mid in inflight:
                        mid = self.new_mid()
                    inflight.add(mid)
                batch.append(encode_publish(topic, p, qos, retain, False, mid))
            if batch:
                self._send(b"".join(batch))
                count += len(batch)
            if exhausted and not inflight:
                return count
            # collect acknowledgements: block only when the window is full or input is done
            block = exhausted or len(inflight) >= window
            while True:
                pkt = self.read_packet(timeout=(max(0.0, deadline - time.monotonic()) if block else 0.0))
                if pkt is None:
                    if block and time.monotonic() >= deadline:
                        raise MQTTProtocolError(f"publish_many: {len(inflight)} PUBACKs missing after {timeout}s")
                    break
                ptype, flags, body = pkt
                if ptype == PUBACK:
                    inflight.discard(struct.unpack("!H", body[:2])[0])
                else:
                    self._dispatch(ptype, flags, body)
                block = False

    def ping(self, timeout: Optional[float] = None) -> None:
        self._send(bytes([PINGREQ << 4, 0]))
        got = []

        def until():
            return bool(got)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not got:
            pkt = self.read_packet(max(0.0, deadline - time.monotonic()))
            if pkt is None:
                raise MQTTProtocolError("no PINGRESP")
            if pkt[0] == PINGRESP:
                got.append(1)
            else:
                self._dispatch(*pkt)

    def disconnect(self) -> None:
        """Clean DISCONNECT (a persistent session stays at the broker)."""
        if self.sock is not None:
            try:
                self._send(bytes([DISCONNECT << 4, 0]))
            except OSError:
                pass
        self.close()

    def abort(self) -> None:
        """Die like a crashed process: no DISCONNECT, TCP reset."""
        if self.sock is not None:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        self.close()

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None

    def __enter__(self) -> "RawMQTTClient":
        return self

    def __exit__(self, *exc) -> None:
        self.disconnect()


# --------------------------------------------------------------------------
# helpers for tests
# --------------------------------------------------------------------------

def _client_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(5)}"


def publish(broker: Broker, topic: str, payload: Payload, qos: int = 1, retain: bool = False,
            timeout: float = 10.0) -> None:
    """Publish one message from a fresh clean-session client; returns after
    the PUBACK (qos 1) or after the packet was sent (qos 0)."""
    c = RawMQTTClient(broker.host, broker.port, _client_id("pub"), clean_session=True, timeout=timeout)
    c.connect()
    try:
        c.publish(topic, payload, qos=qos, retain=retain, timeout=timeout)
        if qos == 0:
            c.ping(timeout)   # the broker has read our PUBLISH once it answers
    finally:
        c.disconnect()


def publish_many(broker: Broker, topic: str, payloads: Iterable[Payload], qos: int = 1,
                 retain: bool = False, window: int = 500, timeout: float = 120.0) -> int:
    """Publish many messages quickly with at most `window` unacknowledged and
    return when all PUBACKs are in (QoS 0: when the broker answered a ping)."""
    c = RawMQTTClient(broker.host, broker.port, _client_id("bulk"), clean_session=True, timeout=timeout)
    c.connect()
    try:
        n = c.publish_many(topic, payloads, qos=qos, retain=retain, window=window, timeout=timeout)
        if qos == 0:
            c.ping(timeout)
        return n
    finally:
        c.disconnect()


class StreamPublisher(threading.Thread):
    """Publishes payloads to topic in chunks of `chunk` (QoS 1, each chunk
    confirmed by the broker), pausing `pause` seconds between chunks; what
    went wrong is in .errors. Started at once."""

    def __init__(self, broker: Broker, topic: str, payloads: Sequence[Payload], chunk: int,
                 pause: float):
        super().__init__(daemon=True)
        self.broker, self.topic, self.payloads = broker, topic, payloads
        self.chunk, self.pause = chunk, pause
        self.errors: List[Exception] = []
        self.start()

    def run(self) -> None:
        try:
            for start in range(0, len(self.payloads), self.chunk):
                publish_many(self.broker, self.topic, self.payloads[start:start + self.chunk], qos=1)
                time.sleep(self.pause)
        except Exception as e:          # reported by the test's thread
            self.errors.append(e)


def clear_retained(broker: Broker, topic: str) -> None:
    """Delete the topic's retained message (empty retained publish)."""
    publish(broker, topic, b"", qos=1, retain=True)


def drop_session(broker: Broker, client_id: str, timeout: float = 10.0) -> None:
    """Make the broker forget client_id's durable session."""
    c = RawMQTTClient(broker.host, broker.port, client_id, clean_session=True, timeout=timeout)
    c.connect()
    c.disconnect()


class Subscriber:
    """A paho client with a persistent session (clean_session=False by
    default) that records every received message in `messages`
    (topic, payload, mid, qos, retain, dup). paho PUBACKs each QoS 1 message
    as it arrives. No automatic reconnect: connect() again yourself.

        with Subscriber(broker, f"sub-{uid}", [topic]) as s:
            present = s.connect()          # subscribes to the topics
            s.wait_for(1)
            s.disconnect()                 # clean DISCONNECT, session kept
            present = s.connect(subscribe=False)
    """

    def __init__(self, broker: Broker, client_id: str, topics: Union[str, Sequence[str]] = (),
                 qos: int = 1, clean_session: bool = False, keepalive: int = 60):
        self.broker = broker
        self.client_id = client_id
        self.topics = [topics] if isinstance(topics, str) else list(topics)
        self.qos = qos
        self.clean_session = clean_session
        self.keepalive = keepalive
        self.messages: List[Message] = []
        self.session_present: Optional[bool] = None
        self._lock = threading.Condition()
        self._client: Optional[paho.Client] = None
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._connack: Optional[int] = None
        self._subacks: dict = {}
        self.connected = False

    # paho callbacks (loop thread)
    def _on_connect(self, client, userdata, flags, rc):
        with self._lock:
            self._connack = rc
            self.session_present = bool(flags.get("session present"))
            self.connected = rc == 0
            self._lock.notify_all()

    def _on_message(self, client, userdata, msg):
        m = Message(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain), bool(msg.dup), msg.mid)
        with self._lock:
            self.messages.append(m)
            self._lock.notify_all()

    def _on_subscribe(self, client, userdata, mid, granted):
        with self._lock:
            self._subacks[mid] = granted
            self._lock.notify_all()

    def _on_disconnect(self, client, userdata, rc):
        with self._lock:
            self.connected = False
            self._lock.notify_all()

    def _loop(self, client: paho.Client) -> None:
        while not self._stop.is_set():
            rc = client.loop(timeout=0.05)
            if rc != paho.MQTT_ERR_SUCCESS:
                with self._lock:
                    self.connected = False
                    self._lock.notify_all()
                return

    def connect(self, subscribe: bool = True, timeout: float = 10.0) -> bool:
        """Connect (and SUBSCRIBE to self.topics if subscribe). Returns session present."""
        self.close()
        c = paho.Client(client_id=self.client_id, clean_session=self.clean_session,
                        protocol=paho.MQTTv311)
        c.max_inflight_messages_set(0)
        c.max_queued_messages_set(0)
        c.on_connect = self._on_connect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        c.on_disconnect = self._on_disconnect
        self._client = c
        self._connack = None
        self._stop.clear()
        c.connect(self.broker.host, self.broker.port, keepalive=self.keepalive)
        self._thread = threading.Thread(target=self._loop, args=(c,), daemon=True,
                                        name=f"sub-{self.client_id}")
        self._thread.start()
        with self._lock:
            if not self._lock.wait_for(lambda: self._connack is not None, timeout):
                raise TimeoutError(f"{self.client_id}: no CONNACK within {timeout}s")
        if self._connack != 0:
            raise ConnectionError(f"{self.client_id}: CONNACK {self._connack}")
        if subscribe and self.topics:
            self.subscribe(self.topics, timeout=timeout)
        return bool(self.session_present)

    def subscribe(self, topics: Union[None, str, Sequence[str]] = None, timeout: float = 10.0) -> list:
        topics = self.topics if topics is None else ([topics] if isinstance(topics, str) else list(topics))
        rc, mid = self._client.subscribe([(t, self.qos) for t in topics])
        if rc != paho.MQTT_ERR_SUCCESS:
            raise ConnectionError(f"subscribe failed: {rc}")
        with self._lock:
            if not self._lock.wait_for(lambda: mid in self._subacks, timeout):
                raise TimeoutError(f"{self.client_id}: no SUBACK within {timeout}s")
            granted = self._subacks.pop(mid)
        if any(g == 0x80 for g in granted):
            raise ConnectionError(f"subscription refused: {granted}")
        return list(granted)

    def wait_for(self, n: int, timeout: float = 10.0) -> List[Message]:
        """Wait until at least n messages were recorded; returns a copy of all
        of them (raises TimeoutError with what came, if fewer)."""
        with self._lock:
            if not self._lock.wait_for(lambda: len(self.messages) >= n, timeout):
                raise TimeoutError(f"{self.client_id}: {len(self.messages)} of {n} messages "
                                   f"after {timeout}s: {self.messages!r}")
            return list(self.messages)

    def settle(self, quiet: float = 0.5, timeout: float = 10.0) -> List[Message]:
        """Wait until no new message has arrived for `quiet` seconds; returns all."""
        deadline = time.monotonic() + timeout
        with self._lock:
            seen = len(self.messages)
            while time.monotonic() < deadline:
                self._lock.wait(timeout=quiet)
                if len(self.messages) == seen:
                    break
                seen = len(self.messages)
            return list(self.messages)

    def clear(self) -> None:
        with self._lock:
            self.messages.clear()

    def disconnect(self) -> None:
        """Clean DISCONNECT; a persistent session stays at the broker."""
        if self._client is not None and self.connected:
            try:
                self._client.disconnect()
            except Exception:
                pass
            if self._thread is not None:
                self._thread.join(timeout=5)
        self.close()

    def close(self) -> None:
        """Stop the loop and drop the socket (no DISCONNECT if still open)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._thread = None
        if self._client is not None:
            try:
                sock = self._client.socket()
                if sock:
                    sock.close()
            except Exception:
                pass
        self._client = None
        self.connected = False

    def __enter__(self) -> "Subscriber":
        return self

    def __exit__(self, *exc) -> None:
        self.disconnect()


# --------------------------------------------------------------------------
# a TCP proxy between the relay and a broker (faults, late answers)
# --------------------------------------------------------------------------

class Proxy(threading.Thread):
    """A TCP proxy between the relay and the broker that can swallow what
    the relay sends (its PUBACKs), cut the connection, and hold what the
    broker sends for `delay` seconds, in order (SUBACKs a round trip late)."""

    def __init__(self, upstream_host, upstream_port, delay: float = 0.0):
        super().__init__(daemon=True)
        self.host = "127.0.0.1"
        self.port = free_port()
        self.up = (upstream_host, upstream_port)
        self.delay = delay
        self.swallow = threading.Event()
        self.swallowed = 0
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind((self.host, self.port))
        self.lsock.listen(8)
        self.pairs = []
        self.closing = False

    def run(self):
        while not self.closing:
            try:
                a, _ = self.lsock.accept()
            except OSError:
                return
            try:
                b = socket.create_connection(self.up, timeout=5)
            except OSError:
                a.close()
                continue
            self.pairs.append((a, b))
            threading.Thread(target=self._pump, args=(a, b, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(b, a, False), daemon=True).start()

    def _pump(self, src, dst, from_relay):
        late = None
        if not from_relay and self.delay > 0:
            late = collections.deque()
            ready = threading.Condition()
            threading.Thread(target=self._deliver, args=(late, ready, dst), daemon=True).start()
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if from_relay and self.swallow.is_set():
                    self.swallowed += len(data)
                    continue
                if late is None:
                    dst.sendall(data)
                    continue
                with ready:
                    late.append((time.monotonic() + self.delay, data))
                    ready.notify()
        except OSError:
            pass
        if late is not None:
            with ready:                    # the end, after what is still held
                late.append((time.monotonic() + self.delay, b""))
                ready.notify()
            return                         # _deliver closes after the last bytes
        self._close_pair(src, dst)

    def _deliver(self, late, ready, dst):
        while True:
            with ready:
                ready.wait_for(lambda: late)
                due, data = late.popleft()
            time.sleep(max(0.0, due - time.monotonic()))
            if not data:
                break
            try:
                dst.sendall(data)
            except OSError:
                break
        self._close_pair(dst)

    @staticmethod
    def _close_pair(*socks):
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self):
        for a, b in self.pairs:
            self._close_pair(a, b)
            a.close()
            b.close()
        self.pairs = []

    def close(self):
        self.closing = True
        self.lsock.close()
        self.cut()


# --------------------------------------------------------------------------
# Mosquitto with a TLS listener (tests/test_tls.py)
# --------------------------------------------------------------------------

class TLSMosquitto(Mosquitto):
    """A private mosquitto with its plain listener on ``port`` (what
    publish() and the other helpers use) plus one TLS listener on
    ``tls_port``, both on 127.0.0.1 and sharing one broker state.

    ``tls_version``: mosquitto's ``tls_version`` option (one protocol version
    only, e.g. "tlsv1.2"); None leaves mosquitto's default (1.2 and 1.3).
    ``ciphers``: mosquitto's ``ciphers`` option (an OpenSSL cipher list, e.g.
    "DEFAULT:@SECLEVEL=0", which OpenSSL 3 needs before it will speak TLS 1.1).
    ``tls``: False makes the second listener plain MQTT (a broker without TLS
    on the port the relay expects TLS on). ``extra``: more mosquitto.conf
    lines for the TLS listener (e.g. "use_identity_as_username true")."""

    def __init__(self, workdir: Union[str, Path], cafile: Union[str, Path, None] = None,
                 certfile: Union[str, Path, None] = None, keyfile: Union[str, Path, None] = None,
                 require_certificate: bool = False, tls_version: Optional[str] = None,
                 ciphers: Optional[str] = None, tls: bool = True, tls_port: Optional[int] = None,
                 extra: Sequence[str] = (), **kw):
        super().__init__(workdir, **kw)
        self.cafile, self.certfile, self.keyfile = cafile, certfile, keyfile
        self.require_certificate = require_certificate
        self.tls_version = tls_version
        self.ciphers = ciphers
        self.tls = tls
        self.extra = list(extra)
        self.tls_port = tls_port or free_port()
        while self.tls_port == self.port:
            self.tls_port = free_port()

    def __repr__(self) -> str:
        return (f"<TLSMosquitto {self.host}:{self.port} tls {self.host}:{self.tls_port} "
                f"running={self.is_running()}>")

    def _write_conf(self) -> None:
        super()._write_conf()
        lines = [f"listener {self.tls_port} {self.host}"]
        if self.tls:
            lines += [f"cafile {self.cafile}", f"certfile {self.certfile}", f"keyfile {self.keyfile}",
                      f"require_certificate {'true' if self.require_certificate else 'false'}"]
            if self.tls_version:
                lines.append(f"tls_version {self.tls_version}")
            if self.ciphers:
                lines.append(f"ciphers {self.ciphers}")
        lines += self.extra
        with open(self.conf_path, "a") as f:
            f.write("\n".join(lines) + "\n")

    def start(self, persistence: Optional[bool] = None, timeout: float = 15.0) -> "TLSMosquitto":
        super().start(persistence=persistence, timeout=timeout)
        if not wait_port(self.host, self.tls_port, timeout, self.proc):
            status = self.proc.poll() if self.proc else None
            self.stop(timeout=2)
            raise BrokerStartError(
                f"mosquitto did not listen on TLS port {self.host}:{self.tls_port} within {timeout}s "
                f"(exit status {status})\n--- {self.conf_path}\n{_tail(self.conf_path)}"
                f"\n--- {self.log_path}\n{_tail(self.log_path)}")
        return self


def tls_connack(host: str, port: int, cafile: Union[str, Path, None], certfile=None, keyfile=None,
                min_version=None, max_version=None, ciphers: Optional[str] = None,
                timeout: float = 5.0):
    """CONNECT over TLS with paho (clean session). Returns (CONNACK code or
    None, error text or ""). The TLS context verifies the server against
    cafile (hostname included); min/max_version are ssl.TLSVersion values."""
    import ssl
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cafile:
        ctx.load_verify_locations(str(cafile))
    if certfile:
        ctx.load_cert_chain(str(certfile), str(keyfile))
    if ciphers:
        ctx.set_ciphers(ciphers)
    import warnings
    with warnings.catch_warnings():     # TLSVersion.TLSv1_1 is deprecated, and meant
        warnings.simplefilter("ignore", DeprecationWarning)
        if min_version is not None:
            ctx.minimum_version = min_version
        if max_version is not None:
            ctx.maximum_version = max_version
    rc: List[Optional[int]] = [None]
    c = paho.Client(client_id="tlsprobe-" + secrets.token_hex(4), clean_session=True,
                    protocol=paho.MQTTv311)
    c.tls_set_context(ctx)
    c.on_connect = lambda _c, _u, _f, code: rc.__setitem__(0, code)
    error = ""
    try:
        c.connect(host, port, keepalive=10)
        deadline = time.monotonic() + timeout
        while rc[0] is None and time.monotonic() < deadline:
            if c.loop(0.1) != paho.MQTT_ERR_SUCCESS:
                error = "connection closed before CONNACK"
                break
        if rc[0] == 0:
            c.disconnect()
            c.loop(0.1)
    except (OSError, ValueError, ssl.SSLError) as e:
        error = f"{type(e).__name__}: {e}"
    finally:
        try:
            c.socket() and c.socket().close()
        except Exception:
            pass
    return rc[0], error
