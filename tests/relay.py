"""Runs the real cmdrelayd binary for the integration tests and reads its history."""
import os
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CMDRELAYD = ROOT / os.environ.get("CMDRELAY_BUILD", "build") / "cmdrelayd"
CMDRELAYCTL = ROOT / os.environ.get("CMDRELAY_BUILD", "build") / "cmdrelayctl"


class NotifyListener:
    """A NOTIFY_SOCKET for sd_notify(), read continuously like systemd does:
    collects (monotonic time, "KEY=value") for everything the daemon says."""

    def __init__(self, path):
        self.path = str(path)
        if os.path.exists(self.path):
            os.unlink(self.path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.messages = []
        self.lock = threading.Lock()
        self.closing = False
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        while not self.closing:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            now = time.monotonic()
            with self.lock:
                self.messages.extend((now, line) for line in data.decode().splitlines())

    def seen(self, prefix):
        with self.lock:
            return [m for _, m in self.messages if m.startswith(prefix)]

    def close(self):
        self.closing = True
        self.thread.join(2)
        self.sock.close()


class Relay:
    """One cmdrelayd with its config, history and log in workdir."""

    def __init__(self, workdir, broker, client_id, topics, **overrides):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.broker = broker
        self.client_id = client_id
        self.db_path = self.workdir / "history.db"
        self.conf_path = self.workdir / "cmdrelay.yaml"
        self.log_path = self.workdir / "cmdrelayd.log"
        self.proc = None
        self.notify = None
        self.log_offset = 0
        self.write_config(topics, **overrides)

    def write_config(self, topics, **overrides):
        cfg = {
            "broker": {
                "host": self.broker.host,
                "port": self.broker.port,
                "client_id": self.client_id,
                "keepalive": 10,
                "packet_ids": getattr(self.broker, "packet_ids", "renumbered"),
                "reconnect": {"min_delay": "100ms", "max_delay": "2s"},
            },
            "subscriptions": [{"topic": t, "qos": 1} for t in topics],
            "store": {"path": str(self.db_path)},
            "socket": {"path": str(self.workdir / "cmdrelay.sock")},
            "log": {"level": "debug"},
        }
        for key, value in overrides.items():
            section, _, name = key.partition("__")
            if name:
                cfg.setdefault(section, {})[name] = value
            else:
                cfg[section] = value
        # The daemon's default is auto; these tests were written for MQTT
        # 3.1.1 (retained replays, packet ids): protocol None means the default.
        cfg["broker"].setdefault("protocol", "mqttv311")
        if cfg["broker"]["protocol"] is None:
            del cfg["broker"]["protocol"]
        self.conf_path.write_text(yaml.safe_dump(cfg, sort_keys=False))

    # -- process control ------------------------------------------------------

    def start(self, wait_subscribed=True, timeout=30):
        assert self.proc is None, "relay already running"
        self.notify = NotifyListener(self.workdir / "notify.sock")
        env = dict(os.environ, NOTIFY_SOCKET=self.notify.path)
        env.pop("JOURNAL_STREAM", None)
        self.log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([str(CMDRELAYD), "-c", str(self.conf_path)],
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
        log.close()
        self.wait_for(lambda: self.notify.seen("READY=1"), timeout, "READY=1")
        if wait_subscribed:
            self.wait_log("subscriptions in place", timeout)
        return self

    def stop(self, timeout=15):
        """SIGTERM and a clean exit with status 0."""
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout)
        self.proc = None
        self.notify.close()
        assert rc == 0, f"cmdrelayd exited {rc}:\n{self.log()}"

    def kill(self):
        """kill -9: the crash that G1 is about."""
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None
        self.notify.close()

    def restart(self, **kw):
        self.stop()
        return self.start(**kw)

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    # -- observation ----------------------------------------------------------

    def log(self, since_start=False):
        if not self.log_path.exists():
            return ""
        data = self.log_path.read_bytes()
        return data[self.log_offset:].decode(errors="replace") if since_start else data.decode(errors="replace")

    def wait_for(self, predicate, timeout, what):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"cmdrelayd exited {self.proc.returncode} while waiting for "
                                     f"{what}:\n{self.log()}")
            time.sleep(0.02)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}:\n{self.log()[-5000:]}")

    def wait_log(self, text, timeout=30):
        self.wait_for(lambda: text in self.log(since_start=True), timeout, repr(text))

    def query(self, sql, args=()):
        db = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10)
        try:
            return db.execute(sql, args).fetchall()
        finally:
            db.close()

    def rows(self):
        """Every history row as a dict, in id order."""
        db = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10)
        db.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in db.execute("SELECT * FROM messages ORDER BY id")]
        finally:
            db.close()

    def accepted(self):
        return [r for r in self.rows() if r["status"] == "accepted"]

    def count(self, where="1"):
        if not self.db_path.exists():
            return 0
        return self.query(f"SELECT count(*) FROM messages WHERE {where}")[0][0]

    def wait_count(self, n, where="1", timeout=60):
        self.wait_for(lambda: self.count(where) >= n, timeout, f"{n} rows where {where}")
        return self.count(where)
