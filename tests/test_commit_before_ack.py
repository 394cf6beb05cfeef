"""e. G1 shown directly, not by luck.

A scripted peer plays the broker: a small MQTT 3.1.1 server on 127.0.0.1
(FakeBroker below) that the real cmdrelayd connects to. The peer decides
exactly what is sent and when, and the moment it reads a PUBACK for packet
id X it opens its own read-only SQLite connection to the relay's history and
checks that X's row is already committed. A daemon that acknowledged before
committing would be caught on the first such PUBACK, whatever the timing.

Every wait is bounded: a broken daemon fails a test, it never hangs it.
"""
import collections
import random
import secrets
import socket
import sqlite3
import struct
import threading
import time

import pytest

from brokers import (CONNACK, CONNECT, DISCONNECT, PINGREQ, PINGRESP, PUBACK, SUBACK,
                     SUBSCRIBE, UNSUBACK, UNSUBSCRIBE, encode_publish, mqtt_packet, parse_packet,
                     take_str)
from relay import Relay

TOPIC = "/cf/v1/AAA/012C/012C000003AX/set"


# --------------------------------------------------------------------------
# the scripted broker
# --------------------------------------------------------------------------

class PubackCheck:
    """What the peer saw when it read one PUBACK."""
    __slots__ = ("mid", "payload", "recv_no", "row_ids", "statuses", "burst_committed", "burst_size")

    def __init__(self, mid, payload, recv_no):
        self.mid, self.payload, self.recv_no = mid, payload, recv_no
        self.row_ids, self.statuses = [], []
        self.burst_committed = self.burst_size = None

    @property
    def committed(self):
        return len(self.row_ids) > 0


class PeerConnection:
    """One TCP connection from the relay, served by its own reader thread."""

    def __init__(self, broker, sock, index):
        self.broker = broker
        self.sock = sock
        self.index = index
        self.session_present = broker.session_present_for(index)
        self.send_lock = threading.Lock()
        self.cond = threading.Condition()
        self.connect_info = None          # dict from the CONNECT packet
        self.subscribes = []              # [(filter, requested qos)] in order
        self.unsubscribes = []
        self.barriers = []                # the relay's barrier requests, in order
        self.answer_barriers = True       # False: as if the PUBACKs before them were lost
        self.pings = 0
        self.got_disconnect = False
        self.closed_at = None             # monotonic time of EOF / reset
        self.close_reason = None
        self.errors = []                  # protocol violations seen by the reader
        self.sent = {}                    # mid -> payload of the PUBLISH in flight
        self.burst_of = {}                # mid -> tuple of payloads sent in the same sendall
        self.first_of_burst_seen = set()  # id() of bursts whose first PUBACK was checked
        self.pubacks = []                 # PubackCheck, in arrival order
        self.recv_count = 0
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"peer-conn-{index}")
        self.thread.start()

    # ---- sending (test thread) ------------------------------------------------

    def send_burst(self, messages, dup=False):
        """messages: [(mid, payload)], written with one sendall."""
        burst = tuple(p for _, p in messages)
        with self.cond:
            for mid, payload in messages:
                self.sent[mid] = payload
                self.burst_of[mid] = burst
        data = b"".join(encode_publish(TOPIC, p, qos=1, retain=False, dup=dup, mid=mid)
                        for mid, p in messages)
        with self.send_lock:
            self.sock.sendall(data)

    def abort(self):
        """Die like a crashed broker: TCP reset, no more packets."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.thread.join(5)
        self.sock.close()

    # ---- waiting (test thread) ------------------------------------------------

    def wait(self, predicate, timeout, what):
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate(self):
                self.broker.check_relay_alive(what)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"connection {self.index}: timed out after {timeout}s "
                                         f"waiting for {what}; {len(self.pubacks)} PUBACKs, "
                                         f"closed={self.close_reason!r}, errors={self.errors}\n"
                                         f"{self.broker.relay_log()}")
                self.cond.wait(min(left, 0.1))

    def wait_pubacks(self, n, timeout=10):
        self.wait(lambda c: len(c.pubacks) >= n or c.closed_at is not None, timeout, f"{n} PUBACKs")
        assert len(self.pubacks) >= n, \
            f"connection closed with {len(self.pubacks)}/{n} PUBACKs: {self.close_reason}"

    def wait_closed(self, timeout):
        self.wait(lambda c: c.closed_at is not None, timeout, "the relay to close the connection")

    # ---- reader thread ---------------------------------------------------------

    def _send(self, data):
        with self.send_lock:
            self.sock.sendall(data)

    def _closed(self, reason):
        with self.cond:
            if self.closed_at is None:
                self.closed_at = time.monotonic()
                self.close_reason = reason
            self.cond.notify_all()

    def _run(self):
        buf = bytearray()
        try:
            while True:
                try:
                    data = self.sock.recv(1 << 16)
                except (ConnectionResetError, BrokenPipeError) as e:
                    self._closed(f"reset: {e}")
                    return
                except OSError as e:
                    self._closed(f"socket error: {e}")
                    return
                if not data:
                    self._closed("eof")
                    return
                self.recv_count += 1
                buf += data
                while True:
                    pkt = parse_packet(buf)
                    if pkt is None:
                        break
                    self._dispatch(*pkt)
        except Exception as e:   # a bug in the peer must fail the test, not vanish
            with self.cond:
                self.errors.append(f"peer crashed: {e!r}")
            self._closed(f"peer error: {e!r}")

    def _error(self, text):
        with self.cond:
            self.errors.append(text)
            self.cond.notify_all()

    def _dispatch(self, ptype, flags, body):
        if ptype != CONNECT and self.connect_info is None:
            self._error(f"packet type {ptype} before CONNECT")
        if ptype == CONNECT:
            self._on_connect(flags, body)
        elif ptype == SUBSCRIBE:
            if flags != 0x2:
                self._error(f"SUBSCRIBE with flags {flags:#x}")
            mid = struct.unpack_from("!H", body)[0]
            pos, granted = 2, []
            while pos < len(body):
                topic, pos = take_str(body, pos)
                qos = body[pos]
                pos += 1
                if self._barrier(topic, "SUBSCRIBE"):
                    if self.answer_barriers:
                        self._send(mqtt_packet(SUBACK, 0, struct.pack("!H", mid) + b"\x00"))
                    return
                with self.cond:
                    self.subscribes.append((topic.decode(), qos))
                granted.append(1)
            self._send(mqtt_packet(SUBACK, 0, struct.pack("!H", mid) + bytes(granted)))
        elif ptype == UNSUBSCRIBE:
            mid = struct.unpack_from("!H", body)[0]
            pos = 2
            while pos < len(body):
                topic, pos = take_str(body, pos)
                if self._barrier(topic, "UNSUBSCRIBE"):
                    if self.answer_barriers:
                        self._send(mqtt_packet(UNSUBACK, 0, struct.pack("!H", mid)))
                    return
                with self.cond:
                    self.unsubscribes.append(topic.decode())
            self._send(mqtt_packet(UNSUBACK, 0, struct.pack("!H", mid)))
        elif ptype == PINGREQ:
            self.pings += 1
            self._send(mqtt_packet(PINGRESP, 0))
        elif ptype == PUBACK:
            self._on_puback(struct.unpack_from("!H", body)[0])
        elif ptype == DISCONNECT:
            with self.cond:
                self.got_disconnect = True
                self.cond.notify_all()
        else:
            self._error(f"unexpected packet type {ptype} from the relay")

    def _barrier(self, topic, what):
        """True for the relay's barrier (broker.barrier_topic), recorded apart
        from the configured filters."""
        if topic.decode() != BARRIER_TOPIC:
            return False
        with self.cond:
            self.barriers.append(what)
            self.cond.notify_all()
        return True

    def _on_connect(self, flags, body):
        name, pos = take_str(body, 0)
        level, cflags = body[pos], body[pos + 1]
        keepalive = struct.unpack_from("!H", body, pos + 2)[0]
        client_id, pos = take_str(body, pos + 4)
        info = {"protocol": name.decode(), "level": level, "flags": cflags,
                "clean_session": bool(cflags & 0x02), "keepalive": keepalive,
                "client_id": client_id.decode()}
        with self.cond:
            if self.connect_info is not None:
                self.errors.append("second CONNECT on one connection")
            self.connect_info = info
        self._send(mqtt_packet(CONNACK, 0, bytes([1 if self.session_present else 0, 0])))
        with self.cond:
            self.cond.notify_all()

    def _on_puback(self, mid):
        """Runs the instant the PUBACK is parsed, before the next recv()."""
        with self.cond:
            payload = self.sent.get(mid)
            burst = self.burst_of.get(mid)
        check = PubackCheck(mid, payload, self.recv_count)
        if payload is None:
            self._error(f"PUBACK for packet id {mid} that was never sent on this connection")
        else:
            db = sqlite3.connect(f"file:{self.broker.db_path}?mode=ro", uri=True, timeout=5)
            try:
                for row_id, status in db.execute(
                        "SELECT id, status FROM messages WHERE payload = ? ORDER BY id", (payload,)):
                    check.row_ids.append(row_id)
                    check.statuses.append(status)
                if id(burst) not in self.first_of_burst_seen:
                    # First PUBACK of this burst: how much of the burst is committed already?
                    self.first_of_burst_seen.add(id(burst))
                    marks = ",".join("?" * len(burst))
                    check.burst_size = len(burst)
                    check.burst_committed = db.execute(
                        f"SELECT count(DISTINCT payload) FROM messages WHERE payload IN ({marks})",
                        burst).fetchone()[0]
            finally:
                db.close()
        with self.cond:
            self.pubacks.append(check)
            self.cond.notify_all()


BARRIER_TOPIC = "$cmdrelay/barrier"     # broker.barrier_topic's default


class FakeBroker:
    """A scripted MQTT 3.1.1 'broker' on 127.0.0.1 with a free port. Accepts
    connections in a thread; every connection gets a PeerConnection. The
    first connection's CONNACK says session present = 0, later ones 1 (the
    broker kept the durable session). Like Mosquitto it redelivers with the
    original packet ids."""

    packet_ids = "kept"

    def __init__(self, db_path):
        self.host = "127.0.0.1"
        self.db_path = db_path
        self.relay = None
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind((self.host, 0))
        self.lsock.listen(8)
        self.port = self.lsock.getsockname()[1]
        self.cond = threading.Condition()
        self.connections = []
        self.closing = False
        self.thread = threading.Thread(target=self._accept, daemon=True, name="fake-broker")
        self.thread.start()

    lost_sessions = ()       # connection indexes whose CONNACK says the session is gone

    def session_present_for(self, index):
        return index > 0 and index not in self.lost_sessions

    def relay_log(self):
        return self.relay.log()[-4000:] if self.relay is not None else ""

    def check_relay_alive(self, what):
        """Fail at once, and say so, if cmdrelayd is gone (crashed, or killed
        by something outside the test) instead of timing out later."""
        proc = self.relay.proc if self.relay is not None else None
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"cmdrelayd exited with status {proc.returncode} while waiting for "
                                 f"{what}:\n{self.relay_log()}")

    def _accept(self):
        while not self.closing:
            try:
                sock, _ = self.lsock.accept()
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # a whole burst goes out as one write into the relay's receive queue
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            with self.cond:
                conn = PeerConnection(self, sock, len(self.connections))
                self.connections.append(conn)
                self.cond.notify_all()

    def wait_connection(self, index, timeout=10):
        """The index-th connection (0-based), once its CONNECT was answered."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.connections) <= index:
                self.check_relay_alive(f"connection #{index}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no connection #{index} from the relay within {timeout}s:\n"
                                         f"{self.relay_log()}")
                self.cond.wait(min(left, 0.1))
            conn = self.connections[index]
        conn.wait(lambda c: c.connect_info is not None, timeout, "CONNECT")
        return conn

    def close(self):
        self.closing = True
        try:
            self.lsock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.lsock.close()
        self.thread.join(5)
        with self.cond:
            conns = list(self.connections)
        for c in conns:
            try:
                c.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.thread.join(5)
            c.sock.close()


# --------------------------------------------------------------------------
# fixtures and helpers
# --------------------------------------------------------------------------

@pytest.fixture
def setup(tmp_path):
    """(fake broker, started relay, its first connection)."""
    client_id = f"gateway-{secrets.token_hex(4)}"
    workdir = tmp_path / "relay"
    broker = FakeBroker(workdir / "history.db")
    relay = Relay(workdir, broker, client_id, [TOPIC])
    broker.relay = relay
    try:
        relay.start(timeout=15)    # READY=1, then "subscriptions in place" (our SUBACK)
        conn = broker.wait_connection(0)
        check_handshake(conn, client_id, expect_subscribe=True)
        yield broker, relay, conn
        if relay.running():
            relay.stop()
    finally:
        if relay.proc is not None:
            relay.kill()
        broker.close()


def check_handshake(conn, client_id, expect_subscribe):
    """CONNECT as a durable session; SUBSCRIBE of the configured filter only
    on a fresh session. Call with expect_subscribe=False only after the relay
    has answered something sent after the CONNACK (e.g. PUBACKs): packets
    leave it in order, so a SUBSCRIBE queued at connect would be in already."""
    info = conn.connect_info
    assert info["protocol"] == "MQTT" and info["level"] == 4, info
    assert info["client_id"] == client_id, info
    assert info["clean_session"] is False, f"the relay must keep a durable session: {info}"
    if expect_subscribe:
        conn.wait(lambda c: len(c.subscribes) >= 1, 10, "SUBSCRIBE")
        assert conn.subscribes == [(TOPIC, 1)]
    else:
        # G8: with session present = 1 the broker still has the subscription;
        # a new SUBSCRIBE would trigger retained replays.
        assert conn.subscribes == []
    assert conn.unsubscribes == []


def payloads(tag, n):
    token = secrets.token_hex(3)
    return [f"{tag}-{token}-{i:05d}".encode() for i in range(n)]


def assert_checks_passed(conn, expected):
    """Every PUBACK on conn was for a message whose row was committed; each message
    in expected ({mid: payload}) was PUBACKed exactly once."""
    assert conn.errors == []
    mids = collections.Counter(c.mid for c in conn.pubacks)
    assert {m: n for m, n in mids.items() if n > 1} == {}, "a message was PUBACKed twice"
    assert set(mids) == set(expected)
    assert len(conn.pubacks) == len(expected)   # the check ran once per PUBACK
    not_committed = [(c.mid, c.payload) for c in conn.pubacks if not c.committed]
    assert not_committed == [], f"PUBACK before commit (G1 violated) for {not_committed[:10]}"
    for c in conn.pubacks:
        assert c.payload == expected[c.mid]


# --------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------

def test_puback_only_after_commit(setup):
    """2,000 QoS 1 messages in bursts of random sizes (one sendall each): each
    PUBACK is checked against the database the moment it is read."""
    broker, relay, conn = setup
    rng = random.Random(secrets.randbits(32))
    msgs = payloads("g1", 2000)
    expected = {}
    bursts = []
    i = 0
    while i < len(msgs):
        size = rng.randint(1, 300)
        burst = [(i + k + 1, p) for k, p in enumerate(msgs[i:i + size])]   # mids 1..2000
        i += len(burst)
        bursts.append(burst)

    t0 = time.monotonic()
    for burst in bursts:
        conn.send_burst(burst)
        expected.update(burst)
        conn.wait_pubacks(len(expected), timeout=15)
    elapsed = time.monotonic() - t0

    assert_checks_passed(conn, expected)
    assert sum(c.committed for c in conn.pubacks) == len(expected) == 2000

    # Each payload: exactly one row, accepted (no false duplicate, no double insert).
    rows = relay.rows()
    by_payload = collections.defaultdict(list)
    for r in rows:
        by_payload[bytes(r["payload"])].append(r)
    assert len(rows) == 2000
    assert set(by_payload) == set(msgs)
    for p, rs in by_payload.items():
        assert [(r["status"], r["reason"], r["dup"], r["qos"]) for r in rs] == [("accepted", None, 0, 1)], p
    # Rows carry the packet id they were delivered with.
    assert {r["mid"]: bytes(r["payload"]) for r in rows} == expected

    # Batching (one commit for many messages, PUBACKs after it): when the first
    # PUBACK of a burst was read, other messages of that burst, sent after it
    # in the same write, were already committed too.
    firsts = [c for c in conn.pubacks if c.burst_size is not None]
    assert len(firsts) == len(bursts)
    whole = [c for c in firsts if c.burst_size > 1 and c.burst_committed == c.burst_size]
    assert whole, ("no burst was committed as a whole before its first PUBACK: "
                   f"{[(c.burst_size, c.burst_committed) for c in firsts]}")
    # and the relay acknowledged many messages per write: fewer recv() calls
    # than PUBACKs on our side.
    recvs_with_pubacks = len({c.recv_no for c in conn.pubacks})
    assert recvs_with_pubacks < len(conn.pubacks)
    print(f"\n{len(bursts)} bursts, {elapsed:.2f}s; {len(whole)}/{sum(c.burst_size > 1 for c in firsts)} "
          f"multi-message bursts fully committed at their first PUBACK; "
          f"{len(conn.pubacks)} PUBACKs in {recvs_with_pubacks} recv() calls")


def test_no_puback_while_the_history_is_locked(setup):
    """The history's write lock is held by someone else (an admin's
    sqlite3), so the relay cannot store the batch. No PUBACK may leave, and
    nothing is lost: the relay stops reading from the connection (the
    batch waits in the socket), keeps it, and once the lock is gone commits
    the 50 messages, then PUBACKs each, recorded once as accepted. (Before
    issue 12 it failed the batch and dropped the connection; G6's drop
    stays for storage that fails, tests/test_faults.py.)"""
    broker, relay, conn = setup
    msgs = [(mid, p) for mid, p in zip(range(101, 151), payloads("g6", 50))]
    expected = dict(msgs)

    blocker = sqlite3.connect(str(relay.db_path), isolation_level=None, timeout=5)
    try:
        blocker.execute("BEGIN IMMEDIATE")      # hold the write lock (daemon busy_timeout: 100 ms)
        conn.send_burst(msgs)
        relay.wait_log("locked by another writer", 5)
        time.sleep(1.5)
        assert conn.pubacks == [], \
            f"PUBACKs for uncommitted messages: {[c.mid for c in conn.pubacks]}"
        assert conn.errors == [] and conn.closed_at is None
        # Nothing of the batch is in the history (read through WAL while locked).
        marks = ",".join("?" * len(msgs))
        assert relay.query(f"SELECT count(*) FROM messages WHERE payload IN ({marks})",
                           [p for _, p in msgs])[0][0] == 0
        assert relay.running()
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()

    conn.wait_pubacks(len(msgs), timeout=15)
    assert_checks_passed(conn, expected)
    assert conn.closed_at is None
    rows = [r for r in relay.rows() if bytes(r["payload"]) in set(expected.values())]
    assert len(rows) == 50
    assert sorted(bytes(r["payload"]) for r in rows) == sorted(expected.values())
    for r in rows:
        assert (r["status"], r["reason"], r["duplicate_of"], r["dup"]) == ("accepted", None, None, 0)
        assert expected[r["mid"]] == bytes(r["payload"])
    assert "dropped the connection" not in relay.log(since_start=True)


def test_redelivery_after_lost_puback(setup):
    """10 messages committed and PUBACKed; the broker 'loses' the last 3
    PUBACKs (connection reset) and redelivers them with DUP=1 and the same
    packet ids after the reconnect, followed by 2 new messages."""
    broker, relay, conn = setup
    first = [(mid, p) for mid, p in zip(range(1, 11), payloads("rd", 10))]
    conn.answer_barriers = False    # it never got the PUBACKs it will lose
    conn.send_burst(first)
    conn.wait_pubacks(10)
    assert_checks_passed(conn, dict(first))
    originals = {bytes(r["payload"]): r["id"] for r in relay.rows()}
    assert len(originals) == 10

    conn.abort()

    conn2 = broker.wait_connection(1, timeout=10)
    assert conn2.session_present
    again = first[-3:]
    new = [(11, b"rd-new-" + secrets.token_hex(3).encode()), (12, b"rd-new-" + secrets.token_hex(3).encode())]
    conn2.send_burst(again, dup=True)
    conn2.send_burst(new, dup=False)
    conn2.wait_pubacks(5)
    check_handshake(conn2, relay.client_id, expect_subscribe=False)
    assert_checks_passed(conn2, dict(again + new))

    rows = relay.rows()
    assert len(rows) == 15
    assert relay.count("status = 'accepted'") == 12
    redelivered = rows[10:13]
    assert [(bytes(r["payload"]), r["status"], r["reason"], r["dup"], r["mid"]) for r in redelivered] == \
        [(p, "duplicate", "redelivery", 1, mid) for mid, p in again]
    assert [r["duplicate_of"] for r in redelivered] == [originals[p] for _, p in again]
    assert [(bytes(r["payload"]), r["status"], r["reason"], r["duplicate_of"], r["dup"]) for r in rows[13:]] == \
        [(p, "accepted", None, None, 0) for _, p in new]
    # The first ten stay as they were: accepted, DUP=0.
    assert [(bytes(r["payload"]), r["status"]) for r in rows[:10]] == [(p, "accepted") for _, p in first]


def test_no_redelivery_from_a_broker_without_our_session(setup):
    """A broker that answers session present = 0 (it lost the session, or it
    is another endpoint sharing nothing) holds none of our messages: a DUP=1
    delivery with the packet id and content of a row whose PUBACK it never
    got is a new command there, not a repeat to drop."""
    broker, relay, conn = setup
    broker.lost_sessions = (1,)
    first = [(mid, p) for mid, p in zip(range(1, 4), payloads("ls", 3))]
    conn.answer_barriers = False            # the three stay unconfirmed
    conn.send_burst(first)
    conn.wait_pubacks(3)
    conn.abort()

    conn2 = broker.wait_connection(1, timeout=10)
    assert not conn2.session_present
    conn2.wait(lambda c: len(c.subscribes) >= 1, 10, "SUBSCRIBE")   # it subscribes again
    again = first[-1:]
    conn2.send_burst(again, dup=True)
    conn2.wait_pubacks(1)
    rows = relay.rows()
    assert [(bytes(r["payload"]), r["status"], r["reason"]) for r in rows] == \
        [(p, "accepted", None) for _, p in first] + [(again[0][1], "accepted", "possible_repeat")]
