"""Schema migrations on an existing history: the daemon migrates on start and
keeps every row, id and the AUTOINCREMENT sequence (consumers' cursors)."""
import sqlite3
import time

from brokers import free_port
from relay import ROOT, Relay


class NoBroker:
    """Nothing listens here: the relay starts and keeps trying."""
    host = "127.0.0.1"
    packet_ids = "kept"

    def __init__(self):
        self.port = free_port()


def test_v5_history_migrates_to_v6(tmp_path):
    """Issue 11 rebuilt `messages` to allow reason 'possible_repeat': a
    version 5 history with rows, a duplicate, a consumer and a sequence above
    the newest row (retention removed it) comes through unchanged."""
    relay = Relay(tmp_path / "relay", NoBroker(), "gateway-mig", ["/cf/v1/AAA/012C/dev/set"])
    db = sqlite3.connect(relay.db_path)
    for n in range(1, 6):
        db.executescript(next((ROOT / "sql").glob(f"{n:03d}_*.sql")).read_text())
    db.execute("PRAGMA user_version = 5")
    rows = [(1, "accepted", None, None), (2, "duplicate", "redelivery", 1), (3, "accepted", None, None)]
    for id_, status, reason, of in rows:
        db.execute("INSERT INTO messages (id, received_at, topic, payload, payload_hash, qos, retain,"
                   " dup, mid, connection, status, reason, duplicate_of, device)"
                   " VALUES (?, 1000, '/cf/v1/AAA/012C/dev/set', x'6f6e', 7, 1, 0, 0, ?, 1, ?, ?, ?, 'dev')",
                   (id_, id_, status, reason, of))
    db.execute("DELETE FROM messages WHERE id = 3")           # pruned: the sequence stays at 3
    # used recently: socket.cursor_expiry (90 days) would remove a cursor unused since 1970
    db.execute("INSERT INTO consumers VALUES ('app', '#', 1, ?)", (int(time.time() * 1000),))
    db.commit()
    db.close()

    relay.start(wait_subscribed=False)
    relay.stop()
    db = sqlite3.connect(relay.db_path)
    assert db.execute("PRAGMA user_version").fetchone()[0] >= 6
    assert db.execute("SELECT id, status, reason, duplicate_of FROM messages ORDER BY id").fetchall() == \
        [r for r in rows if r[0] != 3]
    assert db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messages'").fetchone() == (3,)
    assert db.execute("SELECT name, acked_id FROM consumers").fetchall() == [("app", 1)]
    # the views still read the rebuilt table, and the new reason is allowed
    assert db.execute("SELECT count(*) FROM commands").fetchone() == (1,)
    assert db.execute("SELECT possible_repeats FROM device_daily").fetchone() == (0,)
    db.execute("INSERT INTO messages (received_at, topic, payload, payload_hash, qos, retain, dup, mid,"
               " connection, status, reason, duplicate_of) VALUES (2000, 't', x'6f6e', 7, 1, 0, 1, 4, 2,"
               " 'accepted', 'possible_repeat', 1)")
    assert db.execute("SELECT max(id) FROM messages").fetchone() == (4,)
    for bad in (("accepted", "redelivery", 1), ("duplicate", "possible_repeat", 1), ("accepted", "possible_repeat", None)):
        try:
            db.execute("INSERT INTO messages (received_at, topic, payload, payload_hash, qos, retain, dup,"
                       " mid, connection, status, reason, duplicate_of) VALUES (1, 't', x'00', 0, 1, 0, 0, 0,"
                       " 1, ?, ?, ?)", bad)
        except sqlite3.IntegrityError:
            continue
        raise AssertionError(f"the schema let {bad} in")
    db.close()
