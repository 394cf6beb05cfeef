"""broker.hosts (issue 17): the relay connects to the first endpoint that
answers and fails over to the next on connection loss, with the same client
id; log, STATUS and stats say which endpoint is in use and why the last one
was left. Two private Mosquittos share nothing, so the second has no session
for us: the session-loss alarm is the honest result there."""
import subprocess
import time

import yaml

from brokers import Mosquitto, free_port, publish
from relay import CMDRELAYD, Relay
from test_session_loss import stats


def with_hosts(relay, hosts):
    cfg = yaml.safe_load(relay.conf_path.read_text())
    del cfg["broker"]["host"], cfg["broker"]["port"]
    cfg["broker"]["hosts"] = hosts
    relay.conf_path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def test_failover_to_the_next_endpoint(tmp_path, uid):
    a = Mosquitto(tmp_path / "a").start()
    b = Mosquitto(tmp_path / "b").start()
    dead = free_port()                      # nobody listens: the first answer is a's
    topic = f"/cf/v1/AAA/012C/{uid}/set"
    relay = Relay(tmp_path / "relay", a, f"gateway-{uid}", [topic])
    with_hosts(relay, [f"127.0.0.1:{dead}", f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"])
    try:
        relay.start()
        assert f"connected to 127.0.0.1:{a.port} as gateway-{uid}" in relay.log()
        s = stats(relay)
        assert (s["broker"]["host"], s["broker"]["port"]) == ("127.0.0.1", a.port)
        assert s["broker"]["hosts"] == [f"127.0.0.1:{dead}", f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"]
        assert s["broker"]["left"].startswith(f"127.0.0.1:{dead}: ")
        assert s["session_lost"] == 0, "the first connect ever is no alarm"
        publish(a, topic, b"one", qos=1)
        relay.wait_count(1)

        t0 = time.monotonic()
        a.stop()
        relay.wait_log(f"connected to 127.0.0.1:{b.port} as gateway-{uid}", 30)
        relay.wait_for(lambda: relay.log().count("subscriptions in place") == 2, 30, "subscribed on b")
        failover_s = time.monotonic() - t0
        print(f"failover a -> b: {failover_s:.2f} s")
        log = relay.log()
        assert f"failing over from 127.0.0.1:{a.port} to 127.0.0.1:{b.port}: connection lost" in log
        assert "commands queued for us while we were away may be lost" in log
        publish(b, topic, b"two", qos=1)
        relay.wait_count(2)
        assert [r["payload"] for r in relay.accepted()] == [b"one", b"two"]
        s = stats(relay)
        assert (s["broker"]["host"], s["broker"]["port"], s["broker"]["connected"]) == ("127.0.0.1", b.port, True)
        assert s["broker"]["left"].startswith(f"127.0.0.1:{a.port}: connection lost")
        assert s["session_lost"] == 1
        relay.wait_for(lambda: any(m.startswith(f"STATUS=connected to 127.0.0.1:{b.port}; left 127.0.0.1:{a.port}: ")
                                   and "SESSION LOST" in m for m in relay.notify.seen("STATUS=")), 10,
                       "STATUS naming b, why a was left, and the lost session")
        assert failover_s < 20, "failover within the reconnect backoff (max_delay 2s) and a few tries"
    finally:
        relay.stop()
        a.stop()
        b.stop()


def test_hosts_replaces_host_and_port(tmp_path):
    conf = tmp_path / "c.yaml"
    conf.write_text("broker:\n  client_id: x\n  host: a\n  hosts: [\"b:1883\"]\n"
                    "subscriptions:\n  - topic: t\n")
    r = subprocess.run([str(CMDRELAYD), "-t", "-c", str(conf)], capture_output=True, text=True)
    assert r.returncode == 78
    assert f"{conf}:4:3: broker.hosts replaces broker.host and broker.port" in r.stderr
    conf.write_text("broker:\n  client_id: x\n  hosts:\n    - b:1883\n    - b\n"
                    "subscriptions:\n  - topic: t\n")
    r = subprocess.run([str(CMDRELAYD), "-t", "-c", str(conf)], capture_output=True, text=True)
    assert r.returncode == 78
    assert f"{conf}:5:7: broker.hosts: 'b' is not host:port (port 1..65535)" in r.stderr


def test_check_verbose_prints_every_endpoint(tmp_path):
    conf = tmp_path / "c.yaml"
    conf.write_text("broker:\n  client_id: x\n  hosts: [\"node1:1883\", \"10.0.0.2:8883\", \"node3:1884\"]\n"
                    f"subscriptions:\n  - topic: t\nstore:\n  path: {tmp_path}/h.db\n"
                    f"socket:\n  path: {tmp_path}/s.sock\n")
    r = subprocess.run([str(CMDRELAYD), "-t", "-v", "-c", str(conf)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "broker: node1:1883, 10.0.0.2:8883, node3:1884, client_id x\n" in r.stdout, r.stdout
