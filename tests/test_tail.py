"""cmdrelayctl tail: acks only what reached the reader, stops at once on an
error reply, outlives relay restarts, --no-ack, --exec, escaped output."""
import json
import subprocess
import time

import pytest

from brokers import publish, publish_many
from relay import CMDRELAYCTL, Relay


@pytest.fixture
def relay(mosquitto, tmp_path, uid):
    topic = f"/cf/v1/AAA/012C/{uid}/set"
    r = Relay(tmp_path / "relay", mosquitto, f"gateway-{uid}", [topic])
    r.topic = topic
    r.start()
    yield r
    r.stop()


def tail(relay, *args):
    return [str(CMDRELAYCTL), "-c", str(relay.conf_path), "tail", *args]


def backlog(relay, mosquitto, n):
    publish_many(mosquitto, relay.topic, (f"cmd-{i}" for i in range(n)))
    relay.wait_count(n)


def acked(relay, name):
    rows = relay.query("SELECT acked_id FROM consumers WHERE name = ?", (name,))
    return rows[0][0] if rows else None


def test_head_acks_only_what_it_read(relay, mosquitto):
    backlog(relay, mosquitto, 200)
    r = subprocess.run(" ".join(tail(relay, "--consumer", "peek", "--json")) + " | head -3",
                       shell=True, capture_output=True, text=True, timeout=30)
    assert [json.loads(line)["id"] for line in r.stdout.splitlines()] == [1, 2, 3]
    time.sleep(0.5)
    assert acked(relay, "peek") == 3, r.stderr     # the old tail acked everything the pipe buffered


def test_no_ack_peeks_without_moving_the_cursor(relay, mosquitto):
    backlog(relay, mosquitto, 10)
    subprocess.run(tail(relay, "--consumer", "app", "--exec", "test $CMDRELAY_ID -le 4"),
                   capture_output=True, timeout=30)
    assert acked(relay, "app") == 4
    p = subprocess.Popen(tail(relay, "--consumer", "app", "--no-ack", "--json"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ids = [json.loads(p.stdout.readline())["id"] for _ in range(6)]
    p.terminate()
    p.wait(10)
    assert ids == [5, 6, 7, 8, 9, 10]
    assert acked(relay, "app") == 4


def test_exec_acks_on_success_and_stops_on_failure(relay, mosquitto, tmp_path):
    backlog(relay, mosquitto, 5)
    out = tmp_path / "handled"
    # CMD fails on #4: 1-3 acked, the tail exits 1 naming the id, 4 stays pending
    cmd = f'jq -r .payload >> {out} && test $CMDRELAY_ID -ne 4'
    r = subprocess.run(tail(relay, "--consumer", "x", "--exec", cmd), capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 1
    assert "on #4; not acknowledged" in r.stderr
    assert acked(relay, "x") == 3
    assert out.read_text().split() == ["cmd-0", "cmd-1", "cmd-2", "cmd-3"]


@pytest.mark.parametrize("args", [["--filter", "a/#/b"], ["--consumer", "bad name"]])
def test_error_reply_ends_at_once(relay, args):
    r = subprocess.run(tail(relay, *args), capture_output=True, text=True, timeout=10)
    assert r.returncode == 1
    assert "cmdrelayd says bad_request: hello:" in r.stderr


def test_follows_across_a_relay_restart(relay, mosquitto):
    backlog(relay, mosquitto, 20)
    named = subprocess.Popen(tail(relay, "--consumer", "follow", "--json"), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    live = subprocess.Popen(tail(relay, "--json", "--from", "0"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    once = subprocess.Popen(tail(relay, "--once"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        got = {p: [json.loads(p.stdout.readline())["id"] for _ in range(20)] for p in (named, live)}
        relay.stop()
        assert once.wait(10) == 1
        assert "closed the connection" in once.stderr.read()
        time.sleep(0.3)
        relay.start()
        publish_many(mosquitto, relay.topic, (f"after-{i}" for i in range(10)))
        for p in (named, live):
            got[p] += [json.loads(p.stdout.readline())["id"] for _ in range(10)]
            assert got[p] == list(range(1, 31))
            assert p.poll() is None
        deadline = time.monotonic() + 10
        while acked(relay, "follow") != 30 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert acked(relay, "follow") == 30
    finally:
        for p in (named, live, once):
            p.kill()
            p.wait(10)


def test_control_characters_are_escaped(relay, mosquitto):
    hostile = b"\x1b]0;owned\x07\x1b[2J\rhidden\xc2\x9b31m \\x1b"
    publish(mosquitto, relay.topic, hostile)
    relay.wait_count(1)
    lines = []
    for args in (["--consumer", "esc", "--exec", "cat"], ["--from", "0"]):
        p = subprocess.Popen(tail(relay, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        lines.append(p.stdout.readline())
        p.kill()
        p.wait(10)
    # --exec (and --json) carry the payload as JSON, the bytes as they were
    assert json.loads(lines[0])["payload"].encode() == hostile
    line = lines[1]
    assert not any(b < 0x20 or b == 0x7f for b in line[:-1]) and b"\xc2\x9b" not in line
    # as history shows it: C1 as its two bytes, like any other escape
    assert line.rstrip(b"\n").endswith(b"\\x1b]0;owned\\x07\\x1b[2J\\x0dhidden\\xc2\\x9b31m \\\\x1b")
