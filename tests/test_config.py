"""cmdrelayd -t: the configuration check of the real binary (build/cmdrelayd).

Runs without a broker: `cmdrelayd -t -c FILE` only parses and validates FILE
and exits 0 ("FILE: configuration OK") or 78 (EX_CONFIG) with the error on
stderr. Every tests/configs/bad/*.yaml starts with a line
`# expect: <part of the error message, with line:column>`.
"""

import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DAEMON = REPO / os.environ.get("CMDRELAY_BUILD", "build") / "cmdrelayd"
SHIPPED = REPO / "conf" / "cmdrelay.yaml"
CONFIGS = REPO / "tests" / "configs"
GOOD = sorted((CONFIGS / "good").glob("*.yaml"))
BAD = sorted((CONFIGS / "bad").glob("*.yaml"))

EX_USAGE = 64
EX_CONFIG = 78


def _env():
    env = dict(os.environ)
    # no systemd credential, and plain "cmdrelayd: " log lines rather than <N> prefixes
    env.pop("CREDENTIALS_DIRECTORY", None)
    env.pop("JOURNAL_STREAM", None)
    return env


def run(*args, cwd=None):
    if not DAEMON.exists():
        pytest.fail(f"{DAEMON} is missing: run `make all` first")
    return subprocess.run([str(DAEMON), *map(str, args)], capture_output=True, text=True,
                          env=_env(), cwd=cwd, timeout=30)


def expectation(path):
    first = path.read_text().splitlines()[0]
    m = re.fullmatch(r"# expect: (.+)", first)
    assert m, f"{path.name}: first line must be '# expect: <message part>'"
    # the part right after the file name: ":LINE:COLUMN: ..." (": ..." when there is no line)
    assert m.group(1).startswith(":"), f"{path.name}: expectation must start at the ':' after the file name"
    return m.group(1)


def test_config_sets_are_there():
    assert len(BAD) >= 20
    assert len(GOOD) >= 3
    assert len({expectation(p) for p in BAD}) == len(BAD), "two bad configs expect the same error"


def test_shipped_config():
    r = run("-t", "-c", SHIPPED)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{SHIPPED}: configuration OK\n"
    assert r.stderr == ""


@pytest.mark.parametrize("path", GOOD, ids=[p.name for p in GOOD])
def test_good_config(path):
    r = run("-t", "-c", path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{path}: configuration OK\n"
    assert r.stderr == ""


@pytest.mark.parametrize("path", BAD, ids=[p.name for p in BAD])
def test_bad_config(path):
    expect = expectation(path)
    r = run("-t", "-c", path)
    assert r.returncode == EX_CONFIG, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == ""
    # one error line: "cmdrelayd: FILE:LINE:COLUMN: what is wrong"
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"cmdrelayd: {path}"), r.stderr
    assert f"{path}{expect}" in lines[0], f"expected {path}{expect!r} in {r.stderr!r}"


def test_bad_config_relative_path():
    # the message names the file as given on the command line
    path = BAD[0].relative_to(REPO)
    r = run("-t", "-c", path, cwd=REPO)
    assert r.returncode == EX_CONFIG
    assert f"cmdrelayd: {path}{expectation(BAD[0])}" in r.stderr


def test_missing_config_file(tmp_path):
    path = tmp_path / "nonexistent.yaml"
    r = run("-t", "-c", path)
    assert r.returncode == EX_CONFIG
    assert r.stderr == f"cmdrelayd: {path}: No such file or directory\n"
    assert not path.exists()


def test_missing_config_file_without_t(tmp_path):
    # the daemon itself refuses to start with the same status
    path = tmp_path / "nonexistent.yaml"
    r = run("-c", path)
    assert r.returncode == EX_CONFIG
    assert f"{path}: No such file or directory" in r.stderr


def test_check_touches_nothing(tmp_path):
    state = tmp_path / "state"
    run_dir = tmp_path / "run"
    state.mkdir()
    run_dir.mkdir()
    conf = tmp_path / "cmdrelay.yaml"
    db = state / "history.db"
    sock = run_dir / "cmdrelay.sock"
    nested_db = state / "sub" / "history.db"
    conf.write_text(
        "broker:\n"
        "  host: 127.0.0.1\n"
        "  port: 1\n"                       # nothing listens; -t must not connect anyway
        "  client_id: gateway-012C000003AX\n"
        "subscriptions:\n"
        "  - topic: /cf/v1/AAA/012C/012C000003AX/set\n"
        "store:\n"
        f"  path: {db}\n"
        "socket:\n"
        f"  path: {sock}\n")
    r = run("-t", "-c", conf)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{conf}: configuration OK\n"
    assert not db.exists()
    assert not sock.exists()
    assert list(state.iterdir()) == []          # no -wal, -shm, -journal either
    assert list(run_dir.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cmdrelay.yaml", "run", "state"]

    # nor does it create missing directories
    conf.write_text(conf.read_text().replace(str(db), str(nested_db)))
    r = run("-t", "-c", conf)
    assert r.returncode == 0, r.stderr
    assert not nested_db.parent.exists()


def test_check_invalid_touches_nothing(tmp_path):
    db = tmp_path / "history.db"
    conf = tmp_path / "bad.yaml"
    conf.write_text(
        "broker:\n"
        "  client_id: gateway-012C000003AX\n"
        "  port: 70000\n"
        "subscriptions:\n"
        "  - topic: /cf/v1/AAA/012C/012C000003AX/set\n"
        "store:\n"
        f"  path: {db}\n")
    r = run("-t", "-c", conf)
    assert r.returncode == EX_CONFIG
    assert f"{conf}:3:9: broker.port: 70000 is out of range (1..65535)" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_password_credential_precedence(tmp_path):
    # the systemd credential wins over password_file (which then need not exist)
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "mqtt-password").write_text("from-credential\n")
    conf = tmp_path / "cmdrelay.yaml"
    conf.write_text(
        "broker:\n"
        "  client_id: gateway-012C000003AX\n"
        "  username: rabbit_user\n"
        "  password_file: /nonexistent/cmdrelay/password\n"
        "subscriptions:\n"
        "  - topic: /cf/v1/AAA/012C/012C000003AX/set\n")
    r = run("-t", "-c", conf)
    assert r.returncode == EX_CONFIG
    assert f"{conf}:4:3: broker.password_file: /nonexistent/cmdrelay/password: No such file or directory" in r.stderr
    env = _env()
    env["CREDENTIALS_DIRECTORY"] = str(creds)
    r = subprocess.run([str(DAEMON), "-t", "-c", str(conf)], capture_output=True, text=True,
                       env=env, timeout=30)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("args", [["--bogus"], ["-x"], ["-t", "-c"], ["-t", "extra-argument"]],
                         ids=["long-option", "short-option", "missing-argument", "extra-argument"])
def test_bad_command_line(args):
    r = run(*args)
    assert r.returncode == EX_USAGE, (r.returncode, r.stderr)
    assert r.stdout == ""
    assert "usage: cmdrelayd [-c FILE] [-t] [-v] [--version]" in r.stderr


def test_help():
    r = run("--help")
    assert r.returncode == 0
    assert r.stdout.startswith("usage: cmdrelayd ")
    assert "-t" in r.stdout


def test_version():
    r = run("--version")
    assert r.returncode == 0
    assert re.fullmatch(r"cmdrelayd \d+\.\d+\.\d+\S*\n", r.stdout), r.stdout
    version_h = (REPO / "daemon" / "version.h").read_text()
    m = re.search(r'CMDRELAY_VERSION\s+"([^"]+)"', version_h)
    assert m and r.stdout == f"cmdrelayd {m.group(1)}\n"


PLAIN_NAMES = "keys must be plain names (nest sections instead of dots)"


@pytest.mark.parametrize("key_line, where", [
    ("subscriptions[].qos: 1", ":3:1: "),
    ("subscriptions[].topic: x/y", ":3:1: "),
    ("broker.port: 1884", ":3:1: "),
    ('"broker.host": 10.0.0.1', ":3:1: "),
    ("  tls.ca_file: /etc/cmdrelay/ca.pem", ":3:3: "),
    ("  reconnect: { min_delay: 1s, max.delay: 60s }", ":3:31: "),
], ids=["subscriptions[].qos", "subscriptions[].topic", "broker.port", "quoted", "nested", "flow"])
def test_dotted_key_is_rejected(tmp_path, key_line, where):
    """Keys are plain names: a dotted or bracketed key is not a path into the
    key table ("subscriptions[].qos: 1" at the top once crashed cmdrelayd -t,
    "broker.port: 1884" was silently taken as the port)."""
    conf = tmp_path / "dotted.yaml"
    conf.write_text(
        "broker:\n"
        "  client_id: gateway-012C000003AX\n"
        f"{key_line}\n"
        "subscriptions:\n"
        "  - topic: /cf/v1/AAA/012C/012C000003AX/set\n")
    r = run("-t", "-c", conf)
    assert r.returncode >= 0, f"cmdrelayd -t was killed by signal {-r.returncode}: {r.stderr!r}"
    assert r.returncode == EX_CONFIG, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == ""
    assert r.stderr == f"cmdrelayd: {conf}{where}{PLAIN_NAMES}\n"


def test_credential_error_names_the_credential(tmp_path):
    # an unreadable $CREDENTIALS_DIRECTORY/mqtt-password: no line of the config to point at
    creds = tmp_path / "credentials"
    (creds / "mqtt-password").mkdir(parents=True, mode=0o700)
    creds.chmod(0o700)
    conf = tmp_path / "cmdrelay.yaml"
    conf.write_text(
        "broker:\n"
        "  client_id: gateway-012C000003AX\n"
        "  username: rabbit_user\n"
        "subscriptions:\n"
        "  - topic: /cf/v1/AAA/012C/012C000003AX/set\n")
    env = _env()
    env["CREDENTIALS_DIRECTORY"] = str(creds)
    r = subprocess.run([str(DAEMON), "-t", "-c", str(conf)], capture_output=True, text=True,
                       env=env, timeout=30)
    assert r.returncode == EX_CONFIG, (r.returncode, r.stderr)
    assert r.stdout == ""
    assert (f"cmdrelayd: {conf}: credential mqtt-password: {creds}/mqtt-password: Is a directory"
            in r.stderr.splitlines()), r.stderr
