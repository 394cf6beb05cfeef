"""cmdrelayctl's conventions: --help everywhere, global options anywhere,
--socket without a config, stats --json, a refused socket named as such, and
only what each subcommand needs loaded from the config (issue 13 item 6)."""
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from relay import CMDRELAYCTL, Relay

EX_NOPERM, EX_UNAVAILABLE, EX_CONFIG = 77, 69, 78
COMMANDS = ["history", "consumers", "publish", "outbox", "tail", "status", "stats", "check-config"]
NOBODY = pwd.getpwnam("nobody")


def ctl(*args, user=None):
    pre = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"] if user else []
    return subprocess.run(pre + [str(CMDRELAYCTL), *args], capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_help(command):
    r = ctl(command, "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"usage: cmdrelayctl [-c FILE] [--db PATH] [--socket PATH] [--utc] {command}")
    assert "77 permission denied" in r.stdout


@pytest.fixture
def relay(mosquitto, uid):
    # a 0755 directory: pytest's tmp dirs are 0700 and would refuse nobody
    work = Path(tempfile.mkdtemp(prefix="cmdrelay-ctl-"))
    os.chmod(work, 0o755)
    r = Relay(work, mosquitto, f"ctl-{uid}", [f"/ctl/{uid}/#"])
    r.start()
    try:
        yield r
    finally:
        r.stop()
        shutil.rmtree(work, ignore_errors=True)


def test_global_options_anywhere_and_socket_without_config(relay):
    sock = str(relay.workdir / "cmdrelay.sock")
    # after the subcommand, and after its options
    r = ctl("history", "--json", "-c", str(relay.conf_path))
    assert r.returncode == 0, r.stderr
    r = ctl("history", f"--db={relay.db_path}", "--limit", "5")
    assert r.returncode == 0 and r.stdout.startswith("ID "), r.stderr
    # --socket needs no config at all, and --json makes one line
    r = ctl("-c", "/nonexistent.yaml", "stats", "--socket", sock, "--json")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["source"] == "cmdrelayd"
    # --socket alone and nobody listening: unreachable, not a config error
    r = ctl("-c", "/nonexistent.yaml", "--socket", sock + ".gone", "stats")
    assert r.returncode == EX_UNAVAILABLE and "is cmdrelayd running?" in r.stderr, r.stderr


def test_refused_socket_names_the_group(relay):
    sock = relay.workdir / "cmdrelay.sock"
    os.chown(sock, 0, 0)
    os.chmod(sock, 0o660)
    for command in ("stats", "tail"):
        r = ctl("--socket", str(sock), command, user=NOBODY)
        assert r.returncode == EX_NOPERM, (command, r.returncode, r.stderr)
        assert "Permission denied; join the group 'root'" in r.stderr, r.stderr
        assert "not running" not in r.stderr


def test_stats_needs_no_password_file(relay):
    # the config names a password only root may read: the daemon needs it,
    # a user who may use the socket does not
    secret = relay.workdir / "password"
    secret.write_text("hunter2\n")
    os.chmod(secret, 0o600)
    text = relay.conf_path.read_text().replace("broker:\n", f"broker:\n  username: u\n  password_file: {secret}\n", 1)
    relay.conf_path.write_text(text)
    os.chmod(relay.conf_path, 0o644)
    os.chmod(relay.workdir / "cmdrelay.sock", 0o666)
    r = ctl("-c", str(relay.conf_path), "stats", "--json", user=NOBODY)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["source"] == "cmdrelayd"
    # check-config still checks the secrets: that is what it is for
    r = ctl("-c", str(relay.conf_path), "check-config", user=NOBODY)
    assert r.returncode == EX_CONFIG and "broker.password_file" in r.stderr and "Permission denied" in r.stderr


def test_status_says_connected_since_when_to_what(mosquitto, uid, tmp_path):
    prom = tmp_path / "cmdrelay.prom"
    r = Relay(tmp_path / "relay", mosquitto, f"st-{uid}", [f"/st/{uid}/#"],
              metrics={"textfile": str(prom), "interval": "1s"})
    r.start()
    try:
        sock = str(r.workdir / "cmdrelay.sock")
        st = ctl("--socket", sock, "status")
        assert st.returncode == 0, st.stderr
        version = ctl("--version").stdout.split()[1]
        assert st.stdout.startswith(f"cmdrelayd {version}, up "), st.stdout
        assert f"broker:    connected to {mosquitto.host}:{mosquitto.port} (mqttv311) since 20" in st.stdout
        assert f"client id: st-{uid}" in st.stdout and "last error: none" in st.stdout
        j = json.loads(ctl("--socket", sock, "status", "--json").stdout)
        assert j["version"] == version and j["uptime_seconds"] >= 0 and j["started_at"].endswith("Z")
        assert j["broker"]["connected"] is True and j["broker"]["session_present"] in (True, False)
        assert j["broker"]["connected_since"] >= j["started_at"]
        # the same facts in stats
        stats = json.loads(ctl("--socket", sock, "stats", "--json").stdout)
        assert stats["broker"]["connected_since"] == j["broker"]["connected_since"]
        r.wait_for(lambda: prom.exists(), 10, "the metrics textfile")
        assert f'cmdrelay_build_info{{version="{version}"}} 1' in prom.read_text()
    finally:
        r.stop()
    st = ctl("--socket", sock, "status")
    assert st.returncode == EX_UNAVAILABLE and "is cmdrelayd running?" in st.stderr


def test_stats_polls_do_not_fill_the_log(mosquitto, uid, tmp_path):
    # a monitor polling stats every 10 s must not add lines at info level
    r = Relay(tmp_path / "relay", mosquitto, f"lg-{uid}", [f"/lg/{uid}/#"], log={"level": "info"})
    r.start(wait_subscribed=False)
    try:
        sock = str(r.workdir / "cmdrelay.sock")
        time.sleep(0.5)
        before = r.log_path.read_text()
        for _ in range(3):
            assert ctl("--socket", sock, "stats", "--json").returncode == 0
            assert ctl("--socket", sock, "status").returncode == 0
        time.sleep(0.3)
        added = r.log_path.read_text()[len(before):]
        assert "consumer" not in added, added
    finally:
        r.stop()
