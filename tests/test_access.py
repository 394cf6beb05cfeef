"""Local access control on the consumer socket: the real cmdrelayd (as root)
and a real Mosquitto, with consumers connecting as other users.

- `socket.mode` and `socket.group`: the socket file is created with that mode
  and group; the kernel then decides who may connect (EACCES for others).
- `socket.allow`: user names and "@group" names, checked by the daemon
  against the peer's credentials (SO_PEERCRED); root and the daemon's own
  user are always allowed. A refused peer gets
  {"type":"error","code":"not_allowed",...}, the connection is closed, and the
  daemon logs "refused consumer pid N uid N gid N: not in socket.allow".
- A socket path where another daemon is listening is not taken over; a stale
  socket file (its daemon died) is replaced.

The tests run as root. Other users are real accounts: `nobody`, plus users
and groups made with useradd/groupadd for the test (names "crt" + random hex)
and removed at teardown, failed test or not. Clients run as those users
through `setpriv`, as a small Python subprocess (CLIENT below). The socket
lives in a 0755 directory under /tmp, because pytest's own tmp dirs are 0700
and would refuse everyone but root before the socket mode is even looked at.
"""
import grp
import json
import os
import pwd
import secrets
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from brokers import publish
from consumer_client import ConsumerClient
from relay import CMDRELAYD, Relay

EX_CONFIG = 78
NOBODY = pwd.getpwnam("nobody")
NOGROUP = grp.getgrgid(NOBODY.pw_gid)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates users, runs clients as them")

# The consumer, run as another user: connects, says hello, reads until EOF or
# quiet, and prints what happened as one JSON object.
CLIENT = r"""
import errno, json, os, socket, sys, time
path, hello = sys.argv[1], sys.argv[2]
out = {"pid": os.getpid(), "uid": os.getuid(), "gid": os.getgid(), "groups": sorted(os.getgroups()),
       "connect_error": None, "lines": [], "eof": False}
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(5)
try:
    s.connect(path)
except OSError as e:
    out["connect_error"] = errno.errorcode.get(e.errno, str(e.errno))
    print(json.dumps(out))
    sys.exit(0)
try:
    s.sendall(hello.encode() + b"\n")
except OSError as e:
    out["send_error"] = errno.errorcode.get(e.errno, str(e.errno))
buf = b""
deadline = time.monotonic() + 5
while time.monotonic() < deadline:
    s.settimeout(max(0.05, min(deadline - time.monotonic(), 0.5 if b"\n" in buf else 5)))
    try:
        data = s.recv(65536)
    except socket.timeout:
        if b"\n" in buf:
            break
        continue
    except OSError as e:
        out["recv_error"] = errno.errorcode.get(e.errno, str(e.errno))
        break
    if not data:
        out["eof"] = True
        break
    buf += data
out["lines"] = [json.loads(l) for l in buf.split(b"\n") if l.strip()]
print(json.dumps(out))
"""


# -- accounts -----------------------------------------------------------------------

class Accounts:
    """Users and groups made for one test; remove() deletes them all."""

    def __init__(self):
        self.users, self.groups = [], []

    @staticmethod
    def _run(*args):
        r = subprocess.run(list(args), capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, f"{' '.join(args)}: exit {r.returncode}: {r.stderr}"

    def group(self):
        name = "crt" + secrets.token_hex(4)
        self._run("groupadd", name)
        self.groups.append(name)
        return grp.getgrnam(name)

    def user(self, primary=None, groups=()):
        """A user without home or shell; primary group `primary` (a grp
        struct; default nogroup), supplementary groups `groups` (in /etc/group)."""
        name = "crt" + secrets.token_hex(4)
        args = ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", "--no-user-group",
                "--gid", str((primary or NOGROUP).gr_gid)]
        if groups:
            args += ["--groups", ",".join(g.gr_name for g in groups)]
        self._run(*args, name)
        self.users.append(name)
        return pwd.getpwnam(name)

    def remove(self):
        errors = []
        for name in reversed(self.users):
            r = subprocess.run(["userdel", name], capture_output=True, text=True, timeout=60)
            if r.returncode != 0:
                errors.append(f"userdel {name}: {r.stderr}")
        for name in reversed(self.groups):
            r = subprocess.run(["groupdel", name], capture_output=True, text=True, timeout=60)
            if r.returncode != 0:
                errors.append(f"groupdel {name}: {r.stderr}")
        self.users, self.groups = [], []
        assert not errors, errors


@pytest.fixture
def accounts():
    a = Accounts()
    try:
        yield a
    finally:
        a.remove()


def run_as(path, user=None, gid=None, groups="clear", hello=None):
    """Runs CLIENT against the socket at path as `user` (a pwd struct; None
    = root, as we are) with real and effective gid `gid` (default: the
    user's primary group). groups: "clear" (no supplementary groups), "init"
    (the user's groups from /etc/group) or a list of gids (exactly those)."""
    hello = hello or json.dumps({"op": "hello"})
    cmd = []
    if user is not None:
        cmd = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={gid if gid is not None else user.pw_gid}"]
        if groups == "clear":
            cmd.append("--clear-groups")
        elif groups == "init":
            cmd.append("--init-groups")
        else:
            cmd.append("--groups=" + ",".join(str(g) for g in groups))
    r = subprocess.run(cmd + ["/usr/bin/python3", "-c", CLIENT, str(path), hello],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"client as {user and user.pw_name}: exit {r.returncode}: {r.stderr}"
    return json.loads(r.stdout)


def welcomed(result):
    return (result["connect_error"] is None and result["lines"]
            and result["lines"][0].get("type") == "welcome")


def start_relay(tmp_path, mosquitto, uid, sockdir, cleanup, name="relay", **socket_opts):
    overrides = {"socket__path": str(sockdir / "cmdrelay.sock")}
    overrides.update({f"socket__{k}": v for k, v in socket_opts.items()})
    relay = Relay(tmp_path / name, mosquitto, f"gateway-{uid}", [f"/cf/v1/AAA/{uid}/+/set"], **overrides)
    cleanup(lambda: relay.kill() if relay.running() else None)
    relay.start()
    return relay


# -- socket.mode and socket.group --------------------------------------------------------

def test_socket_mode_and_group(tmp_path, mosquitto, uid, sockdir, accounts, cleanup):
    """mode 0660, group G: the file has them; a user outside G (nobody) gets
    EACCES; a member of G (supplementary, as its login would have) gets in;
    the same member with its supplementary groups dropped does not."""
    g = accounts.group()
    member = accounts.user(groups=[g])
    relay = start_relay(tmp_path, mosquitto, uid, sockdir, cleanup, mode="0660", group=g.gr_name)
    path = sockdir / "cmdrelay.sock"
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660, oct(st.st_mode)
    assert st.st_gid == g.gr_gid, f"socket group {st.st_gid}, expected {g.gr_name} ({g.gr_gid})"
    assert st.st_uid == 0

    r = run_as(path, NOBODY)
    assert r["connect_error"] == "EACCES", r
    r = run_as(path, member, groups="clear")
    assert r["connect_error"] == "EACCES", r
    r = run_as(path, member, groups="init")
    assert g.gr_gid in r["groups"], r
    assert welcomed(r), r
    assert f"consumer connected: pid {r['pid']} uid {member.pw_uid} " in relay.log(), relay.log()
    assert welcomed(run_as(path)), "root"
    relay.stop()


def test_socket_mode_0600_only_owner(tmp_path, mosquitto, uid, sockdir, accounts, cleanup):
    """mode 0600: even members of the socket's group are kept out."""
    g = accounts.group()
    member = accounts.user(groups=[g])
    relay = start_relay(tmp_path, mosquitto, uid, sockdir, cleanup, mode="0600", group=g.gr_name)
    path = sockdir / "cmdrelay.sock"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert run_as(path, member, groups="init")["connect_error"] == "EACCES"
    assert welcomed(run_as(path))
    relay.stop()


# -- socket.allow ------------------------------------------------------------------------

def test_socket_allow(tmp_path, mosquitto, uid, sockdir, accounts, cleanup):
    """mode 0666 (the kernel lets everyone connect), allow: [user, @group]:
    nobody is refused with not_allowed + EOF and logged with its pid and uid;
    the listed user, a supplementary member of the group, a user whose
    primary group it is, and root are welcome; a refused peer holds no
    connection slot; an allowed consumer still gets its commands."""
    g = accounts.group()
    listed = accounts.user()
    member = accounts.user(groups=[g])
    primary = accounts.user(primary=g)
    outsider = accounts.user()
    relay = start_relay(tmp_path, mosquitto, uid, sockdir, cleanup, mode="0666", max_consumers=3,
                        allow=[listed.pw_name, "@" + g.gr_name])
    path = sockdir / "cmdrelay.sock"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666

    for who in (NOBODY, outsider):
        r = run_as(path, who)
        assert r["connect_error"] is None, r
        assert r["lines"] and r["lines"][0].get("type") == "error", r
        assert r["lines"][0].get("code") == "not_allowed", r
        assert len(r["lines"]) == 1, f"refused peer: more than the error line: {r}"
        assert r["eof"] or r.get("recv_error") == "ECONNRESET", f"refused peer: not closed: {r}"
        relay.wait_log(f"refused consumer pid {r['pid']} uid {who.pw_uid} gid {who.pw_gid}: "
                       f"not in socket.allow", timeout=5)

    # refused peers do not use up socket.max_consumers (3)
    for _ in range(5):
        assert run_as(path, NOBODY)["lines"][0]["code"] == "not_allowed"

    for who, groups in ((listed, "clear"), (member, "init"), (primary, "clear"), (None, "clear")):
        r = run_as(path, who, groups=groups)
        assert welcomed(r), f"{who and who.pw_name} ({groups} groups): {r}\n{relay.log()[-3000:]}"

    # an allowed consumer, as its user, gets what arrives
    hello = json.dumps({"op": "hello", "consumer": f"acc-{uid}", "filter": f"/cf/v1/AAA/{uid}/+/set"})
    publish(mosquitto, f"/cf/v1/AAA/{uid}/dev1/set", "on")
    relay.wait_count(1, "status = 'accepted'")
    r = run_as(path, member, groups="init", hello=hello)
    assert [m.get("payload") for m in r["lines"][1:]] == ["on"], r
    relay.stop()


def test_refused_peer_sees_the_error_then_a_clean_end(tmp_path, mosquitto, uid, sockdir, cleanup):
    """The shipped scripts/examples/consumer.py, run as a user socket.allow
    refuses: it prints the not_allowed error and exits 1 (a real error, not
    one to retry), five times out of five. The daemon must neither close before the
    client's hello could be written (the client dies of EPIPE at its first
    write) nor close with that hello unread (Linux then ends the client's
    stream with ECONNRESET instead of EOF, and `for line in f` dies with a
    traceback, or the example retries, after the error line)."""
    relay = start_relay(tmp_path, mosquitto, uid, sockdir, cleanup, mode="0666", allow=["root"])
    path = sockdir / "cmdrelay.sock"
    script = Path(__file__).resolve().parent.parent / "scripts" / "examples" / "consumer.py"
    outcomes = []
    for _ in range(5):
        r = subprocess.run(["setpriv", f"--reuid={NOBODY.pw_uid}", f"--regid={NOBODY.pw_gid}",
                            "--clear-groups", "/usr/bin/python3", str(script), str(path)],
                           capture_output=True, text=True, timeout=30)
        last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
        outcomes.append((r.returncode, "cmdrelayd: not_allowed" in r.stderr, last))
    assert all(rc == 1 and told for rc, told, _ in outcomes), (
        "examples/consumer.py refused by socket.allow; per run (exit status, printed the not_allowed "
        f"error, last stderr line): {outcomes}")
    relay.stop()


def test_socket_allow_follows_the_process_groups(tmp_path, mosquitto, uid, sockdir, accounts, cleanup):
    """allow: ["@G"] and a consumer process that has G as a supplementary
    group without being listed in /etc/group for it (systemd
    SupplementaryGroups=G, sg, setgroups) is allowed, as the kernel allows
    it on a 0660 socket of group G: the daemon must look at the peer
    process's groups (SO_PEERGROUPS), not only the group database."""
    g = accounts.group()
    user = accounts.user()
    relay = start_relay(tmp_path, mosquitto, uid, sockdir, cleanup, mode="0666", allow=["@" + g.gr_name])
    path = sockdir / "cmdrelay.sock"
    r = run_as(path, user, groups=[g.gr_gid])
    assert g.gr_gid in r["groups"], r
    assert welcomed(r), (f"a process with supplementary group {g.gr_name} was refused by "
                         f"socket.allow @{g.gr_name}: {r}\n{relay.log()[-2000:]}")
    relay.stop()


@pytest.mark.parametrize("entry, message", [
    ("crt-no-such-user", "socket.allow: no user 'crt-no-such-user'"),
    ("@crt-no-such-group", "socket.allow: no group 'crt-no-such-group'"),
])
def test_socket_allow_unknown_name_is_a_config_error(tmp_path, entry, message):
    """An allow entry naming no user or group: `-t` and a start exit 78,
    naming the file, the line and column of the entry, and the name."""
    conf = tmp_path / "cmdrelay.yaml"
    conf.write_text(
        "broker:\n  client_id: gw-access\n  port: 1\n"
        "subscriptions:\n  - topic: /t/#\n    qos: 1\n"
        f"store:\n  path: {tmp_path}/history.db\n"
        f"socket:\n  path: {tmp_path}/cmdrelay.sock\n  allow:\n    - root\n    - \"{entry}\"\n")
    line = len(conf.read_text().splitlines())
    for args in (["-t", "-c", conf], ["-c", conf]):
        r = subprocess.run([str(CMDRELAYD), *map(str, args)], capture_output=True, text=True, timeout=30)
        assert r.returncode == EX_CONFIG, (args, r.returncode, r.stderr)
        assert f"{conf}:{line}:7: {message}" in r.stderr, r.stderr
    assert not (tmp_path / "history.db").exists() and not (tmp_path / "cmdrelay.sock").exists()


def test_socket_group_unknown_is_a_config_error(tmp_path):
    """socket.group naming no group is caught like socket.allow's "@group":
    `-t` exits 78 naming the line, and a start exits 78 (not 1: systemd's
    RestartPreventExitStatus=78 must stop the restart loop) before it
    creates the database."""
    conf = tmp_path / "cmdrelay.yaml"
    conf.write_text(
        "broker:\n  client_id: gw-access\n  port: 1\n"
        "subscriptions:\n  - topic: /t/#\n    qos: 1\n"
        f"store:\n  path: {tmp_path}/history.db\n"
        f"socket:\n  path: {tmp_path}/cmdrelay.sock\n  group: crt-no-such-group\n")
    line = len(conf.read_text().splitlines())
    t = subprocess.run([str(CMDRELAYD), "-t", "-c", str(conf)], capture_output=True, text=True, timeout=30)
    start = subprocess.run([str(CMDRELAYD), "-c", str(conf)], capture_output=True, text=True, timeout=30)
    problems = []
    if t.returncode != EX_CONFIG or f"{conf}:{line}:" not in t.stderr or "crt-no-such-group" not in t.stderr:
        problems.append(f"-t: exit {t.returncode}, stdout {t.stdout!r}, stderr {t.stderr!r}")
    if start.returncode != EX_CONFIG or "crt-no-such-group" not in start.stderr:
        problems.append(f"start: exit {start.returncode}, stderr {start.stderr!r}")
    if (tmp_path / "history.db").exists():
        problems.append("the start created the database before finding the config error")
    assert not problems, problems


# -- one socket, one daemon -------------------------------------------------------------------

def test_second_daemon_does_not_take_a_live_socket(tmp_path, mosquitto, uid, sockdir, cleanup):
    """A second cmdrelayd with the same config (same socket path) fails with
    "another process is listening" and a non-zero exit, and leaves the first
    one serving: its socket file stays, consumers connect and get commands."""
    first = start_relay(tmp_path, mosquitto, uid, sockdir, cleanup, mode="0660")
    path = sockdir / "cmdrelay.sock"
    inode = os.stat(path).st_ino
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM")}
    second = subprocess.run([str(CMDRELAYD), "-c", str(first.conf_path)], capture_output=True, text=True,
                            timeout=30, env=env)
    assert second.returncode != 0, second.stderr
    assert f"{path}: another process is listening on it" in second.stderr, second.stderr
    assert os.stat(path).st_ino == inode, "the second daemon replaced the socket file"
    assert first.running()
    topic = f"/cf/v1/AAA/{uid}/dev1/set"
    with ConsumerClient.connect(path) as c:
        c.hello(filter=f"/cf/v1/AAA/{uid}/+/set")
        publish(mosquitto, topic, "still-here")
        got = c.collect(count=1, timeout=15)
        assert [m["payload"] for m in got] == ["still-here"]
    assert "connection lost" not in first.log(since_start=True), first.log()
    first.stop()
    assert not path.exists(), "the socket file is left after a clean stop"


def test_stale_socket_is_replaced(tmp_path, mosquitto, uid, sockdir, cleanup):
    """The daemon died (kill -9) and left its socket file: the next start
    removes it and listens again, with the configured mode."""
    relay = start_relay(tmp_path, mosquitto, uid, sockdir, cleanup, mode="0660")
    path = sockdir / "cmdrelay.sock"
    relay.kill()
    assert path.exists() and stat.S_ISSOCK(os.stat(path).st_mode)
    relay.start()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    with ConsumerClient.connect(path) as c:
        assert c.hello()["type"] == "welcome"
    relay.stop()


def test_path_that_is_not_a_socket_is_left_alone(tmp_path, mosquitto, uid, sockdir, cleanup):
    """A regular file at socket.path is not deleted: the start fails naming it."""
    path = sockdir / "cmdrelay.sock"
    path.write_text("precious\n")
    relay = Relay(tmp_path / "relay", mosquitto, f"gateway-{uid}", [f"/cf/v1/AAA/{uid}/+/set"],
                  socket__path=str(path))
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM")}
    r = subprocess.run([str(CMDRELAYD), "-c", str(relay.conf_path)], capture_output=True, text=True,
                       timeout=30, env=env)
    assert r.returncode != 0
    assert f"{path} exists and is not a socket" in r.stderr, r.stderr
    assert path.read_text() == "precious\n"


# -- the history files -------------------------------------------------------------------

READ_FILE = r"""
import errno, sys
try:
    open(sys.argv[1], "rb").read(1)
    print("read")
except OSError as e:
    print(errno.errorcode.get(e.errno, str(e.errno)))
"""


@pytest.mark.parametrize("mask", [0o000, 0o077], ids=["umask-000", "umask-077"])
def test_history_files_are_0640_whatever_the_umask(tmp_path, mosquitto, uid, sockdir, cleanup, mask):
    """history.db, -wal and -shm are created 0640 (owner rw, group r) under
    any umask: with umask 000 SQLite alone made them 0644 and `nobody` read
    the commands with sqlite3, past socket.mode and socket.allow; with 077
    the admins' group could not run `cmdrelayctl history`."""
    workdir = sockdir / "state"          # a 0755 path, so only the files' modes decide
    workdir.mkdir(mode=0o755)
    workdir.chmod(0o755)
    relay = Relay(workdir, mosquitto, f"gateway-{uid}", [f"/cf/v1/AAA/{uid}/+/set"],
                  socket__path=str(sockdir / "cmdrelay.sock"))
    cleanup(lambda: relay.kill() if relay.running() else None)
    old = os.umask(mask)
    try:
        relay.start()
    finally:
        os.umask(old)
    publish(mosquitto, f"/cf/v1/AAA/{uid}/dev1/set", b"secret-command")
    relay.wait_count(1)
    names = ["history.db", "history.db-wal", "history.db-shm", "history.db-puback"]
    modes = {n: oct(stat.S_IMODE(os.stat(workdir / n).st_mode)) for n in names}
    assert modes == {n: "0o640" for n in names}, modes
    for n in names:
        r = subprocess.run(["setpriv", f"--reuid={NOBODY.pw_uid}", f"--regid={NOBODY.pw_gid}",
                            "--clear-groups", "/usr/bin/python3", "-c", READ_FILE, str(workdir / n)],
                           capture_output=True, text=True, timeout=30)
        assert r.stdout.strip() == "EACCES", (n, r.stdout, r.stderr)
    relay.stop()
