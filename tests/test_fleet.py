"""One config file for a fleet: {hostname} and {machine_id} in client_id,
topics and paths; -t checks the directories the daemon will need."""
import socket
import subprocess

import pytest

from brokers import publish
from relay import CMDRELAYD, Relay

EX_CONFIG = 78
HOST = socket.gethostname()
MACHINE_ID = open("/etc/machine-id").read().split("\n")[0]


def check(conf, *flags):
    return subprocess.run([str(CMDRELAYD), "-t", *flags, "-c", str(conf)], capture_output=True, text=True)


def fleet_conf(tmp_path, store, sock=None):
    conf = tmp_path / "fleet.yaml"
    conf.write_text(
        "broker:\n  client_id: gw-{hostname}\n"
        "subscriptions:\n  - topic: /cf/v1/AAA/012C/{machine_id}/set\n"
        f"store:\n  path: {store}\n"
        f"socket:\n  path: {sock or tmp_path / 'cmdrelay.sock'}\n")
    return conf


def test_hostname_and_machine_id_are_substituted_and_shown(tmp_path):
    conf = fleet_conf(tmp_path, tmp_path / "{hostname}" / "history.db")
    r = check(conf, "-v")
    assert r.returncode == 0, r.stderr
    assert f"client_id gw-{HOST}\n" in r.stdout
    assert f"subscription: /cf/v1/AAA/012C/{MACHINE_ID}/set (qos 1)\n" in r.stdout
    assert f"store.path: {tmp_path}/{HOST}/history.db\n" in r.stdout
    assert not (tmp_path / HOST).exists(), "-t must create nothing"


def test_broker_hosts_entries_are_substituted(tmp_path):
    conf = tmp_path / "fleet.yaml"
    conf.write_text("broker:\n  client_id: gw\n"
                    "  hosts: [\"{hostname}:1883\", \"mqtt-{machine_id}.example:8883\"]\n"
                    f"subscriptions:\n  - topic: t\nstore:\n  path: {tmp_path}/h.db\n"
                    f"socket:\n  path: {tmp_path}/s.sock\n")
    r = check(conf, "-v")
    assert r.returncode == 0, r.stderr
    assert f"broker: {HOST}:1883, mqtt-{MACHINE_ID}.example:8883, client_id gw\n" in r.stdout, r.stdout
    conf.write_text(conf.read_text().replace("{hostname}:1883", "{machine_id}" * 8 + ":1883"))
    r = check(conf)
    assert r.returncode == EX_CONFIG, r.stdout
    assert f"{conf}:3:11: broker.hosts: a host of 256 bytes: at most 253" in r.stderr, r.stderr


def test_the_daemon_uses_the_substituted_values(mosquitto, tmp_path):
    topic = f"/fleet/{MACHINE_ID}/set"
    r = Relay(tmp_path / "relay", mosquitto, "gw-{hostname}", ["/fleet/{machine_id}/set"],
              store={"path": str(tmp_path / "{hostname}" / "sub" / "history.db")})
    r.db_path = tmp_path / HOST / "sub" / "history.db"    # made by the daemon at start
    r.start()
    try:
        publish(mosquitto, topic, b"reboot", qos=1)
        r.wait_count(1)
        assert r.query("SELECT topic FROM messages") == [(topic,)]
        assert f"gw-{HOST}" in r.log()
    finally:
        r.stop()


@pytest.mark.parametrize("key", ["store.path", "socket.path", "metrics.textfile"])
def test_check_names_the_key_of_a_directory_that_cannot_be(tmp_path, key):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    bad = blocker / "sub" / "x"
    conf = fleet_conf(tmp_path, bad if key == "store.path" else tmp_path / "h.db",
                      bad if key == "socket.path" else None)
    if key == "metrics.textfile":
        conf.write_text(conf.read_text() + f"metrics:\n  textfile: {bad}\n")
    r = check(conf)
    assert r.returncode == EX_CONFIG, r.stdout
    assert f"{conf}: {key}: directory {blocker}/sub does not exist and cannot be made: Not a directory" \
        in r.stderr, r.stderr
