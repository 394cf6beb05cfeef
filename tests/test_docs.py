"""The man pages and the completion say what the programs do."""
import re
import subprocess

from relay import ROOT

CONFIG_C = ROOT / "daemon" / "config.c"
YAML_5 = ROOT / "man" / "cmdrelay.yaml.5"


def _key_table():
    """(path, type, default) of each key in daemon/config.c's config_keys[]."""
    src = CONFIG_C.read_text()
    table = src[src.index("config_keys[] = {"):src.index("#define NKEYS")]
    rows = []
    for chunk in table.split('{ "')[1:]:
        m = re.match(r'([^"]+)", KEY_(\w+),.*,\s*(NULL|"[^"]*"), (?:CFG\(|SUB\(|0,)', chunk, re.S)
        assert m, f"a config_keys[] row this test cannot read: {chunk[:80]}"
        rows.append(m.groups())
    return [(p, t, None if d == "NULL" else d.strip('"')) for p, t, d in rows if t != "SECTION"]


def _man_keys():
    """{key: the line after its .B} of cmdrelay.yaml(5)'s KEYS section."""
    text = YAML_5.read_text()
    return dict(re.findall(r"^\.TP\n\.B (\S+)\n(.*)$", text, re.M))


def test_cmdrelay_yaml_5_lists_every_key_of_config_c_with_its_default():
    table = _key_table()
    man = _man_keys()
    assert [p for p, _, _ in table] == list(man), "cmdrelay.yaml(5) and config.c list different keys"
    for path, ktype, default in table:
        line = man[path]
        want_type = {"STRING": "string", "INT": "integer", "DURATION": "duration", "MODE": "octal mode",
                     "LOG_LEVEL": "log level"}.get(ktype, "list")
        assert line.startswith(want_type), f"{path}: man says '{line}', config.c type {ktype}"
        if default is None:
            assert line.endswith(("required.", "no default.")), f"{path}: man gives a default: {line}"
        else:
            assert line.endswith(f"default {default}."), f"{path}: config.c default {default}, man: {line}"


def test_man_pages_render_without_warnings():
    for page in ("cmdrelayd.8", "cmdrelayctl.1", "cmdrelay.yaml.5"):
        r = subprocess.run(["man", "--warnings", "-l", "-P", "cat", str(ROOT / "man" / page)],
                           capture_output=True, text=True, env={"MANWIDTH": "80", "PATH": "/usr/bin:/bin"})
        assert r.returncode == 0 and r.stderr == "", f"{page}: {r.stderr}"
        assert "SEE ALSO" in r.stdout


def test_units_point_at_the_man_page():
    for unit in ("cmdrelayd.service.in", "cmdrelayd.socket.in"):
        text = (ROOT / "systemd" / unit).read_text()
        assert re.search(r"^Documentation=man:cmdrelayd\(8\)", text, re.M), unit


def _complete(*words):
    script = ROOT / "scripts" / "cmdrelayctl.bash-completion"
    line = " ".join(f"'{w}'" for w in words)
    r = subprocess.run(["bash", "-c", f'source "{script}"; COMP_WORDS=({line}); '
                        f'COMP_CWORD={len(words) - 1}; _cmdrelayctl; printf "%s\\n" "${{COMPREPLY[@]}}"'],
                       capture_output=True, text=True, check=True)
    return r.stdout.split()


def test_bash_completion_offers_commands_and_their_options():
    assert _complete("cmdrelayctl", "hi") == ["history"]
    assert "--since" in _complete("cmdrelayctl", "-c", "x.yaml", "history", "--")
    assert _complete("cmdrelayctl", "outbox", "--status", "") == ["queued", "sent", "failed", "all"]
    assert "--help" in _complete("cmdrelayctl", "stats", "--")


def test_example_config_carries_every_key():
    """conf/cmdrelay.yaml names every key of config.c, set or commented out."""
    conf = (ROOT / "conf" / "cmdrelay.yaml").read_text()
    for path, _, _ in _key_table():
        leaf = path.rsplit(".", 1)[-1]
        parent = path.rsplit(".", 1)[0] if "." in path else None
        assert re.search(rf"^[ #-]*{re.escape(leaf)}:|[{{ ,]{re.escape(leaf)}:", conf, re.M), \
            f"conf/cmdrelay.yaml lacks {path}"
        if parent and not parent.endswith("[]"):
            assert re.search(rf"^[ #]*{re.escape(parent.rsplit('.', 1)[-1])}:", conf, re.M), path


BROKER_SETTINGS = {
    "Mosquitto": ["persistence", "max_queued_messages", "persistent_client_expiration", "max_inflight_messages"],
    "RabbitMQ": ["mqtt.durable_queue_type", "mqtt.subscription_ttl", "mqtt.max_session_expiry_interval_seconds",
                 "mqtt.prefetch", "wildcard"],
}


def test_readme_states_each_broker_setting_that_decides_loses_none():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Broker requirements"):]
    section = section[:section.index("\n## ", 3)]
    for broker, settings in BROKER_SETTINGS.items():
        part = section[section.index(f"### {broker}"):]
        for name in settings:
            assert name in part, f"README's Broker requirements, {broker}: {name} missing"
    harness = (ROOT / "tests" / "brokers.py").read_text()
    for name in ["max_queued_messages", "persistent_client_expiration", "max_inflight_messages",
                 "mqtt.durable_queue_type", "mqtt.subscription_ttl", "mqtt.prefetch"]:
        i = harness.index(f'"{name} ')
        assert "#" in harness[harness.rindex("\n", 0, harness.rindex("\n", 0, i)):i], \
            f"tests/brokers.py sets {name} without saying why"
