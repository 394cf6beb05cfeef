"""Bounded by construction (G5, G7): no cursor position, input or history
size makes the relay do work or hold memory beyond a fixed bound. Real
daemon, real Mosquitto; large histories are written straight into the
schema with the daemon stopped, not published."""
import os
import sqlite3
import time

from brokers import publish
from consumer_client import ConsumerClient
from relay import Relay

BULK_ROWS = 200_000


def bulk_history(relay, topic, n):
    """n accepted commands on topic, inserted through the schema in one
    transaction (the daemon is stopped)."""
    db = sqlite3.connect(relay.db_path)
    now = int(time.time() * 1000)
    with db:
        db.execute("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)"
                   " INSERT INTO messages (received_at, topic, payload, payload_hash, qos, retain,"
                   " dup, mid, connection, status) SELECT ?, ?, CAST('old ' || i AS BLOB), i,"
                   " 1, 0, 0, 0, 0, 'accepted' FROM n", (n, now, topic))
        db.execute("INSERT OR IGNORE INTO topics (topic) VALUES (?)", (topic,))
        db.execute("UPDATE topics SET last_accepted = (SELECT max(id) FROM messages) WHERE topic = ?",
                   (topic,))
    db.close()


def cpu_seconds(pid):
    """User + system CPU time the process has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sock(relay):
    return str(relay.workdir / "cmdrelay.sock")


def test_cursor_far_behind_costs_no_work_per_commit(mosquitto, tmp_path, uid):
    """A named consumer at #1 of a 200,000-row history whose filter matches
    nothing after it: each new command costs the relay a bounded amount of CPU,
    not a walk over the history (issue 12 item 1; on the old code about
    30 ms of CPU per command, here well under 6 ms). It still gets the one
    command that matches, in order."""
    busy = f"/cf/v1/AAA/012C/{uid}/set"
    quiet = f"/cf/v1/AAA/012C/{uid}-quiet/set"
    relay = Relay(tmp_path / "relay", mosquitto, f"gateway-{uid}", [busy, quiet])
    relay.start()
    relay.stop()
    bulk_history(relay, quiet, 1)
    bulk_history(relay, busy, BULK_ROWS)
    relay.start()
    far = ConsumerClient.connect(sock(relay))
    assert far.hello(consumer="far", filter=quiet, from_="stored")["resume_after"] == 0
    assert [c["id"] for c in far.collect(count=1, timeout=10)] == [1]
    far.ack(1)
    assert far.no_command(1.0)          # its catch-up walk is over by now

    before = cpu_seconds(relay.proc.pid)
    for i in range(50):                 # one commit each
        publish(mosquitto, busy, b"new %d" % i)
        relay.wait_count(BULK_ROWS + 2 + i)
    used = cpu_seconds(relay.proc.pid) - before
    assert used < 0.3, f"{used:.2f} s of CPU for 50 commands ({used / 50 * 1000:.1f} ms each)"

    publish(mosquitto, quiet, b"for far")
    got = far.collect(count=1, timeout=10)
    assert [(c["id"], c["payload"]) for c in got] == [(BULK_ROWS + 52, "for far")]
    relay.stop()
