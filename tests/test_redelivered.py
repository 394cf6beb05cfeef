"""A command sent to a named consumer again (after a disconnect, a relay
crash or a reset) says so with "redelivered": true; a first sending never
does. The relay records what it sent before the lines leave, so a kill -9
does not make it forget."""
import subprocess
import types

from brokers import free_port
from consumer_client import connect
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
