"""Retention (store.retention): bounded history, kept rows, and a loop that
ingestion does not wait for. Real daemon, real Mosquitto."""
import os
import sqlite3
import time

from brokers import drop_session, publish, publish_many
from consumer_client import ConsumerClient
from relay import Relay

ROWS = 200_000
MAX_ROWS = 1000


def db_bytes(relay):
    """The database file alone: the WAL is bounded separately, and its size
    depends on when the last checkpoint ran."""
    return os.path.getsize(relay.db_path)


def wal_bytes(relay):
    wal = f"{relay.db_path}-wal"
    return os.path.getsize(wal) if os.path.exists(wal) else 0


def test_max_rows_bounds_the_history(mosquitto, tmp_path, uid):
    """200,000 commands with max_rows 1000: every one is accepted, the
    history ends near 1000 rows, the file stops growing, and no pruning
    slice held the loop for long."""
    topic = f"/cf/v1/AAA/012C/{uid}/set"
    keep = f"/cf/v1/AAA/012C/{uid}-keep/set"
    relay = Relay(tmp_path / "relay", mosquitto, f"gateway-{uid}", [topic, keep],
                  store={"path": str(tmp_path / "relay" / "history.db"),
                         "retention": {"max_rows": MAX_ROWS, "max_age": "90d"}})
    relay.start()
    # A consumer that has not acknowledged its command keeps it.
    publish(mosquitto, keep, b"needed by lamp 1")
    publish(mosquitto, keep, b"needed by lamp 2")
    relay.wait_count(2)
    lamp = ConsumerClient.connect(str(relay.workdir / "cmdrelay.sock"))
    lamp.hello(consumer="lamp", filter=keep)
    assert [c["payload"] for c in lamp.collect(count=2, timeout=10)] == \
        ["needed by lamp 1", "needed by lamp 2"]

    # 20 chunks of 10,000, each followed by retention catching up: once it
    # holds, the freed pages are reused and the files stop growing.
    sizes = []
    for start in range(0, ROWS, 10_000):
        publish_many(mosquitto, topic, [b"c%06d" % i for i in range(start, start + 10_000)])
        last = start + 10_000 + 2
        relay.wait_for(lambda: relay.query("SELECT max(id) FROM messages")[0][0] == last,
                       120, f"row id {last}")
        relay.wait_for(lambda: relay.count() <= MAX_ROWS + 2, 60, "pruning down to max_rows")
        sizes.append(db_bytes(relay))
        # journal_size_limit (8 MiB) caps the WAL after each checkpoint.
        assert wal_bytes(relay) <= 9 * 1024 * 1024

    rows = relay.query("SELECT id, status, payload FROM messages ORDER BY id")
    ids = [r[0] for r in rows]
    assert all(status == "accepted" for _, status, _ in rows)
    # The newest max_rows rows and lamp's two unacknowledged commands.
    assert [bytes(p) for _, _, p in rows[:2]] == [b"needed by lamp 1", b"needed by lamp 2"]
    assert ids == [1, 2] + list(range(ROWS + 3 - MAX_ROWS, ROWS + 3))
    print(f"\nhistory bytes after each 10,000 commands: {sizes}")
    assert max(sizes[5:]) <= max(sizes[:5]) * 1.1, sizes
    stats = lamp.stats()
    assert stats["retention"]["pruned"] == ROWS - MAX_ROWS
    # Pruned in small transactions (BATCH_MAX in daemon/retention.c), never
    # in one big DELETE. The slices' wall time depends on the machine's load
    # and disk; it is printed, and only a pathological value fails.
    assert 0 < stats["retention"]["largest_batch"] <= 4096, stats["retention"]
    print(f"longest retention slice: {stats['retention']['longest_slice_ms']} ms")
    assert stats["retention"]["longest_slice_ms"] < 2000, stats["retention"]

    # Acknowledged, the first goes; the second stays as its topic's newest
    # command, the one a retained replay would repeat.
    lamp.ack(2)
    relay.wait_for(lambda: relay.count("id = 1") == 0, 10, "row 1 pruned after the ack")
    assert relay.count("id = 2") == 1
    lamp.close()
    relay.stop()


def test_max_age_keeps_each_topics_newest_command(mosquitto, tmp_path, uid):
    """Rows older than max_age go, acknowledged or not, except each topic's
    newest accepted command: a retained replay of it must stay a duplicate."""
    a, b = f"/cf/v1/AAA/012C/{uid}-a/set", f"/cf/v1/AAA/012C/{uid}-b/set"
    relay = Relay(tmp_path / "relay", mosquitto, f"gateway-{uid}", [a, b],
                  store={"path": str(tmp_path / "relay" / "history.db"),
                         "retention": {"max_age": "1h", "max_rows": 10000}})
    relay.start()
    for p in (b"a1", b"a2", b"a3"):
        publish(mosquitto, a, p)
    publish(mosquitto, b, b"b1", retain=True)
    relay.wait_count(4)
    # Age the first four rows by two hours on the age clock, as if time had passed.
    db = sqlite3.connect(relay.db_path, timeout=10)
    db.execute("UPDATE messages SET received_at = received_at - 7200 * 1000, age_ms = age_ms - 7200 * 1000")
    db.commit()
    db.close()
    publish(mosquitto, a, b"a4")
    # a1, a2 and a3 are older than max_age; a3 is not a's newest any more
    # (a4 is), while b1 stays as b's newest command.
    relay.wait_for(lambda: relay.count() == 2, 10, "the old rows pruned")
    assert [bytes(p) for (p,) in relay.query("SELECT payload FROM messages ORDER BY id")] == [b"b1", b"a4"]

    # The broker forgets the session: the relay subscribes again, b1 is
    # replayed, and the kept row makes it a duplicate, not a new command.
    relay.stop()
    drop_session(mosquitto, f"gateway-{uid}")
    relay.start()
    relay.wait_count(3)
    time.sleep(0.5)
    last = relay.rows()[-1]
    assert (bytes(last["payload"]), last["status"], last["reason"]) == (b"b1", "duplicate", "retained_replay")
    relay.stop()
