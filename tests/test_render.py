"""One rendering of payloads for people (issue 16): history, outbox and tail
show the same bytes the same way (UTF-8 as it is, \\ as \\\\, controls and
non-UTF-8 bytes as \\xNN), JSON carries them as base64,
and publish/inject --escaped take the shown form back."""
import base64
import json
import sqlite3
import subprocess
import types

from brokers import free_port, publish
from relay import CMDRELAYCTL, Relay

PAYLOAD = b"\x00\xff\x10 \\ \x1b[2J \xc2\x9b caf\xc3\xa9"
SHOWN = "\\x00\\xff\\x10 \\\\ \\x1b[2J \\xc2\\x9b caf\u00e9"


def ctl(relay, *args):
    return subprocess.run([str(CMDRELAYCTL), "-c", str(relay.conf_path), *args], capture_output=True,
                          timeout=30)


def ok(r):
    assert r.returncode == 0, r.stderr
    return r.stdout.decode()


def cell(table):
    """The last column of a table's only row: the payload."""
    header, row = table.splitlines()
    return row[header.index("TOPIC / PAYLOAD" if "TOPIC / PAYLOAD" in header else "PAYLOAD"):]


def test_one_rendering_of_a_binary_payload_everywhere(mosquitto, uid, tmp_path):
    topic, up = f"/rd/{uid}/set", f"/rd/{uid}/up"
    relay = Relay(tmp_path / "relay", mosquitto, f"rd-{uid}", [topic], uplink={"allow": [up]})
    relay.start()
    try:
        publish(mosquitto, topic, PAYLOAD)
        relay.wait_count(1)
        assert cell(ok(ctl(relay, "history"))) == SHOWN
        row = json.loads(ok(ctl(relay, "history", "--json")))
        assert row["encoding"] == "base64" and base64.b64decode(row["payload"]) == PAYLOAD

        p = subprocess.Popen([str(CMDRELAYCTL), "-c", str(relay.conf_path), "tail", "--from", "0"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            line = p.stdout.readline().decode().rstrip("\n")
        finally:
            p.kill()
            p.wait(10)
        assert line.endswith(f" {topic} {SHOWN}"), line

        # the shown form goes back as the bytes it shows
        assert ok(ctl(relay, "inject", "--escaped", topic, SHOWN)) == "injected as #2\n"
        assert relay.query("SELECT payload FROM messages WHERE id = 2") == [(PAYLOAD,)]
        ok(ctl(relay, "publish", "--escaped", up, SHOWN))
        relay.wait_for(lambda: relay.query("SELECT status FROM outbox") == [("sent",)], 10, "the uplink")
        assert cell(ok(ctl(relay, "outbox"))) == f"{up} {SHOWN}"
        out = json.loads(ok(ctl(relay, "outbox", "--json")))
        assert out["encoding"] == "base64" and base64.b64decode(out["payload"]) == PAYLOAD

        r = ctl(relay, "inject", "--escaped", topic, "ok\\q")
        assert r.returncode == 64 and b"bad escape at byte 3 ('\\q')" in r.stderr, r.stderr
        # without --escaped a backslash is a byte like any other
        assert ok(ctl(relay, "inject", topic, "a\\x41")) == "injected as #3\n"
        assert relay.query("SELECT payload FROM messages WHERE id = 3") == [(b"a\\x41",)]
        assert cell(ok(ctl(relay, "history", "--since", "1h", "--limit", "1"))) == "a\\\\x41"
    finally:
        relay.stop()


def test_a_hostile_device_level_cannot_drive_the_terminal(tmp_path, uid):
    """The DEVICE column is a topic level some broker sent: a level with an
    escape sequence (RabbitMQ passes C0/C1 in topics; an admin may write
    rows) shows as \\xNN, cut to the column, and the table stays aligned."""
    nobroker = types.SimpleNamespace(host="127.0.0.1", port=free_port())   # nothing listens
    relay = Relay(tmp_path / "relay", nobroker, f"rd-{uid}", ["/cf/v1/+/+/+/set"])
    relay.start(wait_subscribed=False)
    try:
        con = sqlite3.connect(str(relay.db_path))
        for dev in ("\x1b]0;owned\x07\x1b[2J", "D1"):
            con.execute("INSERT INTO messages (received_at, topic, payload, payload_hash, qos, retain, dup,"
                        " mid, connection, status, device, age_ms) VALUES (0, 't', x'6f6e', 0, 1, 0, 0, 1, 1,"
                        " 'accepted', ?, 0)",
                        (dev,))
        con.commit()
        con.close()
        out = ok(ctl(relay, "--utc", "history"))
        assert "\x1b" not in out and "\x07" not in out
        header, hostile, plain = out.splitlines()
        assert hostile.split()[2] == "\\x1b]0;owne..."
        assert hostile.index(" accepted ") == plain.index(" accepted ") == header.index("STATUS") - 1
    finally:
        relay.stop()
