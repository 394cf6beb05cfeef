"""The example consumers of scripts/examples/, run the hard way: a backlog of
1,200 commands, the relay restarted while the example is in the middle of it,
then live commands. Each handled id once, in order, none missing, and the
cursor's last ack is the last id handled."""
import fcntl
import os
import re
import subprocess
import sys
import threading
import time

import pytest

from brokers import publish_many
from relay import CMDRELAYCTL, ROOT, Relay

EXAMPLES = ROOT / "scripts" / "examples"
BACKLOG = 1200      # above the 1,000, and more than socket.window (256)
LIVE = 100          # published after the restart
RESTART_AT = 300    # handled ids seen before the relay is restarted
# Each output line is about 150 bytes: with a one-page pipe the example is
# blocked writing a few dozen lines ahead of us, so the restart lands mid-backlog.
PIPE_BYTES = 4096


def example_command(name, sock, consumer):
    return {
        "python": [sys.executable, str(EXAMPLES / "consumer.py")],
        "node": ["/usr/bin/node", str(EXAMPLES / "consumer.js")],
        "c": [str(CMDRELAYCTL.parent / "example-consumer")],
        "shell": ["/bin/sh", str(EXAMPLES / "consumer.sh")],
    }[name] + [sock, consumer, "#"]


class Output:
    """The example's stdout, read line by line in a thread, pausable."""

    def __init__(self, proc):
        self.proc = proc
        self.ids = []
        self.lines = []
        self.go = threading.Event()
        self.go.set()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.proc.stdout:
            self.go.wait()
            self.lines.append(line)
            self.ids.append(int(line.split()[0]))

    def wait(self, n, timeout=120):
        deadline = time.monotonic() + timeout
        while len(self.ids) < n and time.monotonic() < deadline and self.proc.poll() is None:
            time.sleep(0.02)
        return len(self.ids)


@pytest.mark.parametrize("example", ["python", "node", "c", "shell"])
def test_example_backlog_and_relay_restart(example, mosquitto, tmp_path, uid):
    topic = f"/cf/v1/AAA/012C/{uid}/set"
    relay = Relay(tmp_path / "relay", mosquitto, f"gateway-{uid}", [topic])
    relay.start()
    pad = "x" * 100
    publish_many(mosquitto, topic, (f"cmd-{i:04d}-{pad}" for i in range(BACKLOG)))
    relay.wait_count(BACKLOG)
    sock = str(relay.workdir / "cmdrelay.sock")
    proc = subprocess.Popen(example_command(example, sock, "app"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, CMDRELAYCTL=str(CMDRELAYCTL)))
    fcntl.fcntl(proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    out = Output(proc)
    try:
        assert out.wait(RESTART_AT) >= RESTART_AT, proc.stderr.read() if proc.poll() is not None else ""
        out.go.clear()      # the example blocks on its stdout, mid-backlog
        at_restart = len(out.ids)
        relay.stop()
        out.go.set()
        time.sleep(0.5)     # it notices the relay is gone and retries
        relay.start()
        publish_many(mosquitto, topic, (f"live-{i:04d}" for i in range(LIVE)))
        relay.wait_count(BACKLOG + LIVE)
        total = BACKLOG + LIVE
        out.wait(total)
        deadline = time.monotonic() + 30
        acked = None
        while time.monotonic() < deadline:
            acked = relay.query("SELECT acked_id FROM consumers WHERE name = 'app'")
            if acked and acked[0][0] == total:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"the example exited {proc.returncode} after the restart: {proc.stderr.read()}"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    ids = out.ids
    assert len(ids) == total, f"handled {len(ids)} of {total}; first gaps: " \
        f"{sorted(set(range(1, total + 1)) - set(ids))[:10]}\n{err}"
    assert ids == list(range(1, total + 1)), "handled ids are not contiguous, in order, once each"
    assert acked == [(ids[-1],)], f"last ack {acked} != last handled {ids[-1]}"
    assert f"cmd-{BACKLOG - 1:04d}-" in out.lines[BACKLOG - 1]
    print(f"{example}: {len(ids)} handled (ids 1-{ids[-1]}), relay restarted after {at_restart}, last ack {acked[0][0]}")
    relay.stop()


def test_readme_links_every_example():
    readme = (ROOT / "README.md").read_text()
    for path in EXAMPLES.iterdir():
        assert f"scripts/examples/{path.name}" in readme, f"README does not link {path.name}"
        assert len(path.read_text().splitlines()) <= 40, f"{path.name} is over 40 lines"
    assert not re.search(r"\]\(\.\./", readme), "README links outside the repository"
