"""The WAL checkpoint runs on a thread of its own, not in the commits on the
event loop (issue 14 item 2), and the WAL stays bounded."""
import os

from brokers import publish_many
from relay import Relay


def threads(pid):
    """{thread name: bytes it wrote with write(2)/pwrite(2)}."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            name = f.read().strip()
        with open(f"/proc/{pid}/task/{tid}/io") as f:
            wchar = int(next(ln for ln in f if ln.startswith("wchar:")).split()[1])
        out[name] = out.get(name, 0) + wchar
    return out


def test_checkpoints_on_their_own_thread_and_the_wal_stays_bounded(mosquitto, tmp_path, uid):
    """20,000 commands (6 MB of history): the thread named checkpoint
    copies the WAL into the database (it writes megabytes; the old code had
    no such thread and checkpointed inside commits), the WAL stays within
    journal_size_limit (8 MiB), every command is in the history, and the
    daemon stops cleanly with it."""
    topic = f"/cf/v1/AAA/012C/{uid}/set"
    relay = Relay(tmp_path / "relay", mosquitto, f"gateway-{uid}", [topic])
    relay.start()
    before = threads(relay.proc.pid)
    assert "checkpoint" in before, before
    publish_many(mosquitto, topic, [b'{"cmd":"set","seq":%06d,"pad":"%s"}' % (i, b"x" * 200)
                                    for i in range(20_000)])
    relay.wait_count(20_000, timeout=120)
    after = threads(relay.proc.pid)
    assert after["checkpoint"] - before["checkpoint"] > 2 << 20, (before, after)
    assert os.path.getsize(f"{relay.db_path}-wal") <= 8 << 20
    assert os.path.getsize(relay.db_path) > 4 << 20
    relay.stop()
    assert relay.query("SELECT count(*) FROM messages WHERE status = 'accepted'") == [(20_000,)]
