"""The systemd units, sysusers.d/tmpfiles.d files and `make install`/`uninstall`.

There is no systemd as PID 1 here, so everything is checked offline: the units
as `make install DESTDIR=... PREFIX=...` installs them (from systemd/*.in, with
the bindir and docdir of the PREFIX), with `systemd-analyze verify --root=`,
`systemd-analyze security --offline=yes`, and `systemd-sysusers`/
`systemd-tmpfiles --root=` on a copy of the DESTDIR tree.

Run with /usr/bin/python3 (Debian's pytest and PyYAML).
"""

import os
import re
import shutil
import stat
import subprocess

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONF = os.path.join(REPO, "conf", "cmdrelay.yaml")
UNITS = ("cmdrelayd.service", "cmdrelayd.socket")
MAX_EXPOSURE = 1.5      # Debian 12's systemd-timesyncd.service: 2.3


def pkg_var(name):
    out = subprocess.run(["pkg-config", f"--variable={name}", "systemd"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out.startswith("/"), f"pkg-config --variable={name} systemd: {out!r}"
    return out


UNITDIR = pkg_var("systemdsystemunitdir")
SYSUSERSDIR = pkg_var("sysusersdir")
TMPFILESDIR = pkg_var("tmpfilesdir")


def make(*args):
    r = subprocess.run(["make", "-C", REPO, "--no-print-directory", *args],
                       capture_output=True, text=True)
    assert r.returncode == 0, f"make {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def install(destdir, prefix=None):
    args = ["install", f"DESTDIR={destdir}"]
    if prefix is not None:
        args.append(f"PREFIX={prefix}")
    return make(*args)


def under(root, path):
    """path (absolute, as on the target system) inside the DESTDIR tree root."""
    return os.path.join(str(root), path.lstrip("/"))


def parse_unit(path):
    """{section: {key: [values...]}} of a unit file (no drop-ins, no continuation
    lines: our units use none)."""
    sections, cur = {}, None
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line[0] in "#;":
                continue
            if line.startswith("[") and line.endswith("]"):
                cur = sections.setdefault(line[1:-1], {})
                continue
            assert cur is not None, f"{path}: {line!r} outside a section"
            assert not line.endswith("\\"), f"{path}: continuation lines not expected"
            key, _, value = line.partition("=")
            cur.setdefault(key.strip(), []).append(value.strip())
    return sections


def one(unit, section, key):
    values = unit[section].get(key, [])
    assert len(values) == 1, f"[{section}] {key}= given {len(values)} times: {values}"
    return values[0]


def exec_paths(unit):
    """The program paths of the Exec*= lines of a parsed service unit."""
    paths = []
    for key, values in unit.get("Service", {}).items():
        if key.startswith("Exec"):
            for v in values:
                prog = v.split()[0].lstrip("@-:+!")
                paths.append(prog)
    return paths


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """`make install DESTDIR=<tmp> PREFIX=/usr`, once for the module."""
    root = tmp_path_factory.mktemp("destdir")
    install(root, "/usr")
    return root


@pytest.fixture
def verify_root(tree, tmp_path):
    """A copy of the DESTDIR tree that `systemd-analyze verify --root=` can load
    the units from: plus the host's targets (sysinit.target, sockets.target, ...
    of the units' default dependencies) and the host programs our Exec*= lines
    use that are not ours (/bin/kill of ExecReload=)."""
    root = tmp_path / "root"
    shutil.copytree(tree, root, symlinks=True)
    unitdir = under(root, UNITDIR)
    for name in os.listdir(UNITDIR):
        src = os.path.join(UNITDIR, name)
        if name.endswith(".target") and os.path.isfile(src) and not os.path.islink(src):
            shutil.copy(src, unitdir)
    service = parse_unit(os.path.join(unitdir, "cmdrelayd.service"))
    for prog in exec_paths(service):
        if not os.path.exists(under(root, prog)) and os.path.exists(prog) and "cmdrelay" not in prog:
            os.makedirs(os.path.dirname(under(root, prog)), exist_ok=True)
            shutil.copy(prog, under(root, prog))
    return root


def verify(root):
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", f"--root={root}",
                        *(os.path.join(UNITDIR, u) for u in UNITS)],
                       capture_output=True, text=True)
    return r.returncode, (r.stdout + r.stderr).strip()


# --- make install ----------------------------------------------------------

@pytest.mark.parametrize("prefix", ["/usr", None], ids=["PREFIX=/usr", "PREFIX-default"])
def test_install_puts_every_file_where_the_units_expect_it(tmp_path, prefix):
    root = tmp_path / "destdir"
    install(root, prefix)
    p = prefix or "/usr/local"

    for prog in ("cmdrelayd", "cmdrelayctl"):
        path = under(root, f"{p}/bin/{prog}")
        assert os.path.isfile(path) and os.access(path, os.X_OK), path

    service = parse_unit(under(root, f"{UNITDIR}/cmdrelayd.service"))
    socket = parse_unit(under(root, f"{UNITDIR}/cmdrelayd.socket"))
    for path in (f"{UNITDIR}/cmdrelayd.service", f"{UNITDIR}/cmdrelayd.socket"):
        with open(under(root, path)) as f:
            assert not re.search(r"@[a-z_]+@", f.read()), f"unsubstituted @var@ in {path}"
        assert stat.S_IMODE(os.stat(under(root, path)).st_mode) == 0o644, path

    start = one(service, "Service", "ExecStart").split()
    assert start == [f"{p}/bin/cmdrelayd", "-c", "/etc/cmdrelay/cmdrelay.yaml"]
    for prog in exec_paths(service):
        if "cmdrelay" in prog:
            assert os.access(under(root, prog), os.X_OK), f"{prog} not in the DESTDIR tree"

    for unit in (service, socket):
        for doc in " ".join(unit["Unit"]["Documentation"]).split():
            if doc.startswith("man:"):   # man:cmdrelayd(8) -> share/man/man8/cmdrelayd.8
                name, section = re.fullmatch(r"man:([\w.]+)\((\d)\)", doc).groups()
                doc = f"file:{p}/share/man/man{section}/{name}.{section}"
            assert doc.startswith("file:"), doc
            assert os.path.isfile(under(root, doc[len("file:"):])), f"Documentation={doc} not installed"
    assert os.path.isfile(under(root, f"{p}/share/bash-completion/completions/cmdrelayctl"))

    conf = under(root, "/etc/cmdrelay/cmdrelay.yaml")
    assert stat.S_IMODE(os.stat(conf).st_mode) == 0o640
    assert stat.S_IMODE(os.stat(os.path.dirname(conf)).st_mode) == 0o750
    with open(conf) as a, open(CONF) as b:
        assert a.read() == b.read()

    assert os.path.isfile(under(root, f"{SYSUSERSDIR}/cmdrelay.conf"))
    assert os.path.isfile(under(root, f"{TMPFILESDIR}/cmdrelay.conf"))

    sql = sorted(os.path.basename(f) for f in os.listdir(os.path.join(REPO, "sql")) if f.endswith(".sql"))
    assert sql, "no sql/*.sql in the repository?"
    assert sorted(os.listdir(under(root, f"{p}/share/cmdrelay/sql"))) == \
        sorted(sql + (["queries"] if os.path.isdir(os.path.join(REPO, "sql", "queries")) else []))
    assert os.path.isfile(under(root, f"{p}/share/doc/cmdrelay/README.md"))


def test_install_keeps_an_existing_config(tmp_path):
    root = tmp_path / "destdir"
    install(root, "/usr")
    conf = under(root, "/etc/cmdrelay/cmdrelay.yaml")
    with open(conf, "a") as f:
        f.write("# edited by the operator\n")
    os.chmod(conf, 0o600)
    with open(conf) as f:
        edited = f.read()

    out = install(root, "/usr")
    assert "keeping the existing" in out
    with open(conf) as f:
        assert f.read() == edited
    assert stat.S_IMODE(os.stat(conf).st_mode) == 0o600


def test_uninstall_removes_everything_but_the_config(tmp_path):
    root = tmp_path / "destdir"
    install(root, "/usr")
    before = {os.path.relpath(os.path.join(d, f), root)
              for d, _, files in os.walk(root) for f in files}
    conf = "etc/cmdrelay/cmdrelay.yaml"
    assert conf in before and len(before) > 8

    make("uninstall", f"DESTDIR={root}", "PREFIX=/usr")
    after = {os.path.relpath(os.path.join(d, f), root)
             for d, _, files in os.walk(root) for f in files}
    assert after == {conf}
    assert not os.path.exists(under(root, "/usr/share/cmdrelay"))
    assert not os.path.exists(under(root, "/usr/share/doc/cmdrelay"))


# --- the units -------------------------------------------------------------

def test_systemd_analyze_verify(verify_root):
    rc, out = verify(verify_root)
    ours = [line for line in out.splitlines() if "cmdrelay" in line]
    assert rc == 0 and not ours, f"systemd-analyze verify: exit {rc}\n{out}"


def test_verify_really_looks_for_the_installed_binary(verify_root, tree):
    """Control: without the DESTDIR's cmdrelayd, verify (in that root) fails."""
    service = parse_unit(under(tree, f"{UNITDIR}/cmdrelayd.service"))
    binary = one(service, "Service", "ExecStart").split()[0]
    os.unlink(under(verify_root, binary))
    rc, out = verify(verify_root)
    assert rc != 0 and binary in out, out


def test_security_exposure(tree):
    unit = under(tree, f"{UNITDIR}/cmdrelayd.service")
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", unit],
                       capture_output=True, text=True)
    out = r.stdout + r.stderr
    m = re.search(r"Overall exposure level for cmdrelayd\.service: (\d+(?:\.\d+)?)", out)
    assert m, out
    print(f"exposure: {m.group(1)}")
    assert float(m.group(1)) <= MAX_EXPOSURE, out
    # every line of the unit was understood (a setting systemd ignores is no hardening)
    complaints = [line for line in r.stderr.splitlines() if "cmdrelayd.service:" in line]
    assert not complaints, "\n".join(complaints)


def test_service_settings(tree):
    s = parse_unit(under(tree, f"{UNITDIR}/cmdrelayd.service"))
    svc = s["Service"]
    expect = {
        "Type": "notify", "User": "cmdrelay", "Group": "cmdrelay",
        "ExecReload": "/bin/kill -HUP $MAINPID", "WatchdogSec": "30s",
        "Restart": "on-failure", "RestartPreventExitStatus": "78",
        "StateDirectory": "cmdrelay", "RuntimeDirectory": "cmdrelay",
        "RuntimeDirectoryPreserve": "yes", "ConfigurationDirectory": "cmdrelay",
        "UMask": "0027", "NoNewPrivileges": "yes", "PrivateUsers": "yes",
        "ProtectSystem": "strict", "CapabilityBoundingSet": "", "AmbientCapabilities": "",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    }
    for key, value in expect.items():
        assert one(s, "Service", key) == value, key
    # the password credential, optional: SetCredential= is the default when the file is missing
    assert one(s, "Service", "LoadCredential") == "mqtt-password:/etc/cmdrelay/password"
    assert one(s, "Service", "SetCredential").startswith("mqtt-password:")
    assert "ImportCredential" not in svc       # systemd 254; Debian 12 has 252
    assert one(s, "Install", "WantedBy") == "multi-user.target"
    assert one(s, "Install", "Also") == "cmdrelayd.socket"


def test_socket_unit_matches_the_config(tree):
    with open(CONF) as f:
        conf = yaml.safe_load(f)
    sock = parse_unit(under(tree, f"{UNITDIR}/cmdrelayd.socket"))
    svc = parse_unit(under(tree, f"{UNITDIR}/cmdrelayd.service"))

    path = conf["socket"]["path"]
    assert one(sock, "Socket", "ListenStream") == path
    assert int(one(sock, "Socket", "SocketMode"), 8) == int(str(conf["socket"]["mode"]), 8)
    assert one(sock, "Socket", "SocketUser") == one(svc, "Service", "User")
    assert one(sock, "Socket", "SocketGroup") == one(svc, "Service", "Group")
    assert one(sock, "Install", "WantedBy") == "sockets.target"
    # the socket lives in the service's RuntimeDirectory, the history in its StateDirectory
    assert os.path.dirname(path) == "/run/" + one(svc, "Service", "RuntimeDirectory")
    assert os.path.dirname(conf["store"]["path"]) == "/var/lib/" + one(svc, "Service", "StateDirectory")
    # the directory modes agree between the socket unit and the service
    assert one(sock, "Socket", "DirectoryMode") == one(svc, "Service", "RuntimeDirectoryMode")


def test_sysusers_and_tmpfiles_in_the_tree(tree, tmp_path):
    """systemd-sysusers and systemd-tmpfiles --create, confined to a copy of the
    tree: the user and group exist, locked, no login shell; the directories
    and the config get the owners and modes the units rely on."""
    if os.geteuid() != 0:
        pytest.skip("systemd-tmpfiles needs root to chown in the tree")
    root = tmp_path / "root"
    shutil.copytree(tree, root, symlinks=True)
    for cmd in (["systemd-sysusers", f"--root={root}"],
                ["systemd-tmpfiles", f"--root={root}", "--create"]):
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, f"{cmd}: {r.stdout}{r.stderr}"

    with open(under(root, "/etc/passwd")) as f:
        users = {line.split(":")[0]: line.rstrip("\n").split(":") for line in f}
    with open(under(root, "/etc/group")) as f:
        groups = {line.split(":")[0]: line.rstrip("\n").split(":") for line in f}
    user, group = users["cmdrelay"], groups["cmdrelay"]
    uid, gid = int(user[2]), int(group[2])
    assert int(user[3]) == gid
    assert uid < 1000, "not a system user"
    assert user[6].endswith("nologin")
    with open(under(root, "/etc/shadow")) as f:
        shadow = {line.split(":")[0]: line.split(":") for line in f}
    assert shadow["cmdrelay"][1].startswith("!"), "account not locked"

    def owner_mode(path):
        st = os.lstat(under(root, path))
        return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)

    assert owner_mode("/etc/cmdrelay") == (0, gid, 0o750)
    assert owner_mode("/etc/cmdrelay/cmdrelay.yaml") == (0, gid, 0o640)
    assert owner_mode("/run/cmdrelay") == (uid, gid, 0o750)
