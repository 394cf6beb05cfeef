"""A command sent to a named consumer again (after a disconnect, a relay
crash or a reset) says so with "redelivered": true; a first sending never
does. The relay records what it sent before the lines leave, so a kill -9
does not make it forget."""
import random
import signal
import subprocess
import threading
import time
import types

from brokers import free_port
from consumer_client import Closed, ProtocolError, connect
from relay import CMDRELAYCTL, Relay


def inject(relay, uid, n):
    r = subprocess.run([str(CMDRELAYCTL), "-c", str(relay.conf_path), "inject",
                        f"/cf/v1/AAA/012C/{uid}/set", f"set {n}"], capture_output=True, text=True, timeout=10)
    assert (r.returncode, r.stdout) == (0, f"injected as #{n}\n"), r.stderr


def flags(cmds):
    return [(c["id"], c.get("redelivered", False)) for c in cmds]


def test_redelivered_marks_what_was_sent_before(tmp_path, uid, sockdir, cleanup):
    nobroker = types.SimpleNamespace(host="127.0.0.1", port=free_port())   # nothing listens
    relay = Relay(tmp_path / "relay", nobroker, f"gateway-{uid}", ["/cf/v1/+/+/+/set"],
                  socket__path=str(sockdir / "cmdrelay.sock"))
    cleanup(relay.kill)
    relay.start(wait_subscribed=False)
    sock = sockdir / "cmdrelay.sock"
    for n in range(1, 7):
        inject(relay, uid, n)

    with connect(sock) as c:
        c.hello(consumer="app", from_="stored")
        assert flags(c.collect(count=6)) == [(i, False) for i in range(1, 7)]
        c.ack(2)
        c.stats()                       # the ack is in
    with connect(sock) as c:            # the unacknowledged ones come again, and say so
        c.hello(consumer="app", from_="stored")
        assert flags(c.collect(count=4)) == [(i, True) for i in range(3, 7)]
        inject(relay, uid, 7)           # a first sending, on the same connection
        assert flags(c.collect(count=1)) == [(7, False)]
        c.ack(4)
        c.stats()
        with connect(sock) as tail:     # an anonymous tail has no past: never flagged
            tail.hello(from_=0)
            assert flags(tail.collect(count=7)) == [(i, False) for i in range(1, 8)]
        c.abort()

    relay.kill()                        # what was sent must survive a crash of the relay
    relay.start(wait_subscribed=False)
    inject(relay, uid, 8)
    with connect(sock) as c:
        assert c.hello(consumer="app", from_="stored")["resume_after"] == 4
        assert flags(c.collect(count=4)) == [(5, True), (6, True), (7, True), (8, False)]
        c.stats()
    assert relay.query("SELECT acked_id, sent_id FROM consumers WHERE name = 'app'") == [(4, 8)]

    # A reset sends everything again: all of it was sent before.
    r = subprocess.run([str(CMDRELAYCTL), "-c", str(relay.conf_path), "consumers", "reset", "app", "--to", "0"],
                       capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r.stderr
    with connect(sock) as c:
        c.hello(consumer="app", from_="stored")
        assert flags(c.collect(count=8)) == [(i, True) for i in range(1, 9)]
    relay.stop()


def test_no_command_comes_again_unflagged_across_kills(tmp_path, uid, sockdir, cleanup):
    """A consumer works through a backlog while the relay is killed with
    SIGKILL at random moments (mid-fill, mid-ack) and started again. Every
    command it sees a second time must say redelivered; a command seen the
    first time may carry the flag only when a kill fell between the relay's
    record and its send (at most a window's worth per kill)."""
    n, window, kills = 3000, 64, 6
    nobroker = types.SimpleNamespace(host="127.0.0.1", port=free_port())
    relay = Relay(tmp_path / "relay", nobroker, f"gateway-{uid}", ["/cf/v1/+/+/+/set"],
                  socket__path=str(sockdir / "cmdrelay.sock"), socket__window=window)
    cleanup(relay.kill)
    relay.start(wait_subscribed=False)
    sock = sockdir / "cmdrelay.sock"
    with connect(sock) as c:               # the backlog, through the socket op the CLI uses
        for i in range(n):
            c.send_json({"op": "inject", "topic": f"/cf/v1/AAA/012C/{uid}/set", "payload": f"set {i}"})
            if c.recv_json(10)["type"] != "injected":
                raise AssertionError("inject refused")
    rnd = random.Random(15)
    seen, first_flagged, done, starts, again = set(), 0, 0, 0, 0

    def kill(proc):
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)

    deadline = time.monotonic() + 120
    while done < n and time.monotonic() < deadline:
        if relay.proc is not None and relay.proc.poll() is not None:
            relay.proc = None
            relay.notify.close()
        if relay.proc is None:
            relay.start(wait_subscribed=False)
            starts += 1
        # a kill a little after a random number of commands: mid-fill or mid-ack, not at a pause
        kill_after = rnd.randint(50, 400) if starts <= kills else None
        got = 0
        try:
            with connect(sock) as c:
                c.hello(consumer="app", from_="stored")
                while done < n:
                    msg = c.recv_json(5)
                    if msg is None:
                        break
                    i = msg["id"]
                    if i in seen:
                        assert msg.get("redelivered") is True, f"#{i} came again without the flag"
                        again += 1
                    elif msg.get("redelivered"):
                        first_flagged += 1
                    seen.add(i)
                    done = max(done, i)
                    got += 1
                    if got == kill_after:
                        threading.Timer(rnd.uniform(0, 0.01), kill, (relay.proc,)).start()
                    if i % 16 == 0 or i == n:
                        c.ack(i)
        except (Closed, ProtocolError, ConnectionError, OSError):
            pass
        if kill_after is not None and relay.proc is not None:
            relay.proc.wait(10)
    assert seen == set(range(1, n + 1))
    assert starts == kills + 1, f"{starts - 1} kills landed before the backlog was done"
    assert again > 0, "no command came twice: the kills missed the window"
    assert first_flagged <= kills * window, first_flagged
    print(f"\n{n} commands, {starts - 1} kills: {again} sent again (all flagged), "
          f"{first_flagged} flagged at their first sending")
