"""What cmdrelayctl status, stats and systemd's STATUS= say (issue 16): today's
counts from the history since the local midnight (not the UTC one, and not
only since the daemon started), the status facts on the STATUS= line, and
times shown in local time with their offset, or in UTC with --utc."""
import datetime
import json
import re
import sqlite3
import subprocess
import time

import pytest

from brokers import publish
from consumer_client import ConsumerClient
from relay import CMDRELAYCTL, Relay

DAY_MS = 86_400_000


def ctl(*args):
    return subprocess.run([str(CMDRELAYCTL), *map(str, args)], capture_output=True, text=True, timeout=30)


def ok(r):
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr}"
    return r.stdout


def iso_utc(ms):
    t = datetime.datetime.fromtimestamp(ms // 1000, datetime.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S") + f".{ms % 1000:03d}Z"


@pytest.fixture
def noon(monkeypatch):
    """A fixed zone in which it is about noon now, so that its midnight lies
    hours away from both now and UTC midnight; set as TZ for the daemon and
    cmdrelayctl. Returns its offset east of UTC in hours."""
    hours = 12 - time.gmtime().tm_hour
    monkeypatch.setenv("TZ", f"<X{hours:+03d}>{-hours:+d}")    # POSIX: the sign is west
    return hours


def insert(db_path, rows):
    """rows: (received_at, status, reason, duplicate_of); returns their ids."""
    db = sqlite3.connect(db_path)
    ids = []
    with db:
        for at, status, reason, dup_of in rows:
            cur = db.execute("INSERT INTO messages (received_at, age_ms, topic, payload, payload_hash, qos,"
                             " retain, dup, mid, connection, status, reason, duplicate_of)"
                             " VALUES (?1, ?1, '/old/set', x'6f6c64', 0, 1, 0, 0, 1, 1, ?2, ?3, ?4)",
                             (at, status, reason, ids[dup_of] if dup_of is not None else None))
            ids.append(cur.lastrowid)
    db.close()
    return ids


def test_today_counts_come_from_the_history_since_local_midnight(mosquitto, uid, tmp_path, noon):
    topic = f"/td/{uid}/set"
    relay = Relay(tmp_path / "relay", mosquitto, f"td-{uid}", [topic])
    relay.start(wait_subscribed=False)
    relay.stop()
    now = int(time.time() * 1000)
    midnight = now - (now + noon * 3_600_000) % DAY_MS
    insert(relay.db_path, [
        (midnight - 1000, "accepted", None, None),          # 0: yesterday, just
        (midnight - 500, "duplicate", "redelivery", 0),     # 1: yesterday
        (midnight + 1000, "accepted", None, None),          # 2: today, just
        (now - 60_000, "accepted", "possible_repeat", 2),   # 3
        (now - 30_000, "duplicate", "retained_replay", 2),  # 4
    ])
    want = {"since": iso_utc(midnight), "received": 3 + 2, "accepted": 2 + 2, "duplicates": 1,
            "possible_repeats": 1}
    sock = relay.workdir / "cmdrelay.sock"
    relay.start()
    try:
        for i in range(2):
            publish(mosquitto, topic, f"new {i}".encode())
        relay.wait_count(7)
        st = json.loads(ok(ctl("--socket", sock, "status", "--json")))
        assert st["today"] == want and st["received"] == 2, st
        stats = json.loads(ok(ctl("--socket", sock, "stats", "--json")))
        assert stats["today"] == want and stats["accepted"] == 2, stats
        text = ok(ctl("--socket", sock, "--utc", "status"))
        assert (f"today:       5 received, 4 accepted, 1 duplicates, 1 possible repeats (since "
                f"{iso_utc(midnight)})") in text, text
        assert "since start: 2 received, 2 accepted" in text, text
        # an inject is a command of today as well
        ok(ctl("--socket", sock, "inject", topic, "by hand"))
        st = json.loads(ok(ctl("--socket", sock, "status", "--json")))
        assert (st["today"]["received"], st["today"]["accepted"]) == (6, 5), st["today"]
    finally:
        relay.stop()
    # the daemon is down: stats counts the same day from the history
    r = ctl("--db", relay.db_path, "--socket", sock, "stats", "--json")
    assert json.loads(ok(r))["today"] == dict(want, received=6, accepted=5)


def test_status_line_carries_the_status_facts(mosquitto, uid, tmp_path):
    """systemd's STATUS= (read here from NOTIFY_SOCKET, as systemd reads it):
    connected to what, since when, the session, today's and start's counts,
    the consumers connected and behind, updated when they change."""
    topic = f"/sl/{uid}/set"
    relay = Relay(tmp_path / "relay", mosquitto, f"sl-{uid}", [topic])
    relay.start()
    try:
        where = f"{mosquitto.host}:{mosquitto.port}"
        since = json.loads(ok(ctl("-c", relay.conf_path, "stats", "--json")))["broker"]["connected_since"]
        with ConsumerClient.connect(str(relay.workdir / "cmdrelay.sock")) as app:
            app.hello(consumer="app", filter=topic)
            publish(mosquitto, topic, b"one")
            relay.wait_count(1)
            relay.wait_for(lambda: relay.notify.seen("STATUS=")[-1] ==
                           f"STATUS=connected to {where}; since {since}, session new; today 1 accepted,"
                           " 0 duplicates, 0 possible repeats; since start 1 received, 1 accepted;"
                           " consumers 1/1 connected, 1 behind", 10,
                           "the STATUS line with every fact")
        # the consumer left without acknowledging: seen within the refresh, no relay event needed
        relay.wait_for(lambda: relay.notify.seen("STATUS=")[-1].endswith("; consumers 0/1 connected, 1 behind"),
                       10, "the consumer gone")
        mosquitto.stop()
        relay.wait_for(lambda: re.match(rf"STATUS=disconnected from {re.escape(where)} \(.+\); today 1 accepted",
                                        relay.notify.seen("STATUS=")[-1]), 10, "disconnected")
        mosquitto.start()
        relay.wait_log("subscriptions in place")
        # this broker keeps no sessions over a restart: the alarm stays on the line
        relay.wait_for(lambda: re.match(rf"STATUS=connected to {re.escape(where)}; since 20\S+, session new;"
                                        r" SESSION LOST: [^;]+; today 1 accepted",
                                        relay.notify.seen("STATUS=")[-1]), 10,
                       "reconnected")
        # one short line, sent only when it changed
        statuses = relay.notify.seen("STATUS=")
        assert all(len(s) < 300 and "\n" not in s for s in statuses), statuses
        assert all(a != b for a, b in zip(statuses, statuses[1:])), statuses
    finally:
        relay.stop()


def ms_of(iso):
    return int(datetime.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)


def test_times_for_people_are_local_with_their_offset_or_utc(mosquitto, uid, tmp_path, monkeypatch):
    """history, tail and status print local time with its offset (summer
    time too), --utc prints UTC with Z; JSON is UTC either way."""
    monkeypatch.setenv("TZ", "Europe/Berlin")
    relay = Relay(tmp_path / "relay", mosquitto, f"tz-{uid}", [f"/tz/{uid}/set"])
    relay.start(wait_subscribed=False)
    relay.stop()
    winter, summer = "2026-12-02T02:04:05.123Z", "2026-07-01T12:00:00.000Z"
    insert(relay.db_path, [(ms_of(winter), "accepted", None, None), (ms_of(summer), "accepted", None, None)])
    local = ["2026-12-02T03:04:05.123+01:00", "2026-07-01T14:00:00.000+02:00"]

    def column(*args):
        return [ln.split()[1] for ln in ok(ctl("--db", relay.db_path, *args)).splitlines()[1:]]
    assert column("history") == local
    assert column("history", "--utc") == column("--utc", "history") == [winter, summer]
    assert [json.loads(ln)["received_at"] for ln in
            ok(ctl("--db", relay.db_path, "history", "--json")).splitlines()] == [winter, summer]

    relay.start(wait_subscribed=False)
    try:
        sock = relay.workdir / "cmdrelay.sock"
        for utc, want in (([], local), (["--utc"], [winter, summer])):
            p = subprocess.Popen([str(CMDRELAYCTL), "--socket", str(sock), *utc, "tail", "--from", "0"],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            try:
                assert [p.stdout.readline().split()[1] for _ in want] == want
            finally:
                p.kill()
                p.wait(10)
        started = json.loads(ok(ctl("--socket", sock, "status", "--json")))["started_at"]
        assert started.endswith("Z")
        shown = re.search(r"\(started (\S+)\)", ok(ctl("--socket", sock, "status"))).group(1)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+0[12]:00", shown), shown
        assert ms_of(shown) == ms_of(started)
        assert f"(started {started})" in ok(ctl("--socket", sock, "status", "--utc"))
    finally:
        relay.stop()
