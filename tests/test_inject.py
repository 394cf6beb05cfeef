"""Testing a consumer without a broker: the relay starts with none, and
cmdrelayctl inject records commands as if the broker had sent them, marked
injected in the history; only root or the daemon's own user may."""
import pwd
import subprocess
import sys
import types

from brokers import free_port
from relay import CMDRELAYCTL, ROOT, Relay


def test_inject_feeds_a_consumer_without_a_broker(tmp_path, uid, sockdir):
    nobroker = types.SimpleNamespace(host="127.0.0.1", port=free_port())   # nothing listens
    relay = Relay(tmp_path / "relay", nobroker, f"gateway-{uid}", ["/cf/v1/+/+/+/set"],
                  socket__mode="0666", socket__path=str(sockdir / "cmdrelay.sock"))
    relay.start(wait_subscribed=False)
    sock = str(sockdir / "cmdrelay.sock")
    app = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "examples" / "consumer.py"), sock, "app"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for i in range(5):
            r = subprocess.run([str(CMDRELAYCTL), "-c", str(relay.conf_path), "inject",
                                f"/cf/v1/AAA/012C/{uid}/set", f"reboot {i}"], capture_output=True, text=True,
                               timeout=10)
            assert (r.returncode, r.stdout) == (0, f"injected as #{i + 1}\n"), r.stderr
        got = [app.stdout.readline().split() for _ in range(5)]
        assert got == [[str(i + 1), f"/cf/v1/AAA/012C/{uid}/set", "utf8", "reboot", str(i)] for i in range(5)]
    finally:
        app.terminate()
        app.wait(10)
    rows = relay.query("SELECT id, status, injected, device FROM messages ORDER BY id")
    assert rows == [(i + 1, "accepted", 1, uid) for i in range(5)]
    nobody = pwd.getpwnam("nobody")
    r = subprocess.run(["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups",
                        str(CMDRELAYCTL), "--socket", sock, "inject", "/cf/v1/x/y/z/set", "evil"],
                       capture_output=True, text=True, timeout=10)
    assert r.returncode == 1 and "not_allowed: inject: only root or uid 0 may inject" in r.stderr, r.stderr
    assert relay.query("SELECT count(*) FROM messages")[0][0] == 5
    relay.stop()
