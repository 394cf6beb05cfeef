"""The fault suite: the real cmdrelayd, real brokers, real consumer processes,
and the faults an operator meets (design.md G1-G6).

Every broker test runs against Mosquitto 2.0 and RabbitMQ 3.10 through the
`broker` fixture. `make check` runs these short versions; `make soak`
(scripts/soak.py, which imports the machinery below) runs the same faults in
a long randomized mix.

The pieces:

- Publisher: a thread that publishes a list of commands with QoS 1 and keeps,
  per command, whether the broker confirmed it (PUBACK) or whether it was in
  flight when the broker went away ("maybe": the broker may or may not have
  it). It never re-sends a command, so every payload is one publication.
- A consumer *process* (this file run as a program, `consumer` mode): a named
  consumer that connects to the relay's socket, retries while the relay is
  down or says `consumer_busy`, acks cumulatively at random intervals, and
  writes everything it sees and does to a record file, one line per event,
  before acting on it (so a `kill -9` loses nothing of the record).
- check_history / check_consumer: what the history and each consumer's
  record must satisfy (G1-G4); both return figures and a list of problems.
- FaultRun: one relay, its consumers and the faults (relay `kill -9`,
  consumer `kill -9`, broker restart), used by the tests and by the soak.

What "acked" means for the consumer side: an ack counts once the relay has
read it; the consumer cannot see that, and a `kill -9` of the relay can
lose an ack that was on its way. So check_consumer allows a command to come
again only above the `resume_after` of the connection that brings it again
(the relay's durable cursor), and an ack may be missing from that cursor
only if the relay was killed less than LOST_ACK_GRACE seconds after the
consumer sent it. A consumer's own death loses no ack: the relay reads
what the dead socket still holds.
"""
import argparse
import bisect
import collections
import hashlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from consumer_client import Closed, ConsumerClient, ProtocolError  # noqa: E402

HERE = Path(__file__).resolve()

# How long after sending an ack a relay kill may still lose it. The relay
# reads consumer sockets between broker read passes (a commit of up to 1,024
# rows), so an ack normally reaches the database within milliseconds.
LOST_ACK_GRACE = 2.0


# ==========================================================================
# the consumer program (this file run as `python3 test_faults.py consumer`)
# ==========================================================================

def consumer_main(argv):
    p = argparse.ArgumentParser(prog="test_faults.py consumer")
    p.add_argument("--socket", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--filter", required=True)
    p.add_argument("--record", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-ack-every", type=int, default=64)
    a = p.parse_args(argv)

    rng = random.Random(a.seed ^ os.getpid())
    rec = open(a.record, "a", buffering=1)        # one write(2) per line

    def note(*fields):
        rec.write(" ".join(str(f) for f in fields) + "\n")

    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    pid = os.getpid()
    note("P", pid, f"{time.monotonic():.6f}")
    k = 0
    while not stop:
        try:
            c = ConsumerClient.connect(a.socket, timeout=0.5)
        except OSError:
            time.sleep(0.05)
            continue
        k += 1
        conn = f"{pid}.{k}"
        try:
            try:
                welcome = c.hello(consumer=a.name, filter=a.filter, timeout=5)
            except ProtocolError as e:
                code = (e.reply or {}).get("code", "none")
                note("B", conn, code, f"{time.monotonic():.6f}")
                c.close()
                time.sleep(0.05)
                continue
            note("W", conn, welcome["resume_after"], f"{time.monotonic():.6f}")
            pending = None          # the last command received and not acked
            last_acked = None
            reack = False
            n_unacked = 0
            ack_at = rng.randint(1, a.max_ack_every)

            def ack(cid):
                note("a", conn, cid, f"{time.monotonic():.6f}")
                c.ack(cid)
                note("A", conn, cid, f"{time.monotonic():.6f}")

            while not stop:
                msg = c.recv_json(0.05)
                if msg is None:
                    if pending is not None:
                        ack(pending)
                        last_acked, pending, n_unacked = pending, None, 0
                        ack_at = rng.randint(1, a.max_ack_every)
                    elif reack and last_acked is not None:
                        ack(last_acked)
                        reack = False
                    continue
                kind = msg.get("type")
                if kind == "command":
                    note("D", conn, msg["id"], msg["topic"], msg["payload"])
                    pending = msg["id"]
                    n_unacked += 1
                    if n_unacked >= ack_at:
                        ack(pending)
                        last_acked, pending, n_unacked = pending, None, 0
                        ack_at = rng.randint(1, a.max_ack_every)
                elif kind == "error":
                    note("R", conn, msg.get("code"), f"{time.monotonic():.6f}")
                    if msg.get("code") == "storage":
                        reack = True    # "the ack could not be stored; send it again"
            if stop:
                if pending is not None:
                    ack(pending)
                note("Q", conn, f"{time.monotonic():.6f}")
        except (Closed, OSError, ProtocolError) as e:
            why = str(e).replace("\n", " ")[:100] or type(e).__name__
            note("E", conn, f"{time.monotonic():.6f}", why)
            time.sleep(0.02)
        finally:
            c.close()
    rec.close()
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "consumer":
        sys.exit(consumer_main(sys.argv[2:]))
    sys.exit("usage: test_faults.py consumer --socket PATH --name NAME --filter FILTER --record FILE")


# ==========================================================================
# test-side machinery (also imported by scripts/soak.py)
# ==========================================================================

import pytest  # noqa: E402

from brokers import (PUBACK, MQTTProtocolError, Proxy, RawMQTTClient, encode_publish,  # noqa: E402
                     publish)
from relay import CMDRELAYD, Relay  # noqa: E402


class ConsumerProc:
    """One consumer process (consumer_main) and the reading of its record."""

    def __init__(self, workdir, socket_path, name, filter_, seed=0, max_ack_every=64):
        self.workdir = Path(workdir)
        self.socket_path = str(socket_path)
        self.name = name
        self.filter = filter_
        self.seed = seed
        self.max_ack_every = max_ack_every
        self.record = self.workdir / f"consumer-{name}.record"
        self.stderr = self.workdir / f"consumer-{name}.stderr"
        self.proc = None
        self.kills = []            # monotonic times of kill -9
        self._offset = 0
        self._tail = b""
        self.max_ack = 0           # the highest ack sent so far (A lines)

    def start(self):
        assert self.proc is None or self.proc.poll() is not None
        err = open(self.stderr, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE), "consumer", "--socket", self.socket_path, "--name", self.name,
             "--filter", self.filter, "--record", str(self.record), "--seed", str(self.seed),
             "--max-ack-every", str(self.max_ack_every)],
            stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        err.close()
        return self

    def kill(self):
        """kill -9: whatever the process had not written is gone, its socket
        is closed by the kernel."""
        if self.proc is not None and self.proc.poll() is None:
            self.kills.append(time.monotonic())
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout=10):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def poll_acks(self):
        """Reads the new part of the record; returns the highest ack sent."""
        if not self.record.exists():
            return self.max_ack
        with open(self.record, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        self._offset += len(data)
        data = self._tail + data
        lines = data.split(b"\n")
        self._tail = lines.pop()
        for line in lines:
            if line.startswith(b"A "):
                self.max_ack = max(self.max_ack, int(line.split()[2]))
        return self.max_ack

    def read_record(self):
        return self.record.read_text() if self.record.exists() else ""

    def stderr_text(self):
        return self.stderr.read_text(errors="replace") if self.stderr.exists() else ""


class Publisher(threading.Thread):
    """Publishes items[start:end] ((topic, payload) pairs, payloads unique)
    with QoS 1 and at most `window` unacknowledged. Broker gone: what was in
    flight becomes "maybe", then it reconnects and goes on with the next
    items, never re-sending one. `rate` (commands/s) spreads the stream."""

    def __init__(self, broker, items, start, end, confirmed, maybe, lock, rate=None,
                 window=100, client_id=None, give_up=300.0):
        super().__init__(daemon=True)
        self.broker = broker
        self.items = items
        self.start_index, self.end_index = start, end
        self.confirmed, self.maybe, self.lock = confirmed, maybe, lock
        self.rate = rate
        self.window = window
        self.client_id = client_id or f"pub-{os.getpid()}-{random.getrandbits(32):08x}"
        self.give_up = give_up
        self.reconnects = 0
        self.error = None
        self.halt = threading.Event()

    def run(self):
        try:
            self._run()
        except Exception as e:           # reported by the caller
            self.error = e

    def _run(self):
        idx = self.start_index
        t0 = time.monotonic()
        deadline = t0 + self.give_up
        while idx < self.end_index and not self.halt.is_set():
            if time.monotonic() > deadline:
                raise RuntimeError(f"publisher gave up at item {idx}")
            c = RawMQTTClient(self.broker.host, self.broker.port, self.client_id,
                              clean_session=True, timeout=5)
            try:
                c.connect()
            except (OSError, MQTTProtocolError):
                c.close()
                self.reconnects += 1
                time.sleep(0.2)
                continue
            # the pace goes on from here: no burst to make up for the outage
            if self.rate:
                t0 = time.monotonic() - (idx - self.start_index) / self.rate
            inflight = {}
            try:
                while (idx < self.end_index or inflight) and not self.halt.is_set():
                    budget = self.window - len(inflight)
                    if self.rate:
                        due = self.start_index + int((time.monotonic() - t0) * self.rate) + 1
                        budget = min(budget, due - idx)
                    batch = []
                    while budget > 0 and idx < self.end_index and len(batch) < 64:
                        mid = c.new_mid()
                        while mid in inflight:
                            mid = c.new_mid()
                        topic, payload = self.items[idx]
                        batch.append(encode_publish(topic, payload, 1, False, False, mid))
                        inflight[mid] = idx
                        idx += 1
                        budget -= 1
                    if batch:
                        c._send(b"".join(batch))
                    wait = 0.0 if batch else (0.5 if inflight else 0.01)
                    while True:
                        pkt = c.read_packet(wait)
                        if pkt is None:
                            break
                        if pkt[0] == PUBACK:
                            mid = int.from_bytes(pkt[2][:2], "big")
                            done = inflight.pop(mid, None)
                            if done is not None:
                                with self.lock:
                                    self.confirmed.add(done)
                        wait = 0.0
            except (OSError, MQTTProtocolError):
                with self.lock:
                    self.maybe.update(inflight.values())
                inflight.clear()
                self.reconnects += 1
                time.sleep(0.1)
            finally:
                if inflight:   # halted
                    with self.lock:
                        self.maybe.update(inflight.values())
                c.close()


# --------------------------------------------------------------------------
# the checks
# --------------------------------------------------------------------------

def check_history(rows, items, confirmed, maybe, allowed_reasons=("redelivery",)):
    """rows: (id, topic, payload, status, reason, duplicate_of) in id order.
    Every confirmed command accepted exactly once, a "maybe" one at most
    once, nothing else accepted; per topic in publish order; every duplicate
    row points at the accepted row with its topic and payload. An accepted
    row flagged possible_repeat (README, "How repeats are recognised") is
    the one repeat allowed: it must point at an earlier accepted row with its
    topic and payload, and is counted apart."""
    index = {(t, p if isinstance(p, bytes) else p.encode()): i for i, (t, p) in enumerate(items)}
    problems = []
    accepted_by_index = collections.Counter()
    accepted_rows = {}
    last_on_topic = {}
    dup_reasons = collections.Counter()
    flagged = 0
    for rid, topic, payload, status, reason, dup_of in rows:
        payload = bytes(payload)
        if reason == "possible_repeat":
            flagged += 1
            if accepted_rows.get(dup_of) != (topic, payload):
                problems.append(f"#{rid}: possible_repeat_of #{dup_of} is not an accepted row of "
                                f"{topic} {payload[:40]!r}")
            continue
        if status == "accepted":
            accepted_rows[rid] = (topic, payload)
            i = index.get((topic, payload))
            if i is None:
                problems.append(f"#{rid}: accepted a command nobody published: {topic} {payload[:40]!r}")
                continue
            accepted_by_index[i] += 1
            if i < last_on_topic.get(topic, -1):
                problems.append(f"#{rid}: {payload[:40]!r} accepted after a later command on {topic}")
            last_on_topic[topic] = max(i, last_on_topic.get(topic, -1))
        else:
            dup_reasons[reason] += 1
            if reason not in allowed_reasons:
                problems.append(f"#{rid}: duplicate with reason {reason!r}")
            if accepted_rows.get(dup_of) != (topic, payload):
                problems.append(f"#{rid}: duplicate_of #{dup_of} is not the accepted row of "
                                f"{topic} {payload[:40]!r}")
    for i, n in accepted_by_index.items():
        if n > 1:
            problems.append(f"{items[i][1]!r} accepted {n} times")
    lost = [i for i in confirmed if accepted_by_index[i] == 0]
    if lost:
        problems.append(f"{len(lost)} confirmed commands never accepted (lost), e.g. "
                        f"{[items[i][1] for i in sorted(lost)[:5]]}")
    figures = {
        "accepted": len(accepted_rows),
        "confirmed": len(confirmed),
        "maybe": len(maybe),
        "maybe_arrived": sum(1 for i in maybe if accepted_by_index[i]),
        "duplicate_rows": dict(dup_reasons),
        "possible_repeat": flagged,
    }
    return figures, problems


def parse_record(text):
    """The consumer record as a list of connections, in order."""
    conns, by_id = [], {}
    current_pid_conns = []
    for line in text.splitlines():
        f = line.split(" ")
        tag = f[0]
        if tag == "P":
            for c in current_pid_conns:
                if c["end"] is None:
                    c["end"] = "consumer killed"
            current_pid_conns = []
        elif tag == "W":
            c = {"conn": f[1], "resume": int(f[2]), "t": float(f[3]), "deliveries": [],
                 "acks": [], "intents": [], "errors": [], "end": None}
            conns.append(c)
            by_id[f[1]] = c
            current_pid_conns.append(c)
        elif tag in ("B", ""):
            continue
        else:
            c = by_id.get(f[1])
            if c is None:
                continue
            if tag == "D":
                c["deliveries"].append((int(f[2]), f[3], " ".join(f[4:])))
            elif tag == "a":
                c["intents"].append(int(f[2]))
            elif tag == "A":
                c["acks"].append((int(f[2]), float(f[3])))
            elif tag == "R":
                c["errors"].append(f[2])
            elif tag == "E":
                c["end"] = "relay side"
            elif tag == "Q":
                c["end"] = "quit"
    for c in current_pid_conns:
        if c["end"] is None:
            c["end"] = "open"
    return conns


def check_consumer(name, record_text, expected, relay_kills, grace=LOST_ACK_GRACE):
    """expected: [(id, topic, payload)] of the accepted commands matching the
    consumer's filter, in id order. relay_kills: (signal sent, process
    reaped) monotonic times of the relay's kill -9s. Checks G4 (all, in order, from the durable cursor) and
    that nothing comes twice unless its ack was lost in a relay kill."""
    conns = parse_record(record_text)
    ids = [e[0] for e in expected]
    pos = {i: n for n, i in enumerate(ids)}
    content = {e[0]: (e[1], e[2]) for e in expected}
    problems = []
    delivered = collections.Counter()
    acked_before = 0          # highest ack the consumer sent in earlier connections
    intents = {0}
    prev_resume = 0
    lost_acks, lost_gap = 0, 0.0
    again_unacked = again_after_lost_ack = 0
    kills = sorted(relay_kills, key=lambda k: k[1])
    dead_times = [k[1] for k in kills]

    for k, c in enumerate(conns):
        r = c["resume"]
        where = f"{name} connection {c['conn']} (resume_after {r})"
        if r < prev_resume:
            problems.append(f"{where}: the cursor went back from {prev_resume}")
        if r not in intents:
            problems.append(f"{where}: resume_after {r} is not an id this consumer acked")
        if k > 0:
            for aid, t in conns[k - 1]["acks"]:
                if aid <= r:
                    continue
                # the first relay death after the ack was sent (it may have
                # been sent between the SIGKILL and the end of the process)
                j = bisect.bisect_left(dead_times, t)
                if j < len(kills) and kills[j][0] - t <= grace:
                    lost_acks += 1
                    lost_gap = max(lost_gap, kills[j][0] - t)
                elif "storage" in conns[k - 1]["errors"]:
                    lost_acks += 1
                else:
                    problems.append(
                        f"{where}: the ack of #{aid} sent on {conns[k - 1]['conn']} "
                        f"({conns[k - 1]['end']}) was lost without a relay kill within {grace}s")
                    break
        expect = bisect.bisect_right(ids, r)
        prev_ack = None
        for did, topic, payload in c["deliveries"]:
            if did not in pos:
                problems.append(f"{where}: got #{did}, not an accepted command of its filter")
                continue
            if pos[did] != expect:
                want = ids[expect] if expect < len(ids) else None
                problems.append(f"{where}: got #{did} where #{want} was due (gap, disorder or repeat)")
            expect = pos[did] + 1
            if content[did] != (topic, payload):
                problems.append(f"{where}: #{did} came as {topic} {payload!r}, history has {content[did]}")
            delivered[did] += 1
            if delivered[did] > 1:
                if did <= r:
                    problems.append(f"{where}: #{did} again although the cursor is past it")
                elif did <= acked_before:
                    again_after_lost_ack += 1
                else:
                    again_unacked += 1
        for aid, _ in c["acks"]:
            if prev_ack is not None and aid <= prev_ack and "storage" not in c["errors"]:
                problems.append(f"{where}: acked #{aid} after #{prev_ack}")
            prev_ack = aid
        prev_resume = r
        intents.update(c["intents"])
        if c["acks"]:
            acked_before = max(acked_before, max(a for a, _ in c["acks"]))
    missing = [i for i in ids if delivered[i] == 0]
    if missing:
        problems.append(f"{name}: {len(missing)} commands never delivered, e.g. {missing[:10]}")
    if ids and acked_before != ids[-1]:
        problems.append(f"{name}: last ack #{acked_before}, last command #{ids[-1]}")
    figures = {
        "connections": len(conns),
        "deliveries": sum(delivered.values()),
        "distinct": len(delivered),
        "again_unacked": again_unacked,
        "again_after_lost_ack": again_after_lost_ack,
        "lost_acks": lost_acks,
        "longest_ack_to_kill_s": round(lost_gap, 3),
    }
    return figures, problems


def report(problems, limit=25):
    return "\n".join(problems[:limit]) + (f"\n... {len(problems) - limit} more" if len(problems) > limit else "")


# --------------------------------------------------------------------------
# a relay, its consumers and the faults
# --------------------------------------------------------------------------

class FaultRun:
    """One relay subscribed to /cf/v1/AAA/<uid>/+/set, `n_topics` device
    topics, and named consumer processes with different filters that all
    match every command."""

    def __init__(self, workdir, broker, uid, n_topics=2, consumers=("lamp", "siren"), seed=0,
                 store=None, say=None, max_ack_every=64):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.broker = broker
        self.uid = uid
        self.rng = random.Random(seed)
        self.say = say or (lambda *a: None)
        self.topics = [f"/cf/v1/AAA/{uid}/dev{d}/set" for d in range(n_topics)]
        overrides = {"store": store} if store else {}
        self.relay = Relay(self.workdir / "relay", broker, f"gateway-{uid}",
                           [f"/cf/v1/AAA/{uid}/+/set"], **overrides)
        if store:
            self.relay.db_path = Path(store["path"])
        filters = [f"/cf/v1/AAA/{uid}/#", f"/cf/v1/+/{uid}/+/set", "#"]
        self.consumers = [
            ConsumerProc(self.workdir, self.relay.workdir / "cmdrelay.sock", name, filters[n % 3],
                         seed=seed + n, max_ack_every=max_ack_every)
            for n, name in enumerate(consumers)]
        self.items = []
        self.confirmed, self.maybe = set(), set()
        self.lock = threading.Lock()
        self.publishers = []
        self.relay_kills = []      # (signal sent, process gone) of every relay end
        self.relay_pids = set()
        self.consumer_kills = 0
        self.broker_restarts = 0
        self.relay_restarts = 0     # clean stop and start (SIGTERM)

    # -- life cycle --------------------------------------------------------

    def start(self):
        self.relay.start()
        self.relay_pids.add(self.relay.proc.pid)
        for c in self.consumers:
            c.start()
        return self

    def close(self):
        for p in self.publishers:
            p.halt.set()
        for c in self.consumers:
            c.stop()
        if self.relay.running():
            self.relay.kill()

    # -- load --------------------------------------------------------------

    def publish(self, n, rate=None, window=100):
        """Starts a publisher of n new commands (round-robin over the topics)."""
        start = len(self.items)
        for i in range(start, start + n):
            self.items.append((self.topics[i % len(self.topics)], f"c{i:07d}-{self.uid}".encode()))
        p = Publisher(self.broker, self.items, start, start + n, self.confirmed, self.maybe,
                      self.lock, rate=rate, window=window)
        self.publishers.append(p)
        p.start()
        return p

    def publishing(self):
        return any(p.is_alive() for p in self.publishers)

    # -- faults ------------------------------------------------------------

    def kill_relay(self, restart=True):
        signalled = time.monotonic()
        self.relay.kill()
        self.relay_kills.append((signalled, time.monotonic()))
        if restart:
            self.relay.start(wait_subscribed=False)
            self.relay_pids.add(self.relay.proc.pid)

    def restart_relay(self):
        """SIGTERM, a clean exit 0, and a new start. Acks still unread in the
        consumer sockets at that moment are lost like in a kill."""
        signalled = time.monotonic()
        self.relay.stop()
        self.relay_kills.append((signalled, time.monotonic()))
        self.relay_restarts += 1
        self.relay.start(wait_subscribed=False)
        self.relay_pids.add(self.relay.proc.pid)

    def kill_consumer(self, c, restart_after=0.0):
        c.kill()
        self.consumer_kills += 1
        if restart_after:
            time.sleep(restart_after)
        c.start()

    def restart_broker(self):
        self.broker.restart()
        self.broker_restarts += 1

    # -- observation -------------------------------------------------------

    def accepted_count(self):
        return self.relay.count("status = 'accepted'")

    def last_accepted_id(self):
        return self.relay.query("SELECT coalesce(max(id), 0) FROM messages WHERE status = 'accepted'")[0][0]

    def wait_settled(self, timeout=120):
        """Publishers done, every confirmed command accepted, every consumer
        has acked the last accepted command; raises with the state if not."""
        deadline = time.monotonic() + timeout
        for p in self.publishers:
            p.join(max(1.0, deadline - time.monotonic()))
            if p.is_alive():
                raise AssertionError(f"publisher still running after {timeout}s")
            if p.error:
                raise AssertionError(f"publisher failed: {p.error!r}")
        self.published_at = time.monotonic()
        state = ""
        next_say = time.monotonic() + 5
        while time.monotonic() < deadline:
            if time.monotonic() > next_say:
                self.say(f"settling: {state}")
                next_say += 5
            n = self.accepted_count()
            last = self.last_accepted_id()
            acks = [c.poll_acks() for c in self.consumers]
            dead = [c.name for c in self.consumers if not c.running()]
            state = (f"accepted {n} of {len(self.confirmed)} confirmed (+{len(self.maybe)} maybe), "
                     f"last #{last}, consumer acks {acks}, dead consumers {dead}")
            if dead:
                raise AssertionError(f"consumer died: {state}\n" +
                                     "\n".join(c.stderr_text()[-2000:] for c in self.consumers))
            if n >= len(self.confirmed) and all(a == last for a in acks):
                time.sleep(0.3)
                if self.last_accepted_id() == last:
                    self.settled_at = time.monotonic()
                    return
            time.sleep(0.1)
        raise AssertionError(f"not settled after {timeout}s: {state}\n"
                             f"--- relay log tail\n{self.relay.log()[-4000:]}")

    def verify(self, allowed_reasons=("redelivery",), grace=LOST_ACK_GRACE, stop_consumers=True):
        """Checks the history and every consumer record (after wait_settled);
        returns the figures, raises AssertionError listing every problem."""
        if stop_consumers:
            for c in self.consumers:
                c.stop()
        rows = self.relay.query("SELECT id, topic, payload, status, reason, duplicate_of "
                                "FROM messages ORDER BY id")
        with self.lock:
            confirmed, maybe = set(self.confirmed), set(self.maybe)
        figures, problems = check_history(rows, self.items, confirmed, maybe, allowed_reasons)
        expected = [(rid, t, bytes(p).decode()) for rid, t, p, s, _, _ in rows if s == "accepted"]
        figures["consumers"] = {}
        for c in self.consumers:
            f, pr = check_consumer(c.name, c.read_record(), expected, self.relay_kills, grace)
            figures["consumers"][c.name] = f
            problems += pr
            cursor = self.relay.query("SELECT acked_id FROM consumers WHERE name = ?", (c.name,))
            if expected and cursor != [(expected[-1][0],)]:
                problems.append(f"{c.name}: consumers.acked_id is {cursor}, want {expected[-1][0]}")
        figures.update(relay_kills=len(self.relay_kills) - self.relay_restarts,
                       relay_restarts=self.relay_restarts, consumer_kills=self.consumer_kills,
                       broker_restarts=self.broker_restarts,
                       publisher_reconnects=sum(p.reconnects for p in self.publishers))
        if problems:
            raise AssertionError(f"{len(problems)} problems:\n{report(problems)}\nfigures: {figures}")
        return figures


def socket_request(path, obj, timeout=5.0):
    """One request line on a fresh connection to the relay; the reply dict."""
    c = ConsumerClient.connect(path, timeout=timeout)
    try:
        c.send_json(obj)
        return c.recv_json(timeout)
    finally:
        c.close()


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------

@pytest.fixture
def runs():
    """FaultRuns closed at teardown whatever happened."""
    made = []
    yield made.append
    for r in made:
        try:
            r.close()
        except Exception:
            pass


def _mount_tmpfs(path, size):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs (the tests run as root)")
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs on {path}: {r.stderr}", pytrace=False)


def _umount(path):
    if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def small_fs(tmp_path):
    """A 4 MiB tmpfs of this test only, unmounted at teardown."""
    d = tmp_path / "small"
    _mount_tmpfs(d, "4m")
    yield d
    _umount(d)


def fill_up(directory):
    """Writes a filler file until the filesystem is full; returns its path."""
    filler = Path(directory) / "filler"
    chunk = b"\0" * 65536
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError:
            pass
        try:
            while True:
                f.write(b"\0" * 512)
        except OSError:
            pass
    return filler


# ==========================================================================
# the tests
# ==========================================================================

COMMANDS = 20_000


def test_kill9_during_stream_with_consumers(broker, tmp_path, uid, runs):
    """kill -9 of the relay at random moments during a 20,000-command stream,
    with two named consumer processes attached and acking, each of which is
    also killed with kill -9 twice: every command is accepted once in the
    history, in publish order per topic; each consumer receives each command
    at least once, in order, and acks it; a command reaches a consumer twice
    only above the relay's durable cursor (resume_after) of the connection
    that brings it again, and only when the consumer's ack was lost to a
    relay kill right after it was sent."""
    rng = random.Random(uid)
    run = FaultRun(tmp_path, broker, uid, seed=rng.randrange(1 << 30), say=print)
    runs(run)
    run.start()
    # Mosquitto takes 20,000 commands in a few seconds; RabbitMQ hands the
    # relay at most its MQTT prefetch (10) at a time, about 1,000 commands/s.
    rate = 2500 if broker.name == "mosquitto" else 900
    t0 = time.monotonic()
    run.publish(COMMANDS, rate=rate)
    # the faults at random moments of the stream's first 85 %
    span = COMMANDS / rate
    faults = sorted([(rng.uniform(0.05, 0.85) * span, "relay", None) for _ in range(6)] +
                    [(rng.uniform(0.05, 0.85) * span, "consumer", c) for c in run.consumers for _ in range(2)],
                    key=lambda f: f[0])
    for at, what, c in faults:
        time.sleep(max(0.0, t0 + at - time.monotonic()))
        if what == "relay":
            run.kill_relay()
        else:
            run.kill_consumer(c, restart_after=rng.uniform(0, 0.3))
    still_streaming = run.publishing()
    run.wait_settled(timeout=180)
    figures = run.verify()
    figures["seconds"] = {"published": round(run.published_at - t0, 1),
                          "settled": round(run.settled_at - t0, 1)}
    print(f"\n{broker.name}: {figures}")
    assert figures["confirmed"] == COMMANDS and figures["accepted"] == COMMANDS
    assert still_streaming, "the faults came after the stream"
    run.relay.stop()


@pytest.mark.persistence
def test_broker_restart_mid_stream(broker, tmp_path, uid, runs):
    """The broker restarts twice while commands stream in and two consumers
    read (Mosquitto with persistence, a clean stop and start on the same
    port; RabbitMQ a node restart, about 7 s): the relay reconnects by
    itself (the same process throughout), every command the broker
    confirmed is accepted exactly once, and each consumer gets all of them."""
    run = FaultRun(tmp_path, broker, uid, seed=7, say=print)
    runs(run)
    run.start()
    pid = run.relay.proc.pid
    n = 6000 if broker.name == "mosquitto" else 2000
    t0 = time.monotonic()
    run.publish(n, rate=1000 if broker.name == "mosquitto" else 200)
    mid_stream = []
    for _ in range(2):
        time.sleep(1.5)
        mid_stream.append(run.publishing())
        run.restart_broker()
        assert run.relay.running() and run.relay.proc.pid == pid
    run.wait_settled(timeout=120)
    figures = run.verify()
    figures["seconds"] = round(time.monotonic() - t0, 1)
    print(f"\n{broker.name}: {figures}")
    assert all(mid_stream), f"a restart came after the stream: {mid_stream}"
    assert run.relay.proc.pid == pid
    log = run.relay.log()
    assert log.count("reconnecting to") >= 2, log[-3000:]
    assert sum(p.reconnects for p in run.publishers) >= 2
    stats = socket_request(run.relay.workdir / "cmdrelay.sock", {"op": "stats"})
    assert stats["broker"]["connected"] is True, stats
    run.relay.stop()


def _rabbit_queue_depth(broker, client_id):
    """Messages ready + unacknowledged in the RabbitMQ queue of the relay's session."""
    r = broker.rabbitmqctl("list_queues", "-q", "name", "messages", "--no-table-headers")
    total = 0
    for line in r.stdout.splitlines():
        f = line.split()
        if len(f) == 2 and client_id in f[0]:
            total += int(f[1])
    return total


def test_storage_full_then_writable_again(broker, tmp_path, uid, small_fs, runs):
    """G6: the history is on a 4 MiB filesystem; after 300 commands a filler
    file takes all the space left and 1,500 more commands are published.
    While the database cannot grow, the relay acknowledges nothing it did
    not commit: the broker keeps the commands (RabbitMQ: its queue for the
    relay's session still holds them); the log names the failure, the stats
    count commit_failures; a consumer that says hello now is refused with
    `storage` while its cursor cannot be written (or welcomed, if that small
    write still fits in the WAL), never with anything else. When the filler
    is deleted the
    same process recovers by itself: all 1,800 commands are accepted
    exactly once, and both consumers get each of them."""
    run = FaultRun(tmp_path, broker, uid, consumers=("lamp", "late"),
                   store={"path": str(small_fs / "history.db")}, say=print)
    runs(run)
    lamp, late = run.consumers
    run.relay.start()
    lamp.start()
    pid = run.relay.proc.pid
    sock = run.relay.workdir / "cmdrelay.sock"
    run.publish(300)
    run.consumers = [lamp]
    run.wait_settled(timeout=60)

    filler = fill_up(small_fs)
    before = run.accepted_count()
    run.publish(1500, window=100)
    run.publishers[-1].join(60)
    assert not run.publishers[-1].is_alive() and len(run.confirmed) == 1800
    run.relay.wait_log("database or disk is full", timeout=30)
    stats = socket_request(sock, {"op": "stats"})
    assert stats["commit_failures"] > 0, stats
    time.sleep(1.0)
    stuck = run.accepted_count()
    assert stuck < 1800, "the database could grow after all; the filler did not fill the filesystem"
    if broker.name == "rabbitmq":
        held = _rabbit_queue_depth(broker, f"gateway-{uid}")
        assert held >= 1800 - stuck, f"RabbitMQ holds {held} messages, {1800 - stuck} are not committed"
    print(f"\n{broker.name}: {stuck - before} of 1500 committed before the space ran out, "
          f"commit_failures {stats['commit_failures']}, broker.last_error {stats['broker']['last_error']!r}")
    # A consumer that says hello now: its cursor must be written, which
    # fails (`storage`) unless the write happens to fit in the WAL.
    late.start()
    run.consumers = [lamp, late]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any(
            ln[:1] in "BW" for ln in late.read_record().splitlines()):
        time.sleep(0.05)
    hellos = [ln.split()[0] + " " + ln.split()[2] for ln in late.read_record().splitlines() if ln[:1] in "BW"]
    assert hellos and all(h in ("B storage", "W 0") for h in hellos), hellos[:5]

    filler.unlink()
    run.wait_settled(timeout=90)
    assert run.relay.running() and run.relay.proc.pid == pid, "the relay did not survive"
    figures = run.verify()
    print(f"{broker.name}: {figures}")
    assert figures["accepted"] == 1800
    after = socket_request(sock, {"op": "stats"})
    assert after["broker"]["connected"] is True and after["accepted"] >= 1800 - before, after
    run.relay.stop()


def test_storage_failure_is_explained(mosquitto, tmp_path, uid, small_fs, runs):
    """G6 "says why (log, systemd STATUS)": while commits fail because the
    filesystem is full, the log says that the broker connection was dropped
    unacknowledged, and the operator-facing state says that the history is
    the problem, not the broker: the stats' broker.last_error and the
    systemd STATUS= line name the storage failure."""
    run = FaultRun(tmp_path, mosquitto, uid, consumers=(), store={"path": str(small_fs / "history.db")})
    runs(run)
    run.start()
    sock = run.relay.workdir / "cmdrelay.sock"
    run.publish(100)
    run.wait_settled(timeout=30)
    filler = fill_up(small_fs)
    run.publish(1500)
    run.relay.wait_log("database or disk is full", timeout=30)
    errors, statuses = set(), set()
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        errors.add(socket_request(sock, {"op": "stats"})["broker"]["last_error"])
        time.sleep(0.05)
    statuses = {s for s in run.relay.notify.seen("STATUS=")}
    log = run.relay.log()
    filler.unlink()
    run.wait_settled(timeout=60)
    run.relay.stop()

    storage_words = ("history", "commit", "disk", "storage", "database")
    missing = []
    if "unacknowledged" not in log:
        missing.append("the log never says the connection was dropped unacknowledged "
                       "(only 'connection lost: ...'); log lines about the broker: " +
                       repr(sorted({ln for ln in log.splitlines() if "127.0.0.1" in ln})[:4]))
    if not any(any(w in e for w in storage_words) for e in errors):
        missing.append(f"stats broker.last_error during the failure: {sorted(errors)}")
    if not any(any(w in s for w in storage_words) for s in statuses):
        missing.append(f"STATUS= lines during the failure: {sorted(statuses)[:4]}")
    assert not missing, "the storage failure is not explained:\n" + "\n".join(missing)


def test_relay_restarted_while_storage_full(mosquitto, tmp_path, uid, small_fs, runs):
    """kill -9 of the relay while its filesystem is full, and a start in
    that state: the relay starts (READY), keeps the broker's commands there
    while it cannot commit, and recovers when space is freed: every command
    accepted exactly once, the consumer gets them all."""
    run = FaultRun(tmp_path, mosquitto, uid, consumers=("lamp",), store={"path": str(small_fs / "history.db")})
    runs(run)
    run.start()
    run.publish(200)
    run.wait_settled(timeout=30)
    filler = fill_up(small_fs)
    run.publish(800)
    run.relay.wait_log("database or disk is full", timeout=30)
    run.kill_relay()
    run.relay.wait_log("database or disk is full", timeout=30)
    assert run.relay.running()
    time.sleep(1.0)
    assert run.accepted_count() < 1000
    filler.unlink()
    run.wait_settled(timeout=60)
    figures = run.verify()
    assert figures["accepted"] == 1000, figures
    run.relay.stop()


def test_storage_failure_backs_off(mosquitto, tmp_path, uid, small_fs, runs):
    """While the history cannot be written, each reconnect to the broker
    fails the same way (the broker redelivers, the commit fails, the relay
    drops the connection), so the reconnects must follow the configured
    exponential backoff (here reconnect.min_delay 100ms, max_delay 2s),
    not restart from min_delay after every CONNACK: otherwise the relay
    churns the broker session and writes several log lines per attempt,
    without end, into a journal that may sit on the very disk that is full.
    Over 6 s the backoff allows about 7 connections; 15 is the bound."""
    run = FaultRun(tmp_path, mosquitto, uid, consumers=(), store={"path": str(small_fs / "history.db")})
    runs(run)
    run.start()
    run.publish(100)
    run.wait_settled(timeout=30)
    filler = fill_up(small_fs)
    run.publish(500)
    run.relay.wait_log("database or disk is full", timeout=30)
    mark = len(run.relay.log())
    time.sleep(6.0)
    window = run.relay.log()[mark:]
    filler.unlink()
    run.wait_settled(timeout=60)
    run.relay.stop()
    connects = window.count("connected to ")
    lines = len(window.splitlines())
    assert connects <= 15, (f"{connects} broker connections and {lines} log lines in 6 s of a storage "
                            f"failure; the last lines:\n" + "\n".join(window.splitlines()[-8:]))


# -- a failed connection start, then a redelivery ------------------------------

def test_redelivery_after_a_failed_connection_start(broker, tmp_path, uid, runs):
    """G3 across a storage hiccup. The relay commits commands whose PUBACKs
    never reach the broker (a proxy swallows them), then loses the
    connection. As it reconnects, the database is briefly unwritable (here
    another writer holds the lock past busy_timeout; a full disk that is
    freed a moment later does the same), so recording the new broker
    connection fails; the database works again right after. The broker
    redelivers the unacknowledged commands with DUP=1: each must be recorded
    as a redelivery of the row already committed, not accepted a second
    time (which would hand it to the consumers twice)."""
    proxy = Proxy(broker.host, broker.port)
    proxy.start()

    class Via:
        name, host, port = broker.name, proxy.host, proxy.port
        packet_ids = broker.packet_ids

    run = FaultRun(tmp_path, Via, uid, consumers=())
    runs(run)
    run.broker = broker                        # the publisher goes straight to the broker
    try:
        run.start()
        run.publish(5)
        run.wait_settled(timeout=30)
        proxy.swallow.set()
        run.publish(10)
        run.relay.wait_count(15, "status = 'accepted'", timeout=30)
        time.sleep(0.5)
        assert proxy.swallowed > 0

        lock = sqlite3.connect(str(run.relay.db_path), timeout=10, isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")
        mark = len(run.relay.log())
        proxy.swallow.clear()
        proxy.cut()
        run.relay.wait_for(lambda: "database is locked" in run.relay.log()[mark:], 30,
                           "a failed write after the reconnect")
        lock.execute("ROLLBACK")
        lock.close()
        run.relay.wait_count(25, timeout=30)     # 15 accepted + 10 redeliveries
        time.sleep(1.0)
        rows = run.relay.query("SELECT id, topic, payload, status, reason, duplicate_of, dup, connection "
                               "FROM messages ORDER BY id")
        table = "\n".join(str((r[0], bytes(r[2]).decode(), r[3], r[4], r[5], r[6], r[7])) for r in rows)
        figures, problems = check_history([r[:6] for r in rows], run.items, run.confirmed, run.maybe)
        assert not problems, (f"{report(problems)}\nthe history (id, payload, status, reason, "
                              f"duplicate_of, dup, connection):\n{table}")
        run.relay.stop()
    finally:
        proxy.close()


# -- the database at start --------------------------------------------------------

def _history_with_data(tmp_path, mosquitto, uid, retained=None):
    """A relay that ran once: 20 commands (and a retained one on the first
    topic, if given), a consumer 'lamp' that acked 10; stopped cleanly.
    Returns the (stopped) relay."""
    run = FaultRun(tmp_path, mosquitto, uid, consumers=())
    run.start()
    if retained:
        publish(mosquitto, run.topics[0], retained, qos=1, retain=True)
        run.relay.wait_count(1)
    run.publish(20)
    run.wait_settled(timeout=30)
    c = ConsumerClient.connect(run.relay.workdir / "cmdrelay.sock")
    c.hello(consumer="lamp", filter="#")
    got = c.collect(count=20, timeout=10)
    c.ack(got[9]["id"])
    c.stats()
    c.close()
    run.relay.stop()
    return run.relay


def _start_expecting_exit(relay, timeout=8):
    """Runs cmdrelayd on relay's config; returns (exit status, output).
    A daemon that starts instead of exiting is stopped (status None)."""
    p = subprocess.Popen([str(CMDRELAYD), "-c", str(relay.conf_path)], stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = p.communicate(timeout=timeout)
        return p.returncode, out.decode(errors="replace")
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=10)
        return None, out.decode(errors="replace")


def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _sqlite_foreign_db(path):
    db = sqlite3.connect(path)
    db.executescript("CREATE TABLE invoices (id INTEGER PRIMARY KEY, amount REAL);"
                     "INSERT INTO invoices (amount) VALUES (12.5), (99.0);")
    db.close()


GARBAGE = {
    "random-bytes": lambda p, size: p.write_bytes(random.Random(1).randbytes(size)),
    "text": lambda p, size: p.write_text("broker:\n  host: 127.0.0.1\n" * 100),
    "another-sqlite-database": lambda p, size: (p.unlink(), _sqlite_foreign_db(str(p))),
}


@pytest.mark.parametrize("kind", list(GARBAGE))
def test_database_replaced_by_garbage_while_stopped(mosquitto, tmp_path, uid, kind):
    """While the relay is stopped its history.db is replaced by something
    that is not its history: random bytes, a text file, or another
    program's SQLite database. Starting must fail with a clear message naming the file and
    exit status 1, and leave the file exactly as it was (no migration
    applied to a foreign database, nothing overwritten). The broker plays
    no part here, so Mosquitto only."""
    relay = _history_with_data(tmp_path, mosquitto, uid)
    db = relay.db_path
    size = db.stat().st_size
    GARBAGE[kind](db, size)
    before = _sha(db)
    status, out = _start_expecting_exit(relay)
    assert _sha(db) == before, f"cmdrelayd changed {db}; output:\n{out}"
    assert status == 1, f"exit status {status}, want 1; output:\n{out}"
    assert str(db) in out, f"the message does not name {db}:\n{out}"
    print(f"\n{kind}: exit {status}: {out.strip().splitlines()[-1]}")


def test_history_scrambled_after_page_1_is_moved_aside(mosquitto, tmp_path, uid):
    """The history with every page after the first scrambled is still an
    SQLite file of ours by its header, but nothing in it reads, not even
    the schema. The relay keeps it byte for byte as history.db.corrupt-<time>
    and starts a fresh history, saying that nothing could be salvaged
    (test_corruption.py covers what a partly readable file gives back)."""
    relay = _history_with_data(tmp_path, mosquitto, uid)
    db = relay.db_path
    data = bytearray(db.read_bytes())
    page = int.from_bytes(data[16:18], "big") or 65536
    data[page:] = random.Random(2).randbytes(len(data) - page)
    db.write_bytes(bytes(data))
    before = _sha(db)
    status, out = _start_expecting_exit(relay, timeout=4)
    aside = sorted(db.parent.glob("history.db.corrupt-*[0-9]Z"))
    assert status is None, f"exit status {status}, want a running relay; output:\n{out}"
    assert len(aside) == 1 and _sha(aside[0]) == before, f"the damaged file is not kept; output:\n{out}"
    assert "history was corrupt" in out and "salvaged nothing" in out, out


def test_database_deleted_while_stopped(mosquitto, tmp_path, uid):
    """While the relay is stopped its history.db is deleted. What the daemon
    does: it creates a new, empty history and starts (SQLITE_OPEN_CREATE).
    That is acceptable for a first start, but after a deletion it silently
    resets every consumer's cursor (a named consumer's resume_after goes
    back to 0), reuses command ids from #1, and forgets which filters the
    broker session holds: it subscribes again, the broker replays the
    retained command, and it is accepted as new and handed again to the
    consumer that had acknowledged it (printed below; a repeat G3 forbids).
    An operator must at least be told: the log has to say, at start, that
    no history existed at the configured path and that a new, empty one was
    created."""
    relay = _history_with_data(tmp_path, mosquitto, uid, retained=b"reboot")
    db = relay.db_path
    for extra in ("", "-wal", "-shm"):
        Path(f"{db}{extra}").unlink(missing_ok=True)
    relay.start()
    try:
        log = relay.log(since_start=True)
        c = ConsumerClient.connect(relay.workdir / "cmdrelay.sock")
        welcome = c.hello(consumer="lamp", filter="#")
        again = c.collect(quiet=1.0, timeout=5)
        c.close()
        print(f"\nafter deleting {db}: started (pid {relay.proc.pid}); consumer lamp resume_after "
              f"{welcome['resume_after']} (was 10) and got again: "
              f"{[(g['id'], g['payload'], g['retained']) for g in again]}; start log:\n{log}")
        lines = [ln for ln in log.splitlines() if str(db) in ln]
        told = [ln for ln in lines if any(w in ln.lower() for w in ("new", "creat", "empty", "no history"))]
        assert told, ("the relay started a new, empty history without saying so; the start log "
                      f"lines naming {db}: {lines}")
    finally:
        relay.stop()
