"""The project's scripts leave the machine's own services alone.

A gateway often runs Debian's mosquitto.service (a bridge to the cloud, say).
scripts/install-deps.sh and `make demo` must neither stop it nor take its
port: they use private brokers on free ports.
"""
import os
import subprocess
import time

from brokers import free_port, mqtt_connack, wait_port
from relay import ROOT

SYSTEM_MOSQUITTO = ["/usr/sbin/mosquitto", "-c", "/etc/mosquitto/mosquitto.conf"]


def _clean_env():
    # a `make check` above us must not hand its variables (SANITIZE=1, B=...)
    # to the `make demo` below: that would build somewhere demo.sh doesn't run
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env["CMDRELAY_KEEP_SYSTEM_BROKERS"] = ""   # the old opt-out must not be what saves it
    return env


def test_system_mosquitto_survives_install_deps_and_demo(tmp_path):
    # Debian's exact command line, in a mount namespace of its own whose
    # /etc/mosquitto/mosquitto.conf is a private config on a free port: to
    # every script it looks like the packaged service, yet it is ours
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
    log = open(tmp_path / "mosquitto.log", "wb")
    proc = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         'conf=$1; shift; mount --bind "$conf" /etc/mosquitto/mosquitto.conf && exec "$@"',
         "sh", str(conf)] + SYSTEM_MOSQUITTO,
        stdout=log, stderr=subprocess.STDOUT)
    try:
        assert wait_port("127.0.0.1", port, 10, proc), (tmp_path / "mosquitto.log").read_text()
        cmdline = open(f"/proc/{proc.pid}/cmdline", "rb").read().split(b"\0")[:-1]
        assert [a.decode() for a in cmdline] == SYSTEM_MOSQUITTO

        deps = subprocess.run(["bash", "scripts/install-deps.sh"], cwd=ROOT, env=_clean_env(),
                              capture_output=True, text=True, timeout=600)
        assert deps.returncode == 0, deps.stderr
        assert "stopping" not in deps.stderr
        assert f"leaving the system mosquitto running (pids {proc.pid})" in deps.stderr
        assert proc.poll() is None, "install-deps.sh stopped the system mosquitto"

        demo = subprocess.run(["make", "-s", "demo"], cwd=ROOT, env=_clean_env(),
                              capture_output=True, text=True, timeout=300)
        assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
        assert "accepted: 1, retained replays marked duplicate: 1" in demo.stdout
        time.sleep(0.2)
        assert proc.poll() is None, "make demo stopped the system mosquitto"
        assert mqtt_connack("127.0.0.1", port) == 0, "the system mosquitto no longer answers"
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
