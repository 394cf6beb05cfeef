"""cmdrelayctl consumers delete / reset: through the running daemon, refused
while that consumer is connected, and what the cursor then gets."""
import json
import os
import subprocess

from brokers import publish_many
from consumer_client import ConsumerClient
from relay import CMDRELAYCTL, Relay


def ctl(relay, *args):
    return subprocess.run([str(CMDRELAYCTL), "-c", str(relay.conf_path), *args], capture_output=True,
                          text=True, timeout=30)


def cursor(relay, name):
    rows = relay.query("SELECT acked_id FROM consumers WHERE name = ?", (name,))
    return rows[0][0] if rows else None


def test_reset_and_delete(mosquitto, tmp_path, uid):
    topic = f"/cf/v1/AAA/012C/{uid}/set"
    relay = Relay(tmp_path / "relay", mosquitto, f"gateway-{uid}", [topic])
    relay.start()
    publish_many(mosquitto, topic, (f"c{i}" for i in range(10)))
    relay.wait_count(10)
    c = ConsumerClient.connect(relay.workdir / "cmdrelay.sock")
    c.hello(consumer="app", from_="live")
    busy = ctl(relay, "consumers", "reset", "app", "--oldest")
    assert busy.returncode == 1 and "consumer_busy: consumer app is connected (pid" in busy.stderr
    row = [ln.split() for ln in ctl(relay, "consumers").stdout.splitlines() if ln.startswith("app ")]
    # never acked: LAST ACK empty; connected: this process's pid and since when
    assert row[0][:4] == ["app", "#", "10", "0"] and row[0][4:7] == ["pid", str(os.getpid()), "since"], row
    listed = [json.loads(ln) for ln in ctl(relay, "consumers", "--json").stdout.splitlines()]
    assert "last_ack" not in listed[0] and listed[0]["connected"]["pid"] == os.getpid(), listed
    c.close()
    relay.wait_log(") disconnected")
    for args, want in [(["--oldest"], 0), (["--to", "4"], 4), (["--live"], 10)]:
        r = ctl(relay, "consumers", "reset", "app", *args)
        assert r.returncode == 0, r.stderr
        assert r.stdout == f"consumer app: acknowledged up to #{want}\n"
        assert cursor(relay, "app") == want
    ctl(relay, "consumers", "reset", "app", "--to", "4")
    with ConsumerClient.connect(relay.workdir / "cmdrelay.sock") as c:
        c.hello(consumer="app")
        assert [m["id"] for m in c.collect(quiet=0.5)] == [5, 6, 7, 8, 9, 10]
    r = ctl(relay, "consumers", "reset", "app", "--to", "11")
    assert r.returncode == 1 and "beyond the newest command" in r.stderr
    r = ctl(relay, "consumers", "delete", "app")
    assert (r.returncode, r.stdout) == (0, "consumer app deleted\n"), r.stderr
    assert cursor(relay, "app") is None
    r = ctl(relay, "consumers", "delete", "app")
    assert r.returncode == 1 and "no_consumer: there is no consumer app" in r.stderr
    assert ctl(relay, "consumers", "reset", "app").returncode == 64
    relay.stop()
