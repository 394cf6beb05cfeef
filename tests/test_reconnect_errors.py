"""What the relay says about each failed connection attempt.

A fake broker on loopback (no broker we can run refuses and then drops on
cue): the first CONNECT is refused with CONNACK 5, every later one is read
and the socket closed. Each attempt must be reported with its own cause; the
refusal's text must not stand for the losses after it.
"""
import socket
import threading
from types import SimpleNamespace

from brokers import LOOPBACK
from relay import Relay

CONNACK_NOT_AUTHORIZED = bytes([0x20, 0x02, 0x00, 0x05])


def fake_broker(listener, stop):
    """Refuses the first connection, closes every later one after its CONNECT."""
    first = True
    while not stop.is_set():
        try:
            conn, _ = listener.accept()
        except socket.timeout:
            continue
        except OSError:
            return
        with conn:
            conn.settimeout(5)
            try:
                conn.recv(4096)                 # the CONNECT
                if first:
                    conn.sendall(CONNACK_NOT_AUTHORIZED)
                    conn.recv(4096)             # until the relay closes
            except OSError:
                pass
        first = False


def test_each_failed_attempt_says_its_own_cause(tmp_path, cleanup):
    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen(8)
    listener.settimeout(0.2)         # lets the thread see stop
    stop = threading.Event()
    thread = threading.Thread(target=fake_broker, args=(listener, stop), daemon=True)
    thread.start()
    cleanup(thread.join)
    cleanup(listener.close)
    cleanup(stop.set)
    broker = SimpleNamespace(host=LOOPBACK, port=listener.getsockname()[1])
    relay = Relay(tmp_path / "relay", broker, "gateway-refused", ["/cf/v1/AAA/012C/x/set"])
    cleanup(relay.kill)
    relay.start(wait_subscribed=False)
    relay.wait_log("broker refused the connection: Connection Refused: not authorised", timeout=15)
    # the attempts after the refusal were closed by the peer: say so
    relay.wait_log("connection lost: ", timeout=15)
    log = relay.log(since_start=True)
    assert log.index("broker refused") < log.index("connection lost: "), log
