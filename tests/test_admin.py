"""The admin side on a known history: the views of sql/003_admin_views.sql,
every example query in sql/queries/*.sql run by the real `sqlite3` CLI, and
cmdrelayctl (history, consumers, stats, check-config, tail) with its exit
codes: 64 usage, 66 missing database, 69 socket unavailable, 78 config error.

The known history is made for real, once per module (fixture `known`): the
real cmdrelayd against a private Mosquitto (brokers.Mosquitto, the class
behind the `mosquitto` fixture, started here at module scope so that the
history is built once), three devices, commands published online and while
the relay is down, two lost broker sessions (brokers.drop_session) so that
the re-SUBSCRIBEs replay the retained commands, one PUBACK lost on the wire
(the PubackCutter proxy below) so that Mosquitto redelivers a command with
DUP=1, and four named consumers over the socket, two of which acknowledged
part of their commands.

After the relay stopped, the fixture rewrites messages.received_at (and
consumers.updated_at) to fixed times, so that grouping by UTC day is exact:
the first commands on 2026-11-02, the redelivery on 2026-11-03, the rest
"today" (20 minutes ago, and never before today's UTC midnight). Queries that
look at "now" (last 7 days, today) are computed against that; a run that
crosses UTC midnight between the fixture and a test may fail.
"""
import base64
import datetime
import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest

from brokers import BrokerStartError, Mosquitto, drop_session, publish
from consumer_client import ConsumerClient
from relay import CMDRELAYCTL, ROOT, Relay

QUERIES = ROOT / "sql" / "queries"
SHIPPED_CONF = ROOT / "conf" / "cmdrelay.yaml"
BAD_CONFIGS = sorted((ROOT / "tests" / "configs" / "bad").glob("*.yaml"))

EX_USAGE, EX_NOINPUT, EX_UNAVAILABLE, EX_CONFIG = 64, 66, 69, 78

A, B, C = "012C000003AX", "012C000003BX", "012C000003CX"
TA, TB, TC = (f"/cf/v1/AAA/012C/{d}/set" for d in (A, B, C))
TAO = f"/cf/v1/AAA/012C/{A}/ota"
SUBSCRIPTIONS = [TA, TB, TC, TAO]
CLIENT_ID = "gateway-admin-known"
LAMP_FILTER = "/cf/v1/AAA/012C/+/set"
OTA_FILTER = "/cf/v1/+/+/+/ota"
GHOST_FILTER = "/cf/v1/ZZZ/#"

# Every row of the known history, by name, in id order (the rows of one
# "replays" group arrive in the order the broker chooses; the fixture names
# them by topic and status):
# name: (topic, payload, status, reason, duplicate_of, retain, dup)
SPEC = {
    # phase 1, relay online (2026-11-02, one minute apart)
    "a_on": (TA, b"on", "accepted", None, None, 0, 0),
    "b_off": (TB, b"off", "accepted", None, None, 0, 0),       # published retained; RETAIN=0 when live
    "c_reboot": (TC, b"reboot", "accepted", None, None, 0, 0),
    "a_reboot1": (TA, b"reboot", "accepted", None, None, 0, 0),
    "a_reboot2": (TA, b"reboot", "accepted", None, None, 0, 0),   # same payload again: a command
    "a_fw": (TAO, b'{"fw":"1.2"}', "accepted", None, None, 0, 0),  # retained too
    "c_bin": (TC, b"\x00\xff\x10", "accepted", None, None, 0, 0),
    # phase 2, the PUBACK of b_dim lost: Mosquitto sends it again with DUP=1 (2026-11-03)
    "b_dim": (TB, b"dim", "accepted", None, None, 0, 0),
    "b_dim_redelivery": (TB, b"dim", "duplicate", "redelivery", "b_dim", 0, 1),
    # phase 3a, session lost, c_standby retained while no session: the SUBSCRIBE replays (today).
    # TB moved on to "dim" after "off": the "off" replay may be a repeat, so it is flagged.
    "b_off_replay1": (TB, b"off", "accepted", "possible_repeat", "b_off", 1, 0),
    "a_fw_replay1": (TAO, b'{"fw":"1.2"}', "duplicate", "retained_replay", "a_fw", 1, 0),
    "c_standby": (TC, b"standby", "accepted", None, None, 1, 0),
    # phase 3b, session lost again
    "b_off_replay2": (TB, b"off", "duplicate", "retained_replay", "b_off_replay1", 1, 0),
    "a_fw_replay2": (TAO, b'{"fw":"1.2"}', "duplicate", "retained_replay", "a_fw", 1, 0),
    "c_standby_replay": (TC, b"standby", "duplicate", "retained_replay", "c_standby", 1, 0),
    # phase 4, session kept: a_off queued while down, b_on online
    "a_off": (TA, b"off", "accepted", None, None, 0, 0),
    "b_on": (TB, b"on", "accepted", None, None, 0, 0),
}
NAMES = list(SPEC)
PUBLISHED_RETAINED = {"b_off", "a_fw"}   # phase 1 publications with retain=1 (and later c_standby)
PHASE1 = NAMES[:7]
REPLAYS1 = ["b_off_replay1", "a_fw_replay1", "c_standby"]
REPLAYS2 = ["b_off_replay2", "a_fw_replay2", "c_standby_replay"]
ACCEPTED = [n for n in NAMES if SPEC[n][2] == "accepted"]
DUPLICATES = [n for n in NAMES if SPEC[n][2] == "duplicate"]

DAY1, DAY2 = "2026-11-02", "2026-11-03"
# consumers.updated_at after the fixture (Unix ms -> '...T08:10:00.000Z')
CONSUMER_UPDATED = {"audit": "2026-11-02T08:11:00Z", "ghost": "2026-11-02T08:13:00Z",
                    "lamp": "2026-11-02T08:10:00Z", "ota": "2026-11-02T08:12:00Z"}


def device_of(topic):
    return topic.split("/")[5]


def ms_of(iso):
    return int(datetime.datetime.strptime(iso, "%Y-%m-%dT%H:%M:%SZ")
               .replace(tzinfo=datetime.timezone.utc).timestamp()) * 1000


def iso_ms(ms):
    """Unix ms as cmdrelay and the SQL views print it: 2026-11-02T08:00:00.123Z."""
    t = datetime.datetime.fromtimestamp(ms // 1000, datetime.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S") + f".{ms % 1000:03d}Z"


def day_of(ms):
    return datetime.datetime.fromtimestamp(ms // 1000, datetime.timezone.utc).strftime("%Y-%m-%d")


def shown(payload):
    """The payload as the view `deliveries` shows it."""
    if b"\x00" in payload or re.search(rb"[\x01-\x08\x0b\x0c\x0e-\x1f\x7f]", payload):
        return "hex:" + payload.hex().upper()
    return payload.decode()


# --------------------------------------------------------------------------
# a proxy that loses one PUBACK
# --------------------------------------------------------------------------

class PubackCutter:
    """TCP proxy between cmdrelayd and the broker. Once armed, it swallows the
    relay's next PUBACK and cuts both connections: the broker never learns
    that the relay has the message and redelivers it with DUP=1 when the
    relay reconnects (session present): a real `redelivery` duplicate."""

    packet_ids = "kept"     # it stands in for Mosquitto

    def __init__(self, host, port):
        self.target = (host, port)
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(8)
        self.lsock.settimeout(0.2)
        self.host, self.port = self.lsock.getsockname()
        self.armed = threading.Event()
        self.cut = threading.Event()
        self.closing = False
        self.socks = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def arm(self):
        self.cut.clear()
        self.armed.set()

    def _accept(self):
        while not self.closing:
            try:
                client, _ = self.lsock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            self.socks += [client, upstream]
            threading.Thread(target=self._up, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._down, args=(upstream, client), daemon=True).start()

    @staticmethod
    def _kill(*socks):
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _down(self, upstream, client):
        try:
            while True:
                data = upstream.recv(65536)
                if not data:
                    break
                client.sendall(data)
        except OSError:
            pass
        self._kill(client, upstream)

    def _up(self, client, upstream):
        """Relay -> broker, packet by packet (fixed header, remaining length)."""
        buf = b""
        try:
            while True:
                data = client.recv(65536)
                if not data:
                    break
                buf += data
                while True:
                    length, mult, pos = 0, 1, 1
                    while pos < len(buf) and pos <= 4:
                        length += (buf[pos] & 0x7F) * mult
                        mult *= 128
                        if not buf[pos] & 0x80:
                            break
                        pos += 1
                    else:
                        break           # the remaining length is not all here yet
                    end = pos + 1 + length
                    if len(buf) < end:
                        break
                    packet, buf = buf[:end], buf[end:]
                    if packet[0] >> 4 == 4 and self.armed.is_set():   # PUBACK
                        self.armed.clear()
                        self._kill(client, upstream)
                        self.cut.set()
                        return
                    upstream.sendall(packet)
        except OSError:
            pass
        self._kill(client, upstream)

    def close(self):
        self.closing = True
        self.lsock.close()
        self.thread.join(2)
        self._kill(*self.socks)


# --------------------------------------------------------------------------
# the known history
# --------------------------------------------------------------------------

class Known:
    """The populated history: paths, and each SPEC row's id and time."""

    def __init__(self, workdir, db, conf, ids, times, today):
        self.workdir, self.db, self.conf = workdir, db, conf
        self.ids, self.times, self.today = ids, times, today

    def id(self, name):
        return self.ids[name]

    def t(self, name):
        return iso_ms(self.times[name])

    def by_id(self, names):
        return sorted(names, key=self.id)

    def names_where(self, pred):
        return self.by_id([n for n in NAMES if pred(n, *SPEC[n])])

    def delivery(self, name):
        """A row of the view `deliveries` (and of device-deliveries-between.sql)."""
        topic, payload, status, reason, dup_of, retain, dup = SPEC[name]
        return {"id": self.id(name), "received": self.t(name), "device": device_of(topic),
                "topic": topic, "status": status, "reason": reason,
                "duplicate_of": self.id(dup_of) if dup_of else None,
                "retain": retain, "dup": dup, "payload": shown(payload)}

    def history_json(self, name):
        """A line of `cmdrelayctl history --json`."""
        topic, payload, status, reason, dup_of, retain, dup = SPEC[name]
        try:
            text, encoding = payload.decode("utf-8"), "utf8"
        except UnicodeDecodeError:
            text, encoding = base64.b64encode(payload).decode(), "base64"
        return {"id": self.id(name), "received_at": self.t(name), "topic": topic, "payload": text,
                "qos": 1, "retained": bool(retain), "dup": bool(dup), "status": status,
                "encoding": encoding, "reason": reason,
                "duplicate_of": self.id(dup_of) if dup_of else None, "device": device_of(topic)}


def _wait(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _populate(relay, mosq, proxy):
    sock = relay.workdir / "cmdrelay.sock"
    count = 0

    def pub(topic, payload, retain=False):
        nonlocal count
        publish(mosq, topic, payload, qos=1, retain=retain)
        count += 1
        relay.wait_count(count)     # one at a time: ids follow the publish order

    def acked(name, id_):
        _wait(lambda: relay.query("SELECT acked_id FROM consumers WHERE name = ?", (name,)) == [(id_,)],
              10, f"consumer {name} acked {id_}")

    def settle(n):
        relay.wait_count(n)
        time.sleep(1.0)                 # nothing else may come
        assert relay.count() == n, relay.rows()[n:]

    # phase 1: online; the first start subscribes
    relay.start()
    for name in PHASE1:
        topic, payload = SPEC[name][:2]
        pub(topic, payload, retain=name in PUBLISHED_RETAINED)

    # the named consumers
    with ConsumerClient.connect(sock) as c:
        c.hello(consumer="lamp", filter=LAMP_FILTER, from_="stored")
        got = c.collect(count=6, quiet=1.0, timeout=10)
        assert [g["payload"] for g in got] == ["on", "off", "reboot", "reboot", "reboot", "AP8Q"]
        c.ack(got[3]["id"])                                   # a_reboot1
        acked("lamp", got[3]["id"])
    with ConsumerClient.connect(sock) as c:
        c.hello(consumer="audit", filter="#", from_="stored")
        got = c.collect(count=7, quiet=1.0, timeout=10)
        assert len(got) == 7
        c.ack(got[-1]["id"])                                  # c_bin
        acked("audit", got[-1]["id"])
    with ConsumerClient.connect(sock) as c:
        c.hello(consumer="ota", filter=OTA_FILTER, from_="stored")
        got = c.collect(count=1, quiet=1.0, timeout=10)
        assert [g["payload"] for g in got] == ['{"fw":"1.2"}']   # never acked
    with ConsumerClient.connect(sock) as c:
        c.hello(consumer="ghost", filter=GHOST_FILTER, from_="stored")
        c.no_command(0.3)

    # phase 2: the PUBACK of b_dim is lost on the wire
    proxy.arm()
    pub(TB, b"dim")
    assert proxy.cut.wait(10), "the relay sent no PUBACK for b_dim"
    settle(count + 1)
    count += 1

    # phase 3: the broker loses the session twice; each start re-SUBSCRIBEs
    relay.stop()
    drop_session(mosq, CLIENT_ID)
    publish(mosq, TC, b"standby", qos=1, retain=True)     # no session: only the retained copy
    relay.start()
    count += 3
    settle(count)
    relay.stop()
    drop_session(mosq, CLIENT_ID)
    relay.start()
    count += 3
    settle(count)

    # phase 4: session kept; one command queued while down, one online
    relay.stop()
    publish(mosq, TA, b"off", qos=1)
    relay.start()
    count += 1
    settle(count)
    pub(TB, b"on")
    settle(count)
    relay.stop()


def _name_rows(rows):
    """SPEC name -> id, checking every row against SPEC."""
    assert len(rows) == len(SPEC), rows
    names = PHASE1 + ["b_dim", "b_dim_redelivery"]
    for group in (REPLAYS1, REPLAYS2):
        got = rows[len(names):len(names) + 3]
        key = {(SPEC[n][0], SPEC[n][2]): n for n in group}
        names += [key[(r["topic"], r["status"])] for r in got]
    names += ["a_off", "b_on"]
    ids = {n: r["id"] for n, r in zip(names, rows)}
    for n, r in zip(names, rows):
        topic, payload, status, reason, dup_of, retain, dup = SPEC[n]
        assert (r["topic"], bytes(r["payload"]), r["status"], r["reason"], r["duplicate_of"],
                r["retain"], r["dup"], r["qos"], r["device"]) == \
            (topic, payload, status, reason, ids.get(dup_of), retain, dup, 1, device_of(topic)), n
    return ids


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    base = tmp_path_factory.mktemp("admin")
    mosq = Mosquitto(base / "mosquitto")
    try:
        mosq.start()
    except BrokerStartError as e:
        pytest.fail(f"mosquitto failed to start:\n{e}", pytrace=False)
    proxy = PubackCutter(mosq.host, mosq.port)
    relay = Relay(base / "relay", proxy, CLIENT_ID, SUBSCRIPTIONS)
    try:
        _populate(relay, mosq, proxy)
    finally:
        if relay.running():
            relay.kill()
        proxy.close()
        mosq.stop()
    ids = _name_rows(relay.rows())

    # Fixed times (see the module docstring).
    times = {}
    d1 = ms_of(f"{DAY1}T08:00:00Z") + 123
    for k, n in enumerate(PHASE1):
        times[n] = d1 + k * 60_000
    times["b_dim"] = ms_of(f"{DAY2}T09:30:00Z") + 250
    times["b_dim_redelivery"] = times["b_dim"] + 1500
    # The "today" rows must lie in today's past: just after UTC midnight
    # there is no room for them yet, so wait until there is (at most 5 min).
    since_midnight = time.time() % 86400
    if since_midnight < 300:
        time.sleep(300 - since_midnight)
    now_s = int(time.time())
    recent = (now_s - 1200) * 1000
    today = day_of(now_s * 1000)
    if day_of(recent) != today:
        recent = ms_of(f"{today}T00:00:00Z") + 1000
    for k, n in enumerate(sorted(NAMES[9:], key=ids.get)):
        times[n] = recent + k * 10_000
    db = sqlite3.connect(relay.db_path)
    try:
        with db:
            db.executemany("UPDATE messages SET received_at = ? WHERE id = ?",
                           [(times[n], ids[n]) for n in NAMES])
            db.executemany("UPDATE consumers SET updated_at = ?1,"
                           " acked_at = CASE WHEN acked_at IS NULL THEN NULL ELSE ?1 END WHERE name = ?2",
                           [(ms_of(v), k) for k, v in CONSUMER_UPDATED.items()])
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()
    assert not Path(f"{relay.db_path}-wal").exists() or Path(f"{relay.db_path}-wal").stat().st_size == 0
    return Known(relay.workdir, relay.db_path, relay.conf_path, ids, times, today)


@pytest.fixture
def db_copy(known, tmp_path):
    """A private copy of the known history, for tests that write or lock it."""
    path = tmp_path / "history.db"
    shutil.copyfile(known.db, path)
    return path


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def ctl(*args, timeout=30):
    """cmdrelayctl with these arguments; stdout as bytes."""
    env = dict(os.environ)
    env.pop("JOURNAL_STREAM", None)
    return subprocess.run([str(CMDRELAYCTL), *map(str, args)], capture_output=True, env=env,
                          timeout=timeout)


def out(r):
    return r.stdout.decode("utf-8", errors="surrogateescape")


def err(r):
    return r.stderr.decode("utf-8", errors="replace")


def ok(r):
    assert r.returncode == 0, f"exit {r.returncode}: {err(r)}"
    return out(r)


def json_lines(r):
    return [json.loads(line) for line in ok(r).splitlines()]


def sql_literal(value):
    """A value for the CLI's `.parameter set`, as the query headers document:
    text as "'...'" (unquoted, the CLI would compute 2026-11-24 = 1991)."""
    if isinstance(value, int):
        return str(value)
    return '"' + "'" + value.replace("'", "''") + "'" + '"'


def sqlite_cli(db, sql_file=None, sql=None, params=None):
    """The real sqlite3 CLI, -json output, read-only, fed like the documented
    here-document: `.parameter set` lines, then the file (`.read`)."""
    script = "".join(f".parameter set {k} {sql_literal(v)}\n" for k, v in (params or {}).items())
    script += f".read {sql_file}\n" if sql_file else sql
    r = subprocess.run(["sqlite3", "-readonly", "-json", str(db)], input=script, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0 and not r.stderr, f"sqlite3 exit {r.returncode}: {r.stderr}"
    return json.loads(r.stdout) if r.stdout.strip() else []


def select(db, sql, args=(), text_factory=str):
    c = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    c.text_factory = text_factory
    try:
        return c.execute(sql, args).fetchall()
    finally:
        c.close()


# --------------------------------------------------------------------------
# the history itself and the views
# --------------------------------------------------------------------------

def test_known_history(known):
    """The scenario produced what SPEC says (the fixture checked each row);
    migration 3 is applied."""
    assert select(known.db, "SELECT count(*), count(*) FILTER (WHERE status = 'accepted') FROM messages") \
        == [(len(NAMES), len(ACCEPTED))]
    assert select(known.db, "PRAGMA user_version")[0][0] >= 3
    assert select(known.db, "SELECT name, filter, acked_id FROM consumers ORDER BY name") == [
        ("audit", "#", known.id("c_bin")), ("ghost", GHOST_FILTER, 0),
        ("lamp", LAMP_FILTER, known.id("a_reboot1")), ("ota", OTA_FILTER, 0)]


def test_view_device_daily(known):
    rows = sqlite_cli(known.db, sql="SELECT * FROM device_daily ORDER BY day, device;")
    cols = ("day", "device", "accepted", "duplicates", "retained_replays", "redeliveries", "possible_repeats")
    assert rows == [dict(zip(cols, r)) for r in [
        (DAY1, A, 4, 0, 0, 0, 0), (DAY1, B, 1, 0, 0, 0, 0), (DAY1, C, 2, 0, 0, 0, 0),
        (DAY2, B, 1, 1, 0, 1, 0),
        (known.today, A, 1, 2, 2, 0, 0), (known.today, B, 2, 1, 1, 0, 1), (known.today, C, 1, 1, 1, 0, 0),
    ]]


def test_view_duplicates_daily(known):
    rows = sqlite_cli(known.db, sql="SELECT * FROM duplicates_daily ORDER BY day, reason;")
    assert rows == [{"day": DAY2, "reason": "redelivery", "count": 1},
                    {"day": known.today, "reason": "retained_replay", "count": 4}]


def test_view_commands(known):
    rows = select(known.db, "SELECT id, received, device, topic, payload, qos, retain, fields, received_at"
                            " FROM commands ORDER BY id", text_factory=bytes)
    assert [r[0] for r in rows] == [known.id(n) for n in known.by_id(ACCEPTED)]
    for r, n in zip(rows, known.by_id(ACCEPTED)):
        topic, payload, _, _, _, retain, _ = SPEC[n]
        assert r[1].decode() == known.t(n)
        assert (r[2].decode(), r[3].decode(), r[4], r[5], r[6], r[8]) == \
            (device_of(topic), topic, payload, 1, retain, known.times[n])
        assert json.loads(r[7]) == {"product": "AAA", "model": "012C", "device": device_of(topic),
                                    "action": topic.rsplit("/", 1)[1]}


def test_view_consumer_lag(known):
    rows = sqlite_cli(known.db, sql="SELECT * FROM consumer_lag ORDER BY consumer;")
    assert rows == [
        {"consumer": "audit", "filter": "#", "acked_id": known.id("c_bin"),
         "updated": "2026-11-02T08:11:00.000Z", "lag": len(AUDIT_PENDING)},
        {"consumer": "ghost", "filter": GHOST_FILTER, "acked_id": 0,
         "updated": "2026-11-02T08:13:00.000Z", "lag": 0},
        {"consumer": "lamp", "filter": LAMP_FILTER, "acked_id": known.id("a_reboot1"),
         "updated": "2026-11-02T08:10:00.000Z", "lag": len(LAMP_PENDING)},
        {"consumer": "ota", "filter": OTA_FILTER, "acked_id": 0,
         "updated": "2026-11-02T08:12:00.000Z", "lag": 1},
    ]


def test_view_deliveries(known):
    assert sqlite_cli(known.db, sql="SELECT id, received, device, topic, status, reason, duplicate_of,"
                                    " retain, dup, payload FROM deliveries ORDER BY id;") == \
        [known.delivery(n) for n in known.by_id(NAMES)]


# --------------------------------------------------------------------------
# sql/queries/*.sql
# --------------------------------------------------------------------------

def _pending(k, consumer, names):
    return [{"consumer": consumer, "id": k.id(n), "received": k.t(n), "device": device_of(SPEC[n][0]),
             "topic": SPEC[n][0], "payload": shown(SPEC[n][1])} for n in k.by_id(names)]


def _last(k, n):
    topic, payload, _, _, _, retain, _ = SPEC[n]
    return {"device": device_of(topic), "id": k.id(n), "received": k.t(n), "topic": topic,
            "payload": shown(payload), "retain": retain, "pending_for": "audit,lamp"}


def _repeated(k, n, copies, replays, redeliveries, last):
    topic, payload = SPEC[n][:2]
    return {"id": k.id(n), "received": k.t(n), "device": device_of(topic), "topic": topic,
            "payload": shown(payload), "copies": copies, "retained_replays": replays,
            "redeliveries": redeliveries, "last_copy": k.t(last)}


def _per_day(day, deliveries, accepted, duplicates, replays, redeliveries):
    return {"day": day, "deliveries": deliveries, "accepted": accepted, "duplicates": duplicates,
            "retained_replay": replays, "redelivery": redeliveries}


def _busy(device, accepted, duplicates, replays, redeliveries):
    return {"device": device, "accepted": accepted, "duplicates": duplicates,
            "retained_replays": replays, "redeliveries": redeliveries}


# the accepted commands after each consumer's ack that its filter matches
LAMP_PENDING = [n for n in ACCEPTED[ACCEPTED.index("a_reboot1") + 1:] if SPEC[n][0] != TAO]
AUDIT_PENDING = ACCEPTED[ACCEPTED.index("c_bin") + 1:]

# file -> [(parameters, expected rows as a function of Known)]: every file in
# sql/queries/ must be here, with its default run ({}) first.
QUERY_CASES = {
    "last-command-per-device.sql": [
        ({}, lambda k: [_last(k, "a_off"), _last(k, "b_on"), _last(k, "c_standby")]),
    ],
    "device-deliveries-between.sql": [
        ({}, lambda k: [k.delivery(n) for n in k.by_id(NAMES)]),
        ({":device": A, ":from": f"{DAY1}T08:01:00Z", ":until": f"{DAY1}T08:05:00Z"},
         lambda k: [k.delivery("a_reboot1"), k.delivery("a_reboot2")]),
        ({":device": B},
         lambda k: [k.delivery(n) for n in k.names_where(lambda n, t, *_: t == TB)]),
        ({":from": DAY2, ":until": "2026-11-04"},
         lambda k: [k.delivery("b_dim"), k.delivery("b_dim_redelivery")]),
        ({":from": "2026-11-02 08:06:00"},
         lambda k: [k.delivery(n) for n in k.by_id(NAMES)[6:]]),
        ({":from": "yesterday"}, lambda k: []),
    ],
    "pending-for-consumer.sql": [
        ({}, lambda k: _pending(k, "audit", AUDIT_PENDING) + _pending(k, "lamp", LAMP_PENDING)
         + _pending(k, "ota", ["a_fw"])),
        ({":consumer": "lamp"}, lambda k: _pending(k, "lamp", LAMP_PENDING)),
        ({":consumer": "ghost"}, lambda k: []),
    ],
    "duplicates-by-reason-per-day.sql": [
        ({}, lambda k: [_per_day(DAY1, 7, 7, 0, 0, 0), _per_day(DAY2, 2, 1, 1, 0, 1),
                        _per_day(k.today, 8, 4, 4, 4, 0)]),
        ({":days": 7}, lambda k: [_per_day(k.today, 8, 4, 4, 4, 0)]),
    ],
    "consumer-lag.sql": [
        ({}, lambda k: [
            {"consumer": "lamp", "filter": LAMP_FILTER, "acked_id": k.id("a_reboot1"), "lag": len(LAMP_PENDING),
             "last_seen": "2026-11-02T08:10:00.000Z", "oldest_pending": k.t("a_reboot2")},
            {"consumer": "audit", "filter": "#", "acked_id": k.id("c_bin"), "lag": len(AUDIT_PENDING),
             "last_seen": "2026-11-02T08:11:00.000Z", "oldest_pending": k.t("b_dim")},
            {"consumer": "ota", "filter": OTA_FILTER, "acked_id": 0, "lag": 1,
             "last_seen": "2026-11-02T08:12:00.000Z", "oldest_pending": k.t("a_fw")},
            {"consumer": "ghost", "filter": GHOST_FILTER, "acked_id": 0, "lag": 0,
             "last_seen": "2026-11-02T08:13:00.000Z", "oldest_pending": None},
        ]),
    ],
    "retained-replays-per-topic.sql": [
        ({}, lambda k: [
            {"topic": TAO, "replays": 2, "commands": 1, "last_replay": k.t("a_fw_replay2")},
            {"topic": TB, "replays": 1, "commands": 1, "last_replay": k.t("b_off_replay2")},
            {"topic": TC, "replays": 1, "commands": 1, "last_replay": k.t("c_standby_replay")},
        ]),
        ({":days": 0}, lambda k: []),
    ],
    "busiest-devices-today.sql": [
        ({}, lambda k: [_busy(B, 2, 1, 1, 0), _busy(A, 1, 2, 2, 0), _busy(C, 1, 1, 1, 0)]),
        ({":day": DAY1}, lambda k: [_busy(A, 4, 0, 0, 0), _busy(C, 2, 0, 0, 0), _busy(B, 1, 0, 0, 0)]),
        ({":day": DAY2}, lambda k: [_busy(B, 1, 1, 0, 1)]),
        ({":top": 1}, lambda k: [_busy(B, 2, 1, 1, 0)]),
    ],
    "most-repeated-commands.sql": [
        ({}, lambda k: [_repeated(k, "a_fw", 2, 2, 0, "a_fw_replay2"),
                        _repeated(k, "b_dim", 1, 0, 1, "b_dim_redelivery"),
                        _repeated(k, "b_off_replay1", 1, 1, 0, "b_off_replay2"),
                        _repeated(k, "c_standby", 1, 1, 0, "c_standby_replay")]),
        ({":top": 2}, lambda k: [_repeated(k, "a_fw", 2, 2, 0, "a_fw_replay2"),
                                 _repeated(k, "b_dim", 1, 0, 1, "b_dim_redelivery")]),
    ],
}

QUERY_FILES = sorted(p.name for p in QUERIES.glob("*.sql"))


def test_queries_are_there():
    assert len(QUERY_FILES) >= 6
    assert sorted(QUERY_CASES) == QUERY_FILES, "every sql/queries file needs its expectation here"


@pytest.mark.parametrize("name", QUERY_FILES)
def test_query_documented(name):
    """Each file starts with comment lines: the question, how to run it (with
    its own path), and its parameters; every :parameter used is documented."""
    text = (QUERIES / name).read_text()
    header = []
    for line in text.splitlines():
        if not line.startswith("--"):
            break
        header.append(line)
    head = "\n".join(header)
    assert re.match(r"-- Question: \S", head), f"{name}: first line must be '-- Question: ...'"
    assert "sqlite3 " in head and "/var/lib/cmdrelay/history.db" in head and f"sql/queries/{name}" in head
    assert re.search(r"^-- Parameters\b", head, re.M)
    body = text[len(head):]
    for param in set(re.findall(r"(?<![:\w]):[a-z_]+\b", body)):
        assert re.search(rf"--\s+{param}\b", head), f"{name}: parameter {param} is not documented"


@pytest.mark.parametrize("name", QUERY_FILES)
def test_query_results(known, name):
    cases = QUERY_CASES.get(name)
    assert cases, f"sql/queries/{name} has no expectation in QUERY_CASES"
    assert cases[0][0] == {}, f"{name}: the first case must be the run without parameters"
    for params, expected in cases:
        assert sqlite_cli(known.db, QUERIES / name, params=params) == expected(known), params


def _documented_runs(name):
    """The shell commands in a file's header: the plain run line, and the
    here-document with parameters if there is one."""
    head = []
    for line in (QUERIES / name).read_text().splitlines():
        if not line.startswith("--"):
            break
        head.append(line[2:].strip())
    runs = [ln for ln in head if ln.startswith("sqlite3 ") and ln.endswith(f"< sql/queries/{name}")]
    doc = None
    if any(ln.endswith("<<'EOF'") for ln in head):
        i = next(i for i, ln in enumerate(head) if ln.endswith("<<'EOF'"))
        j = head.index("EOF", i)
        doc = "\n".join(head[i:j + 1]) + "\n"
    return runs, doc


@pytest.mark.parametrize("name", QUERY_FILES)
def test_query_documented_runs_work(known, name):
    """The documented commands run as written (only the database path
    replaced, from the top of the source tree) and print a header line;
    the here-document binds text parameters as text."""
    runs, doc = _documented_runs(name)
    assert len(runs) == 1, f"{name}: one plain run line expected"
    for cmd in runs + ([doc] if doc else []):
        cmd = cmd.replace("/var/lib/cmdrelay/history.db", str(known.db))
        r = subprocess.run(cmd, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and not r.stderr, f"{cmd}\n{r.stderr}"
        if r.stdout:
            assert re.fullmatch(r"-+( +-+)*", r.stdout.splitlines()[1]), r.stdout   # -header -column
    if doc:
        listed = doc.replace(f".read sql/queries/{name}", ".parameter list")
        listed = listed.replace("/var/lib/cmdrelay/history.db", str(known.db))
        r = subprocess.run(listed, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=30)
        for key, value in re.findall(r"\.parameter set (:\w+) (.+)", doc):
            want = value[1:-1] if value.startswith('"') else value      # "'text'" -> 'text'
            assert re.search(rf"^{key}\s+{re.escape(want)}$", r.stdout, re.M), (key, r.stdout)


def test_query_default_runs_have_header(known):
    r = subprocess.run(f"sqlite3 -readonly -header -column {known.db} < sql/queries/consumer-lag.sql",
                       shell=True, cwd=ROOT, capture_output=True, text=True, timeout=30)
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["consumer", "filter", "acked_id", "lag", "last_seen", "oldest_pending"]
    assert [ln.split()[0] for ln in lines[2:]] == ["lamp", "audit", "ota", "ghost"]


# --------------------------------------------------------------------------
# cmdrelayctl history
# --------------------------------------------------------------------------

HISTORY_HEADER = (f"{'ID':<6} {'RECEIVED':<29} {'DEVICE':<14} {'STATUS':<9} {'REASON':<15} "
                  f"{'DUP_OF':<6} {'RET':<3} {'DUP':<3} PAYLOAD")


def table_ids(text):
    lines = text.splitlines()
    assert lines[0] == HISTORY_HEADER
    return [int(ln.split()[0]) for ln in lines[1:]]


def test_history_table(known):
    text = ok(ctl("--db", known.db, "history", "--utc"))
    lines = text.splitlines()
    assert lines[0] == HISTORY_HEADER
    assert len(lines) == 1 + len(NAMES)
    for line, n in zip(lines[1:], known.by_id(NAMES)):
        topic, payload, status, reason, dup_of, retain, dup = SPEC[n]
        cols = line.split(None, 8)
        assert cols[:8] == [str(known.id(n)), known.t(n), device_of(topic), status, reason or "-",
                            str(known.id(dup_of)) if dup_of else "-", str(retain), str(dup)], line
        if n != "c_bin":
            assert cols[8] == payload.decode(), line
        # the columns line up under the header
        assert line.index(known.t(n)) == HISTORY_HEADER.index("RECEIVED")
        assert line[HISTORY_HEADER.index("PAYLOAD"):].startswith(cols[8])
    c_bin = lines[1 + known.by_id(NAMES).index("c_bin")]
    assert c_bin.split(None, 8)[8].startswith("\\x00")


def test_history_json(known):
    assert json_lines(ctl("--db", known.db, "history", "--json")) == \
        [known.history_json(n) for n in known.by_id(NAMES)]


def _insert(db, payload, device="X"):
    c = sqlite3.connect(db)
    with c:
        c.execute("INSERT INTO messages (received_at, topic, payload, payload_hash, qos, retain, dup, mid,"
                  " connection, status, device) VALUES (1795600000000, ?, ?, 0, 1, 0, 0, 1, 1, 'accepted', ?)",
                  (f"/cf/v1/AAA/012C/{device}/set", payload, device))
    c.close()


@pytest.mark.parametrize("payload", [b"\x00\xff\x10", b"\xc3(", ("a" + "\u00e9" * 30).encode()],
                         ids=["binary", "invalid-utf8", "utf8-cut-at-40"])
def test_history_table_output_is_utf8(db_copy, payload):
    """The table escapes control bytes; bytes that are not UTF-8 (a binary
    payload, or a multi-byte character cut at the column width) must not
    reach the terminal raw either."""
    _insert(db_copy, payload)
    r = ctl("--db", db_copy, "history", "--device", "X")
    assert r.returncode == 0, err(r)
    r.stdout.decode("utf-8")          # raises on raw non-UTF-8 bytes


def test_history_table_escapes_terminal_controls(db_copy):
    """Broker-controlled bytes never reach the admin's terminal as controls:
    C0 (ESC, BEL, CR), DEL and C1 (0xc2 0x9b is CSI) come out as \\xNN."""
    _insert(db_copy, b"\x1b]0;t\x07\r\x7f\xc2\x9b31m")
    line = ok(ctl("--db", db_copy, "history", "--device", "X")).splitlines()[1]
    cell = line[HISTORY_HEADER.index("PAYLOAD"):]
    assert cell == "\\x1b]0;t\\x07\\x0d\\x7f\\xc2\\x9b31m", cell


@pytest.mark.parametrize("length", range(38, 48))
def test_history_table_payload_cut(db_copy, length):
    """A long payload is cut with "..."; the ellipsis only ever replaces
    more than it hides (a payload that fits is shown whole)."""
    payload = "".join(chr(ord("a") + i % 26) for i in range(length))
    _insert(db_copy, payload.encode())
    line = ok(ctl("--db", db_copy, "history", "--device", "X")).splitlines()[1]
    cell = line[HISTORY_HEADER.index("PAYLOAD"):]
    assert cell == payload or (cell.endswith("...") and payload.startswith(cell[:-3])
                               and len(cell) < len(payload)), (payload, cell)


def _dev(d):
    return lambda n, t, *_: device_of(t) == d


HISTORY_FILTERS = [
    (["--device", A], lambda k: k.names_where(_dev(A))),
    (["--device", "nosuch"], lambda k: []),
    (["--device", A, "--status", "duplicate"], lambda k: ["a_fw_replay1", "a_fw_replay2"]),
    (["--topic", "/cf/v1/AAA/012C/+/ota"], lambda k: k.names_where(lambda n, t, *_: t == TAO)),
    (["--topic", f"/cf/v1/+/+/{B}/#"], lambda k: k.names_where(_dev(B))),
    (["--topic", "#"], lambda k: k.by_id(NAMES)),
    (["--topic", "/cf/v1/#"], lambda k: k.by_id(NAMES)),
    (["--topic", TC], lambda k: k.names_where(_dev(C))),
    (["--topic", "/cf/v1/AAA/012C/+"], lambda k: []),
    (["--topic", LAMP_FILTER, "--status", "accepted"],
     lambda k: k.names_where(lambda n, t, p, s, *_: t != TAO and s == "accepted")),
    (["--status", "accepted"], lambda k: k.by_id(ACCEPTED)),
    (["--status", "duplicate"], lambda k: k.by_id(DUPLICATES)),
    (["--status", "all"], lambda k: k.by_id(NAMES)),
    (["--since", DAY2], lambda k: k.by_id(NAMES)[7:]),
    (["--until", DAY2], lambda k: k.by_id(PHASE1)),
    (["--since", f"{DAY1}T08:03:00Z", "--until", f"{DAY1}T08:05:00Z"], lambda k: ["a_reboot1", "a_reboot2"]),
    (["--since", f"{DAY1} 08:03:00", "--until", f"{DAY1}T08:05"], lambda k: ["a_reboot1", "a_reboot2"]),
    (["--since", f"{DAY1}T08:03Z", "--until", f"{DAY1}T08:05:00"], lambda k: ["a_reboot1", "a_reboot2"]),
    (["--since", "2h"], lambda k: k.by_id(NAMES)[9:]),
    (["--since", "7200s", "--status", "accepted"], lambda k: ["b_off_replay1", "c_standby", "a_off", "b_on"]),
    (["--until", "1h"], lambda k: k.by_id(NAMES)[:9]),
    (["--since", "3000d"], lambda k: k.by_id(NAMES)),
    # further back than 1970: everything (today: "'30000d' is neither ISO 8601 nor an age", 64)
    (["--since", "30000d"], lambda k: k.by_id(NAMES)),
    (["--limit", "3"], lambda k: k.by_id(NAMES)[-3:]),
    (["--limit", "1"], lambda k: ["b_on"]),
    (["--limit", "2", "--status", "accepted"], lambda k: ["a_off", "b_on"]),
    (["--limit", "2", "--device", C], lambda k: k.names_where(_dev(C))[-2:]),
    (["--limit", "1000000"], lambda k: k.by_id(NAMES)),
    # the times history itself prints (milliseconds) are ISO 8601 too (rejected with 64 today)
    (["--since", f"{DAY1}T08:03:00.123Z", "--until", f"{DAY1}T08:04:00.123Z"],
     lambda k: ["a_reboot1", "a_reboot2"]),
]


@pytest.mark.parametrize("args,expected", HISTORY_FILTERS, ids=[" ".join(a) for a, _ in HISTORY_FILTERS])
def test_history_filters(known, args, expected):
    want = [known.id(n) for n in expected(known)]
    assert [o["id"] for o in json_lines(ctl("--db", known.db, "history", "--json", *args))] == want
    assert table_ids(ok(ctl("--db", known.db, "history", *args))) == want


def test_history_default_limit_is_100(db_copy):
    db = sqlite3.connect(db_copy)
    with db:
        db.executemany("INSERT INTO messages (received_at, topic, payload, payload_hash, qos, retain, dup,"
                       " mid, connection, status, device) VALUES (?, ?, ?, 0, 1, 0, 0, 1, 1, 'accepted', ?)",
                       [(1795000000000 + i, TA, f"n{i}".encode(), A) for i in range(120)])
    last = db.execute("SELECT max(id) FROM messages").fetchone()[0]
    db.close()
    ids = [o["id"] for o in json_lines(ctl("--db", db_copy, "history", "--json"))]
    assert ids == list(range(last - 99, last + 1))


# --------------------------------------------------------------------------
# cmdrelayctl consumers, stats, check-config
# --------------------------------------------------------------------------

CONSUMERS = [  # name, filter, acked (SPEC name or None), lag
    ("audit", "#", "c_bin", len(AUDIT_PENDING)), ("ghost", GHOST_FILTER, None, 0),
    ("lamp", LAMP_FILTER, "a_reboot1", len(LAMP_PENDING)), ("ota", OTA_FILTER, None, 1),
]


def test_consumers_table(known, monkeypatch):
    lines = ok(ctl("--db", known.db, "consumers", "--utc")).splitlines()
    assert lines[0] == f"{'CONSUMER':<20} {'FILTER':<36} {'ACKED':<8} {'LAG':<8} {'LAST ACK':<29} CONNECTED"
    # a cursor that never acknowledged has an empty LAST ACK; nobody is connected
    assert [ln.split() for ln in lines[1:]] == [
        [name, filt, str(known.id(acked)) if acked else "0", str(lag)] +
        ([CONSUMER_UPDATED[name][:-1] + ".000Z"] if acked else []) + ["-"]
        for name, filt, acked, lag in CONSUMERS]
    # without --utc, local time with its offset (November in Berlin: +01:00)
    import datetime
    import zoneinfo
    monkeypatch.setenv("TZ", "Europe/Berlin")
    berlin = zoneinfo.ZoneInfo("Europe/Berlin")
    local = [ln.split()[4] for ln in ok(ctl("--db", known.db, "consumers")).splitlines()[1:]
             if len(ln.split()) == 6]
    assert local == [datetime.datetime.fromisoformat(CONSUMER_UPDATED[name].replace("Z", "+00:00"))
                     .astimezone(berlin).isoformat(timespec="milliseconds")
                     for name, filt, acked, lag in CONSUMERS if acked]


def test_consumers_json(known):
    assert json_lines(ctl("--db", known.db, "consumers", "--json")) == [
        dict({"consumer": name, "filter": filt, "acked_id": known.id(acked) if acked else 0, "lag": lag},
             **({"last_ack": CONSUMER_UPDATED[name][:-1] + ".000Z"} if acked else {}))
        for name, filt, acked, lag in CONSUMERS]


def _today(known):
    """stats' "today": the rows since the local midnight (TZ of this run)."""
    import datetime
    midnight = datetime.datetime.now().astimezone().replace(hour=0, minute=0, second=0, microsecond=0)
    since = int(midnight.timestamp()) * 1000
    names = [n for n in NAMES if known.times[n] >= since]
    return {"since": iso_ms(since), "received": len(names),
            "accepted": len([n for n in names if n in ACCEPTED]),
            "duplicates": len([n for n in names if n in DUPLICATES]),
            "possible_repeats": len([n for n in names if SPEC[n][3] == "possible_repeat"])}


def _stats_from_history(known):
    return {"type": "stats", "source": "history (cmdrelayd is not running)", "received": len(NAMES),
            "accepted": len(ACCEPTED), "duplicates": {"retained_replay": 4, "redelivery": 1},
            "today": _today(known),
            "consumers": [{"name": name, "filter": filt, "acked_id": known.id(acked) if acked else 0,
                           "lag": lag, "connected": False} for name, filt, acked, lag in CONSUMERS]}


def test_stats_falls_back_to_history(known):
    """The daemon is stopped: stats reads the history and says so on stderr."""
    sock = known.workdir / "cmdrelay.sock"
    r = ctl("-c", known.conf, "stats")
    assert json.loads(ok(r)) == _stats_from_history(known)
    assert "reading the history instead" in err(r) and str(sock) in err(r)


def test_stats_stale_socket(known, tmp_path):
    """A socket file nobody listens on (a relay killed with -9) is no relay."""
    path = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()
    r = ctl("--db", known.db, "--socket", path, "stats")
    assert json.loads(ok(r)) == _stats_from_history(known)
    assert "reading the history instead" in err(r) and str(path) in err(r)


def test_check_config_shipped():
    r = ctl("-c", SHIPPED_CONF, "check-config")
    assert ok(r) == f"{SHIPPED_CONF}: configuration OK\n"
    r = subprocess.run([str(CMDRELAYCTL), "-c", "conf/cmdrelay.yaml", "check-config"], cwd=ROOT,
                       capture_output=True, text=True, timeout=30)
    assert (r.returncode, r.stdout) == (0, "conf/cmdrelay.yaml: configuration OK\n"), r.stderr


@pytest.mark.parametrize("path", BAD_CONFIGS, ids=[p.name for p in BAD_CONFIGS])
def test_check_config_bad(path):
    """78 and the same file:line:column message as `cmdrelayd -t`
    (tests/configs/bad/*.yaml say which on their first line)."""
    expect = re.fullmatch(r"# expect: (.+)", path.read_text().splitlines()[0]).group(1)
    r = ctl("-c", path, "check-config")
    assert r.returncode == EX_CONFIG, err(r)
    assert f"{path}{expect}" in err(r)
    assert r.stdout == b""


def test_check_config_missing_file(tmp_path):
    r = ctl("-c", tmp_path / "nope.yaml", "check-config")
    assert r.returncode == EX_CONFIG, err(r)
    assert str(tmp_path / "nope.yaml") in err(r)


def test_history_uses_store_path_of_config(known, tmp_path):
    """Without --db the history is the config's store.path."""
    conf = tmp_path / "c.yaml"
    conf.write_text(known.conf.read_text())
    assert table_ids(ok(ctl("-c", conf, "history", "--limit", "2"))) == [known.id("a_off"), known.id("b_on")]


# --------------------------------------------------------------------------
# bad arguments: 64 with a usage line or an error naming the option
# --------------------------------------------------------------------------

BAD_ARGS = [
    (["history", "--limit", "0"], "--limit"),
    (["history", "--limit", "x"], "--limit"),
    (["history", "--limit", "-5"], "--limit"),
    (["history", "--limit", "3x"], "--limit"),
    (["history", "--limit", ""], "--limit"),
    (["history", "--limit", "1000001"], "--limit"),
    (["history", "--limit", "99999999999999999999"], "--limit"),
    (["history", "--status", "bogus"], "--status"),
    (["history", "--status", "Accepted"], "--status"),
    (["history", "--since", "lastweek"], "--since"),
    (["history", "--since", "2h ago"], "--since"),
    (["history", "--since", "-2h"], "--since"),
    (["history", "--since", "2"], "--since"),
    (["history", "--since", "2w"], "--since"),
    (["history", "--since", "2026-13-01"], "--since"),
    (["history", "--since", "2026-11-25T25:00:00Z"], "--since"),
    (["history", "--until", "2026-11-25X"], "--until"),
    (["history", "--until", ""], "--until"),
    (["history", "--since", "2026-02-30"], "--since"),       # today: taken as 2026-03-02
    # not MQTT topic filters (the daemon refuses them in hello); today exit 0,
    # and "/cf/#/set" even matches every topic under /cf/
    (["history", "--topic", "/cf/#/set"], "--topic"),
    (["history", "--topic", "/cf/v1/AA+/012C/+/set"], "--topic"),
    (["history", "--topic", ""], "--topic"),
    (["history", "--bogus"], "usage:"),
    (["history", "-x"], "usage:"),
    (["history", "--device"], "usage:"),
    (["history", "--limit"], "usage:"),
    (["history", "extra"], "usage:"),
    (["history", "--json", "extra"], "usage:"),
    (["history", "--device", A, "extra"], "usage:"),
    (["histroy"], "usage:"),
    ([], "usage:"),
    (["consumers", "extra"], "usage:"),
    (["consumers", "--bogus"], "usage:"),
    (["consumers", "--json", "extra"], "usage:"),
    (["stats", "extra"], "usage:"),
    (["stats", "--json", "extra"], "usage:"),
    (["check-config", "extra"], "usage:"),
    (["tail", "extra"], "usage:"),
    (["tail", "--bogus"], "usage:"),
    (["tail", "--from", "bogus"], "--from"),
    (["tail", "--from", "-1"], "--from"),
    (["--bogus", "history"], "usage:"),
]


@pytest.mark.parametrize("args,names", BAD_ARGS, ids=[" ".join(a) or "(none)" for a, _ in BAD_ARGS])
def test_bad_arguments(known, args, names):
    r = ctl("--db", known.db, "--socket", known.workdir / "no.sock", *args)
    assert r.returncode == EX_USAGE, f"exit {r.returncode}: {err(r)}"
    assert names in err(r), err(r)
    assert r.stdout == b"", "nothing on stdout for a usage error"


@pytest.mark.parametrize("args", [["-c"], ["--db"], ["--socket"]])
def test_bad_global_option_arguments(args):
    r = ctl(*args)
    assert r.returncode == EX_USAGE and "usage:" in err(r), err(r)


def test_help_and_version():
    r = ctl("--help")
    assert r.returncode == 0 and out(r).startswith("usage: cmdrelayctl") and r.stderr == b""
    r = ctl("--version")
    assert r.returncode == 0 and re.fullmatch(r"cmdrelayctl \S+\n", out(r))


# --------------------------------------------------------------------------
# missing, busy, locked and broken databases; missing socket
# --------------------------------------------------------------------------

@pytest.mark.parametrize("cmd", [["history"], ["history", "--json"], ["consumers"], ["consumers", "--json"],
                                 ["stats"]])
def test_missing_database(tmp_path, cmd):
    path = tmp_path / "no" / "history.db"
    r = ctl("--db", path, "--socket", tmp_path / "no.sock", *cmd)
    assert r.returncode == EX_NOINPUT, err(r)
    assert str(path) in err(r)
    assert not path.exists(), "a read-only tool must not create the database"


def test_missing_database_from_config(known, tmp_path):
    conf = tmp_path / "c.yaml"
    missing = tmp_path / "gone.db"
    conf.write_text(known.conf.read_text().replace(str(known.db), str(missing)))
    r = ctl("-c", conf, "history")
    assert r.returncode == EX_NOINPUT and str(missing) in err(r), err(r)
    assert not missing.exists()


def test_missing_socket_tail(tmp_path):
    path = tmp_path / "cmdrelay.sock"
    r = ctl("--socket", path, "tail")
    assert r.returncode == EX_UNAVAILABLE, err(r)
    assert str(path) in err(r)


def test_history_while_a_writer_holds_a_transaction(db_copy):
    """WAL: readers are not blocked by a writer; they see the last commit."""
    w = sqlite3.connect(db_copy, isolation_level=None, timeout=0)
    try:
        assert w.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        for begin in ("BEGIN IMMEDIATE", "BEGIN EXCLUSIVE"):
            w.execute(begin)
            w.execute("INSERT INTO messages (received_at, topic, payload, payload_hash, qos, retain, dup,"
                      " mid, connection, status, device) VALUES (1795600000000, ?, x'6e6577', 0, 1, 0, 0, 9,"
                      " 9, 'accepted', ?)", (TA, A))
            t0 = time.monotonic()
            assert len(json_lines(ctl("--db", db_copy, "history", "--json"))) == 17
            assert len(json_lines(ctl("--db", db_copy, "consumers", "--json"))) == 4
            r = ctl("--db", db_copy, "--socket", db_copy.parent / "no.sock", "stats")
            assert json.loads(ok(r))["received"] == 17
            assert time.monotonic() - t0 < 5, "readers waited for the writer"
            w.execute("ROLLBACK")
        w.execute("BEGIN IMMEDIATE")
        w.execute("DELETE FROM messages WHERE id = (SELECT max(id) FROM messages)")
        w.execute("COMMIT")
        assert len(json_lines(ctl("--db", db_copy, "history", "--json"))) == 16
    finally:
        w.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run cmdrelayctl as another user")
def test_history_as_unprivileged_reader_while_daemon_writes(known):
    """An admin who may read but not write the database and its directory
    (the daemon's -wal and -shm exist, owned by the daemon's user) still
    reads the history, including what is only in the WAL."""
    import tempfile
    d = Path(tempfile.mkdtemp(prefix="cmdrelay-ro-"))
    try:
        os.chmod(d, 0o755)
        db = d / "history.db"
        shutil.copyfile(known.db, db)
        os.chmod(db, 0o644)
        w = sqlite3.connect(db, isolation_level=None)
        try:
            w.execute("PRAGMA wal_autocheckpoint = 0")
            w.execute("INSERT INTO messages (received_at, topic, payload, payload_hash, qos, retain, dup,"
                      " mid, connection, status, device) VALUES (1795600000000, ?, x'6e6577', 0, 1, 0, 0, 9,"
                      " 9, 'accepted', ?)", (TA, A))
            assert Path(f"{db}-wal").exists() and Path(f"{db}-shm").exists()
            for f in (f"{db}-wal", f"{db}-shm"):
                os.chmod(f, 0o644)
            r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                str(CMDRELAYCTL), "--db", str(db), "history", "--json"],
                               capture_output=True, timeout=30)
            assert len(json_lines(r)) == 18
        finally:
            w.close()
    finally:
        shutil.rmtree(d)


def test_history_database_locked_exclusively(db_copy):
    """A connection in exclusive locking mode shuts every reader out: the
    tool gives up after its busy timeout with a clear message."""
    w = sqlite3.connect(db_copy, isolation_level=None, timeout=0)
    try:
        w.execute("PRAGMA locking_mode = EXCLUSIVE")
        w.execute("BEGIN EXCLUSIVE")
        w.execute("UPDATE consumers SET updated_at = updated_at")
        for cmd in (["history"], ["consumers"]):
            t0 = time.monotonic()
            r = ctl("--db", db_copy, *cmd)
            assert r.returncode not in (0, EX_USAGE), err(r)
            assert "locked" in err(r), err(r)
            assert err(r).startswith("cmdrelayctl: ") and err(r).count("\n") == 1, err(r)
            assert time.monotonic() - t0 < 10
        w.execute("ROLLBACK")
    finally:
        w.close()
    assert len(json_lines(ctl("--db", db_copy, "history", "--json"))) == 17


@pytest.mark.parametrize("cmd", [["history"], ["history", "--json"], ["consumers"], ["stats"]])
@pytest.mark.parametrize("content", [b"this is not a database\n" * 200, b""], ids=["garbage", "empty"])
def test_not_a_history_database(tmp_path, cmd, content):
    """A file that is no cmdrelay history: non-zero, one clear line naming
    the file, and the file left as it was. (consumers and stats name it;
    history says only "file is not a database" / "no such table: messages".)"""
    path = tmp_path / "history.db"
    path.write_bytes(content)
    r = ctl("--db", path, "--socket", tmp_path / "no.sock", *cmd)
    assert r.returncode not in (0, EX_USAGE), err(r)
    last = err(r).splitlines()[-1]
    assert last.startswith("cmdrelayctl: ") and str(path) in last, err(r)
    assert path.read_bytes() == content


def test_database_is_a_directory(tmp_path):
    r = ctl("--db", tmp_path, "history")
    assert r.returncode not in (0, EX_USAGE) and str(tmp_path) in err(r), err(r)


# --------------------------------------------------------------------------
# with the daemon running: stats and tail over the socket
# --------------------------------------------------------------------------

class Lines:
    """Reads a stream of a child (stdout or stderr) line by line in a thread."""

    def __init__(self, stream):
        self.lines, self.cond = [], threading.Condition()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream):
        for line in stream:
            with self.cond:
                self.lines.append(line.decode(errors="replace").rstrip("\n"))
                self.cond.notify_all()

    def wait(self, n, timeout=10):
        """The first n lines or more (fewer after timeout)."""
        with self.cond:
            self.cond.wait_for(lambda: len(self.lines) >= n, timeout)
            return list(self.lines)


class Tail:
    """cmdrelayctl tail as a child process."""

    def __init__(self, *args):
        self.proc = subprocess.Popen([str(CMDRELAYCTL), *map(str, args)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        self.out = Lines(self.proc.stdout)
        self.err = Lines(self.proc.stderr)

    def welcomed(self, timeout=10):
        lines = self.err.wait(1, timeout)
        assert lines and lines[0].startswith("cmdrelayctl: following "), lines
        return lines[0]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def test_live_stats_and_tail(known, mosquitto, uid, tmp_path):
    """The known history under a running cmdrelayd (a new broker session on a
    topic of this test only, so nothing is replayed into it)."""
    live_topic = f"/cf/v1/AAA/{uid}/live/set"
    relay = Relay(tmp_path / "relay", mosquitto, f"gateway-{uid}", [live_topic])
    shutil.copyfile(known.db, relay.db_path)
    tails = []
    try:
        relay.start()
        conf = relay.conf_path

        r = ctl("-c", conf, "stats")
        stats = json.loads(ok(r))
        assert stats["type"] == "stats" and stats["source"] == "cmdrelayd", stats
        assert "reading the history" not in err(r)

        # history reads the live WAL database
        assert [o["id"] for o in json_lines(ctl("-c", conf, "history", "--json"))] == \
            [known.id(n) for n in known.by_id(NAMES)]

        # anonymous tail from id 0: every accepted command, in order, as JSON
        t1 = Tail("-c", conf, "tail", "--from", "0", "--json", "--once")
        tails.append(t1)
        assert t1.welcomed() == "cmdrelayctl: following live after #0"
        got = [json.loads(x) for x in t1.out.wait(len(ACCEPTED))]
        assert [(g["id"], g["topic"], g["payload"], g["encoding"], g["retained"], g["received_at"])
                for g in got] == \
            [(known.id(n), SPEC[n][0], known.history_json(n)["payload"], known.history_json(n)["encoding"],
              bool(SPEC[n][5]), known.t(n)) for n in known.by_id(ACCEPTED)]

        # a live tail, table form: a new command shows up, in both tails
        t2 = Tail("-c", conf, "tail")
        tails.append(t2)
        assert t2.welcomed().startswith("cmdrelayctl: following live after #")
        publish(mosquitto, live_topic, b"hello live", qos=1)
        new_id = known.id("b_on") + 1
        line = t2.out.wait(1)[0]
        assert line.split() == [str(new_id), line.split()[1], live_topic, "hello", "live"]
        # people's time: local, with its offset (JSON above stays UTC)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d", line.split()[1])
        assert json.loads(t1.out.wait(len(ACCEPTED) + 1)[-1])["id"] == new_id

        # a named tail resumes after the consumer's ack, and acknowledges
        t3 = Tail("-c", conf, "tail", "--consumer", "lamp", "--filter", LAMP_FILTER)
        tails.append(t3)
        assert t3.welcomed() == f"cmdrelayctl: following as consumer lamp after #{known.id('a_reboot1')}"
        got = t3.out.wait(len(LAMP_PENDING))
        assert [int(x.split()[0]) for x in got] == [known.id(n) for n in known.by_id(LAMP_PENDING)]
        # the same rendering as history's: \xNN, not base64
        assert got[known.by_id(LAMP_PENDING).index("c_bin")].endswith(f"{TC} \\x00\\xff\\x10")
        _wait(lambda: relay.query("SELECT acked_id FROM consumers WHERE name = 'lamp'") ==
              [(known.id("b_on"),)], 10, "lamp's acks")
        lamp = [c for c in json_lines(ctl("-c", conf, "consumers", "--json")) if c["consumer"] == "lamp"]
        assert (lamp[0]["acked_id"], lamp[0]["lag"]) == (known.id("b_on"), 0)

        # the daemon goes away: a tail --once ends, non-zero, saying why (others reconnect)
        relay.stop()
        t1.proc.wait(10)
        assert t1.proc.returncode not in (0, None)
        assert "cmdrelayd closed the connection" in "\n".join(t1.err.wait(2, 5))
    finally:
        for t in tails:
            t.stop()
        if relay.running():
            relay.stop()


def test_history_times_with_offsets_and_days(known):
    def ids(*args):
        return [o["id"] for o in json_lines(ctl("--db", known.db, "history", "--json", "--limit", "1000", *args))]
    # the same instant written three ways selects the same rows
    utc = ids("--since", f"{DAY2}T09:30:00Z")
    assert utc, "the fixture has rows on DAY2"
    assert ids("--since", f"{DAY2}T10:30:00+01:00") == utc
    assert ids("--since", f"{DAY2}T04:00-0530") == utc
    assert ids("--until", f"{DAY2}T09:29:59+00") == [i for i in ids() if i not in utc]
    # today / yesterday: the local midnights that began those days
    import datetime
    rows = json_lines(ctl("--db", known.db, "history", "--json", "--limit", "1000"))
    midnight = datetime.datetime.now().astimezone().replace(hour=0, minute=0, second=0, microsecond=0)
    for word, start in (("today", midnight), ("yesterday", midnight - datetime.timedelta(days=1))):
        want = [o["id"] for o in rows if datetime.datetime.fromisoformat(o["received_at"].replace("Z", "+00:00"))
                >= start]
        assert ids("--since", word) == want, word
    for bad in (f"{DAY2}T10:30:00+25:00", f"{DAY2}T10:30:00+01:0", f"{DAY2}+01:00", "tomorrow"):
        r = ctl("--db", known.db, "history", "--since", bad)
        assert r.returncode == EX_USAGE and "today, yesterday" in err(r), (bad, err(r))


def test_history_says_when_rows_were_left_out(known):
    total = len(json_lines(ctl("--db", known.db, "history", "--json", "--limit", "1000")))
    r = ctl("--db", known.db, "history", "--limit", "2")
    assert len(ok(r).splitlines()) == 1 + 2
    assert f"{total - 2} more rows match; use --limit N" in err(r)
    r = ctl("--db", known.db, "history", "--limit", str(total))
    assert ok(r) and err(r) == ""
