"""The README's example consumer is the shipped script, and it works."""
import re
import subprocess
import sys
import time

from brokers import publish
from relay import ROOT, Relay

SCRIPT = ROOT / "scripts" / "example-consumer.py"


def test_readme_shows_the_script():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```python\n(import json, socket, sys\n.*?)```", readme, re.S)
    assert block, "README has no example consumer block"
    assert block.group(1) in SCRIPT.read_text()


def test_example_consumer_gets_each_command_once(mosquitto, tmp_path, uid):
    topic = f"/cf/v1/AAA/012C/{uid}/set"
    relay = Relay(tmp_path / "relay", mosquitto, f"gateway-{uid}", [topic])
    relay.start()
    publish(mosquitto, topic, b"before the consumer")

    def run_consumer():
        proc = subprocess.Popen([sys.executable, str(SCRIPT), str(relay.workdir / "cmdrelay.sock")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.5)
        proc.terminate()
        out, err = proc.communicate(10)
        return out.splitlines(), err

    relay.wait_count(1)
    lines, err = run_consumer()
    assert lines == [f"1 {uid} before the consumer"], err
    publish(mosquitto, topic, b"while it is away")
    relay.wait_count(2)
    lines, err = run_consumer()
    assert lines == [f"2 {uid} while it is away"], err   # nothing old again
    relay.stop()
