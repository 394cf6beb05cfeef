"""A history damaged on a worn SD card (issue 19): found at start, moved
aside, salvaged into a fresh history, and shown until an admin clears it.
Each test damages a stopped relay's history.db, starts it, publishes and
checks that nothing new was acknowledged into the damaged file, that the
fresh history holds every new command, that a named consumer resumes from
its carried-over cursor with every salvaged and new command in order, and
that log, STATUS, stats and metrics say so."""
import hashlib
import pwd
import random
import re
import sqlite3
import subprocess

import pytest

from brokers import publish_many
from consumer_client import ConsumerClient
from relay import CMDRELAYCTL, CMDRELAYD, Relay
from test_commit_before_ack import assert_checks_passed, payloads, setup  # noqa: F401 (a fixture)
from test_metrics import read_metrics

OLD = 600          # commands in the history before the damage
ACKED = 100        # the consumer acknowledged these
NEW = 20           # published after the damage


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _damage_pages(db):
    """1,000 random bytes into each of three pages in the middle, as on the SD card."""
    data = bytearray(db.read_bytes())
    page = int.from_bytes(data[16:18], "big") or 65536
    pages = len(data) // page
    rnd = random.Random(19)
    for p in (pages // 2 - 1, pages // 2, pages // 2 + 1):
        off = p * page + 100
        data[off:off + 1000] = rnd.randbytes(1000)
    db.write_bytes(bytes(data))


def _truncate(db):
    """The file cut at two thirds, on a page boundary (a write that never reached the card)."""
    data = db.read_bytes()
    page = int.from_bytes(data[16:18], "big") or 65536
    db.write_bytes(data[:(len(data) * 2 // 3) // page * page])


DAMAGE = {"pages": _damage_pages, "truncated": _truncate}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_history_is_recovered(mosquitto, tmp_path, uid, kind):
    topic = f"/cf/v1/AAA/012C/{uid}/set"
    prom = tmp_path / "cmdrelay.prom"
    relay = Relay(tmp_path / "relay", mosquitto, f"gateway-{uid}", [topic],
                  metrics={"textfile": str(prom), "interval": "1s"})
    relay.start()
    publish_many(mosquitto, topic, [b"old-%04d-" % i + b"x" * 190 for i in range(OLD)])
    relay.wait_count(OLD)
    with ConsumerClient.connect(str(relay.workdir / "cmdrelay.sock")) as lamp:
        lamp.hello(consumer="lamp", filter="#")
        got = lamp.collect(count=ACKED, timeout=20)
        lamp.ack(got[-1]["id"])
        lamp.stats()
    before = {r["id"]: r["payload"] for r in relay.accepted()}
    acked = got[-1]["id"]
    relay.stop()
    assert not (relay.db_path.parent / "history.db-wal").exists() or \
        (relay.db_path.parent / "history.db-wal").stat().st_size == 0

    DAMAGE[kind](relay.db_path)
    damaged = _sha(relay.db_path)

    relay.start()
    publish_many(mosquitto, topic, [b"new-%02d" % i for i in range(NEW)])
    relay.wait_for(lambda: relay.count("CAST(payload AS TEXT) LIKE 'new-%'") >= NEW, 30, "the new commands")
    log = relay.log(since_start=True)

    # The damaged file is kept aside unchanged: nothing acknowledged into it.
    aside = [p for p in relay.db_path.parent.iterdir() if re.fullmatch(r"history\.db\.corrupt-\d{8}T\d{6}Z", p.name)]
    assert len(aside) == 1, f"no history.db.corrupt-<time> beside {relay.db_path}; log:\n{log}"
    assert _sha(aside[0]) == damaged, "the damaged file was written to after the start"

    # The fresh history holds every new command, numbered after every old id.
    fresh = relay.accepted()
    new = [r for r in fresh if r["payload"].startswith(b"new-")]
    assert [r["payload"] for r in new] == [b"new-%02d" % i for i in range(NEW)]
    assert min(r["id"] for r in new) > max(before)

    # The alarm (log_errx) in the log, with the lost ranges.
    alarm = [ln for ln in log.splitlines() if "history was corrupt" in ln]
    assert alarm, f"no alarm in the log:\n{log}"
    m = re.search(r"salvaged (\d+) consumer cursors, (\d+) session subscriptions, (\d+) accepted"
                  r" commands of ids (\d+)-(\d+), \d+ the broker may redeliver; lost ids: ([^;]*);", alarm[0])
    assert m, alarm[0]
    assert int(m.group(1)) == 1 and int(m.group(2)) == 1, alarm[0]
    assert int(m.group(4)) == acked + 1 and int(m.group(5)) == max(before), alarm[0]
    lost = set()
    for part in m.group(6).split(","):
        if part != "none":
            a, _, b = part.partition("-")
            lost.update(range(int(a), int(b or a) + 1))
    salvaged = {r["id"]: r["payload"] for r in fresh if not r["payload"].startswith(b"new-")}
    assert len(salvaged) == int(m.group(3))
    # Every unacknowledged old command is either carried over intact or named as lost.
    for i in (i for i in before if i > acked):
        assert (i in salvaged and salvaged[i] == before[i]) or i in lost, f"id {i} neither salvaged nor reported lost"
    assert not any(i <= acked for i in salvaged), "acknowledged commands were carried over"
    print(f"\n{kind}: {alarm[0]}")

    relay.wait_for(lambda: any("recovered from corruption" in s for s in relay.notify.seen("STATUS=")),
                   10, "STATUS naming the recovery")
    relay.wait_for(lambda: prom.exists() and
                   read_metrics(prom).get(("cmdrelay_store_corruptions_total", ())) == 1, 10,
                   "cmdrelay_store_corruptions_total 1")

    # The consumer resumes from its carried-over cursor: salvaged then new, in order.
    with ConsumerClient.connect(str(relay.workdir / "cmdrelay.sock")) as lamp:
        welcome = lamp.hello(consumer="lamp", filter="#")
        assert welcome["resume_after"] == acked
        got = lamp.collect(count=len(salvaged) + NEW, timeout=20, ack_every=50)
        ids = [g["id"] for g in got]
        assert ids == sorted(salvaged) + [r["id"] for r in new]
        stats = lamp.stats()
    assert stats["store_corruptions"] == 1 and "moved aside to" in stats["store_corruption"]
    assert stats["store_corrupt"] is False

    # The admin has seen it: the alarm goes, and stays gone after a restart.
    ack = subprocess.run([str(CMDRELAYCTL), "-c", str(relay.conf_path), "store", "ack-corruption"],
                         capture_output=True, text=True, timeout=10)
    assert ack.returncode == 0 and "acknowledged (1 recoveries)" in ack.stdout, ack
    relay.restart()
    with ConsumerClient.connect(str(relay.workdir / "cmdrelay.sock")) as c:
        stats = c.stats()
    assert stats["store_corruptions"] == 0 and stats["store_corruption"] == ""
    relay.wait_for(lambda: read_metrics(prom).get(("cmdrelay_store_corruptions_total", ())) == 0, 10,
                   "cmdrelay_store_corruptions_total 0")
    assert "history was corrupt" not in relay.log(since_start=True)
    relay.stop()


def test_damage_while_running_is_told_and_recovered(mosquitto, tmp_path, uid):
    """Pages overwritten under a running relay. SQLite notices only when it
    reads a damaged page from the file: pages in its cache (or newer copies
    in the WAL) hide the damage until another connection's write makes it
    drop the cache. Here the test checkpoints, damages, writes one meta row,
    and a consumer reads from the start: it gets history_corrupt, the relay
    commits nothing more and exits 1; the restart recovers the history and
    the consumer resumes from its cursor with every new command."""
    topic = f"/cf/v1/AAA/012C/{uid}/set"
    relay = Relay(tmp_path / "relay", mosquitto, f"gateway-{uid}", [topic])
    relay.start()
    publish_many(mosquitto, topic, [b"old-%04d-" % i + b"x" * 190 for i in range(OLD)])
    relay.wait_count(OLD)
    with ConsumerClient.connect(str(relay.workdir / "cmdrelay.sock")) as lamp:
        lamp.hello(consumer="lamp", filter="#")
        lamp.ack(lamp.collect(count=1, timeout=10)[-1]["id"])
        lamp.stats()
    db = sqlite3.connect(str(relay.db_path), timeout=10)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    _damage_pages(relay.db_path)
    db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('test', 'drop the cache')")
    db.commit()
    db.close()

    with ConsumerClient.connect(str(relay.workdir / "cmdrelay.sock")) as lamp:
        # The hello writes the cursor: where the damage lies (the file's
        # layout differs from run to run) it may be the hello that hits it.
        lamp.send_json({"op": "hello", "consumer": "lamp", "filter": "#"})
        lines = []
        while True:
            msg = lamp.recv_json(10)
            assert msg is not None, f"no error line; got {len(lines)} commands"
            if msg.get("type") == "error":
                break
            if msg.get("type") == "command":
                lines.append(msg)
    assert msg["code"] == "history_corrupt", msg
    assert relay.proc.wait(15) == 1
    relay.proc = None
    relay.notify.close()
    assert "is corrupt" in relay.log() and "exiting so that the restart" in relay.log()

    publish_many(mosquitto, topic, [b"new-%02d" % i for i in range(NEW)])
    relay.start()
    relay.wait_for(lambda: relay.count("CAST(payload AS TEXT) LIKE 'new-%'") >= NEW, 30, "the new commands")
    aside = sorted(relay.db_path.parent.glob("history.db.corrupt-*[0-9]Z"))
    assert len(aside) == 1
    # The damaged file took no new command (only SQLite's own WAL checkpoint may touch it).
    old = sqlite3.connect(f"file:{aside[0]}?mode=ro", uri=True)
    assert old.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messages'").fetchone()[0] == OLD
    old.close()
    with ConsumerClient.connect(str(relay.workdir / "cmdrelay.sock")) as lamp:
        assert lamp.hello(consumer="lamp", filter="#")["resume_after"] == 1
        got = lamp.collect(quiet=1.0, timeout=20, ack_every=50)
    payloads = [g["payload"] for g in got]
    assert payloads[-NEW:] == ["new-%02d" % i for i in range(NEW)]
    ids = [g["id"] for g in got]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    print(f"\nwhile running: {len(lines)} commands before the error, {len(got) - NEW} salvaged after; "
          f"{[ln for ln in relay.log(since_start=True).splitlines() if 'history was corrupt' in ln][0][-200:]}")
    relay.stop()


def test_stop_mode_leaves_the_damaged_file_for_an_admin(mosquitto, tmp_path, uid):
    """store.on_corruption: stop: the relay refuses to start (exit 1) with
    a message saying what to do, and leaves the file exactly as it was."""
    topic = f"/cf/v1/AAA/012C/{uid}/set"
    relay = Relay(tmp_path / "relay", mosquitto, f"gateway-{uid}", [topic], store__on_corruption="stop")
    relay.start()
    publish_many(mosquitto, topic, [b"old-%04d-" % i + b"x" * 190 for i in range(OLD)])
    relay.wait_count(OLD)
    relay.stop()
    _damage_pages(relay.db_path)
    damaged = _sha(relay.db_path)
    p = subprocess.run([str(CMDRELAYD), "-c", str(relay.conf_path)], capture_output=True, text=True,
                       timeout=20)
    assert p.returncode == 1, p
    assert "store.on_corruption is stop" in p.stderr and str(relay.db_path) in p.stderr, p.stderr
    assert _sha(relay.db_path) == damaged
    assert not list(relay.db_path.parent.glob("history.db.corrupt-*"))


def test_store_op_is_for_admins_and_checks_its_action(mosquitto, tmp_path, uid, sockdir):
    """Only root and the daemon's user clear the alarm; a wrong action is a
    bad_request naming the one there is; with no alarm it acknowledges 0."""
    sock = str(sockdir / "cmdrelay.sock")
    relay = Relay(tmp_path / "relay", mosquitto, f"gateway-{uid}", [f"/cf/v1/AAA/012C/{uid}/set"],
                  socket__mode="0666", socket__path=sock)
    relay.start()
    nobody = pwd.getpwnam("nobody")
    r = subprocess.run(["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups",
                        str(CMDRELAYCTL), "--socket", sock, "store", "ack-corruption"],
                       capture_output=True, text=True, timeout=10)
    assert r.returncode == 1 and "not_allowed: store: only root or uid 0 may acknowledge" in r.stderr, r.stderr
    with ConsumerClient.connect(sock) as c:
        c.send_json({"op": "store", "action": "repair"})
        err = c.expect("error")
        assert err["code"] == "bad_request" and "ack-corruption" in err["message"], err
        c.send_json({"op": "store", "action": "ack-corruption"})
        assert c.expect("store") == {"type": "store", "acknowledged": 0}
    relay.stop()


def _lost_ids(line):
    m = re.search(r"lost ids: ([^;]*);", line)
    assert m, line
    lost = set()
    for part in m.group(1).split(","):
        if part != "none":
            a, _, b = part.partition("-")
            lost.update(range(int(a), int(b or a) + 1))
    return lost


def test_torn_wal_is_found_by_the_acknowledged_ids(mosquitto, tmp_path, uid):
    """A WAL that ends inside a frame is what every crash during a commit
    leaves, and SQLite silently drops a WAL from its first bad frame on: a
    torn WAL as such is no sign of damage. What is: commands the relay
    acknowledged to the broker missing from the history. The PUBACK mark
    says how far the acknowledgements went; a history that ends before it
    lost committed transactions, and is recovered as damaged, with the lost
    ids named and never given out again."""
    topic = f"/cf/v1/AAA/012C/{uid}/set"
    relay = Relay(tmp_path / "relay", mosquitto, f"gateway-{uid}", [topic])
    relay.start()
    publish_many(mosquitto, topic, [b"old-%04d" % i for i in range(OLD)])
    relay.wait_count(OLD)
    with ConsumerClient.connect(str(relay.workdir / "cmdrelay.sock")) as lamp:
        lamp.hello(consumer="lamp", filter="#")
        lamp.ack(lamp.collect(count=ACKED, timeout=20)[-1]["id"])
        lamp.stats()
    db = sqlite3.connect(str(relay.db_path), timeout=10)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")     # the first OLD are in the file itself
    db.close()
    publish_many(mosquitto, topic, [b"tail-%02d" % i for i in range(NEW)])
    relay.wait_count(OLD + NEW)
    relay.kill()
    wal = relay.db_path.parent / "history.db-wal"
    assert wal.stat().st_size > 32 + 24 + 4096, "the last commits are not in the WAL"
    with open(wal, "r+b") as f:                       # torn inside its first frame
        f.truncate(32 + 24 + 100)

    relay.start()
    publish_many(mosquitto, topic, [b"new-%02d" % i for i in range(NEW)])
    relay.wait_for(lambda: relay.count("CAST(payload AS TEXT) LIKE 'new-%'") >= NEW, 30, "the new commands")
    log = relay.log(since_start=True)
    alarm = [ln for ln in log.splitlines() if "history was corrupt" in ln]
    assert alarm and f"the history ends at #{OLD}, but commands up to #{OLD + NEW} were acknowledged" in alarm[0], log
    assert set(range(OLD + 1, OLD + NEW + 1)) <= _lost_ids(alarm[0]), alarm[0]
    new = [r for r in relay.accepted() if r["payload"].startswith(b"new-")]
    assert [r["payload"] for r in new] == [b"new-%02d" % i for i in range(NEW)]
    assert min(r["id"] for r in new) > OLD + NEW, "an id handed out before the tear was given again"
    assert len(list(relay.db_path.parent.glob("history.db.corrupt-*[0-9]Z"))) == 1
    with ConsumerClient.connect(str(relay.workdir / "cmdrelay.sock")) as lamp:
        assert lamp.hello(consumer="lamp", filter="#")["resume_after"] == ACKED
        got = lamp.collect(count=OLD - ACKED + NEW, timeout=20, ack_every=50)
        stats = lamp.stats()
    assert [g["payload"] for g in got] == ["old-%04d" % i for i in range(ACKED, OLD)] + \
        ["new-%02d" % i for i in range(NEW)]
    assert stats["store_corruptions"] == 1
    relay.stop()

    # A clean restart of the recovered history is no new recovery: its new mark fits it.
    relay.start()
    relay.stop()
    assert len(list(relay.db_path.parent.glob("history.db.corrupt-*[0-9]Z"))) == 1, relay.log(since_start=True)


def _damage_an_index(db_path):
    """Garbage over one page of an index of messages: quick_check finds it,
    while every row stays readable by its id."""
    db = sqlite3.connect(str(db_path))
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page = db.execute("PRAGMA page_size").fetchone()[0]
    pageno = db.execute("SELECT pageno FROM dbstat WHERE name IN (SELECT name FROM sqlite_schema"
                        " WHERE type = 'index' AND tbl_name = 'messages') ORDER BY pageno LIMIT 1").fetchone()[0]
    db.close()
    with open(db_path, "r+b") as f:
        f.seek((pageno - 1) * page)
        f.write(random.Random(19).randbytes(page))


def test_redeliveries_are_still_recognised_after_a_recovery(setup):
    """The broker still holds, unacknowledged, the last messages of the
    connection the relay died on. The history is found damaged at the
    restart and recovered: the redelivery candidates come along with their
    rows, so the broker's DUP=1 redeliveries are recorded as duplicates, not
    accepted and delivered a second time."""
    broker, relay, conn = setup
    first = [(mid, p) for mid, p in zip(range(1, 11), payloads("rc", 10))]
    conn.answer_barriers = False        # the relay cannot know its PUBACKs arrived
    conn.send_burst(first)
    conn.wait_pubacks(10)
    assert_checks_passed(conn, dict(first))
    originals = {bytes(r["payload"]): r["id"] for r in relay.rows()}
    relay.kill()
    _damage_an_index(relay.db_path)

    relay.start(wait_subscribed=False)
    conn2 = broker.wait_connection(1, timeout=15)
    assert conn2.session_present
    again = first[-3:]
    conn2.send_burst(again, dup=True)
    conn2.wait_pubacks(3)
    log = relay.log(since_start=True)
    alarm = [ln for ln in log.splitlines() if "history was corrupt" in ln]
    assert alarm and "integrity check" in alarm[0], log
    assert re.search(r"accepted commands of ids 1-10, (\d+) the broker may redeliver", alarm[0]), alarm[0]
    rows = relay.rows()
    assert [(bytes(r["payload"]), r["status"], r["reason"], r["duplicate_of"]) for r in rows[10:]] == \
        [(p, "duplicate", "redelivery", originals[p]) for _, p in again]
    assert relay.count("status = 'accepted'") == 10
