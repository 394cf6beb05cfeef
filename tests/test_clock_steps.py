"""Wall-clock steps do not age the history: the real cmdrelayd under an
LD_PRELOAD shim (tests/clockshift.c, built here) that shifts CLOCK_REALTIME
by what a file says, stepped while the daemon runs, and a real Mosquitto.

A gateway that boots at 1970 (no RTC) or at a stale fake-hwclock time and is
stepped by NTP later must not lose the commands its consumers have not
acknowledged: retention ages rows on the age clock (CLOCK_BOOTTIME carried
across restarts), never on the wall clock.
"""
import os
import subprocess
import time
from pathlib import Path

import pytest

from brokers import publish
from consumer_client import ConsumerClient
from relay import Relay

SHIM = Path(__file__).resolve().parent / "clockshift.c"
DAY_MS = 86_400_000
# "reboot" twice, a step apart: two publications, both new (G3), whatever the clock did
PAYLOADS = [f"cmd-{i}" for i in range(4)] + ["reboot"] + [f"cmd-{i}" for i in range(5, 9)] + ["reboot"]


@pytest.fixture
def shim(tmp_path):
    so = tmp_path / "clockshift.so"
    r = subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(so), str(SHIM), "-ldl"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return so


def test_clock_steps_age_nothing(mosquitto, tmp_path, uid, shim, monkeypatch):
    """Commands stored at relay time 1970 while consumer lamp is away; the
    clock steps to now (2026): none is deleted (the old relay deleted 4 of 5
    within 3 s). It steps back to 1970, five more arrive, it steps forward
    again, the relay restarts: still none deleted, and lamp gets all ten in
    order, each once, all of them accepted (also the second "reboot": the
    steps do not make dedup take it for a repeat)."""
    topic = f"/cf/v1/AAA/012C/{uid}/set"
    shift = tmp_path / "clockshift"
    to_1970 = 2 * DAY_MS - int(time.time() * 1000)          # 1970-01-03
    shift.write_text(f"{to_1970}\n")
    monkeypatch.setenv("LD_PRELOAD", str(shim))
    monkeypatch.setenv("CLOCKSHIFT_FILE", str(shift))
    if "ASAN_OPTIONS" in os.environ:        # make check-sanitize: the shim comes first
        monkeypatch.setenv("ASAN_OPTIONS", os.environ["ASAN_OPTIONS"] + ":verify_asan_link_order=0")
    relay = Relay(tmp_path / "relay", mosquitto, f"gateway-{uid}", [topic],
                  store={"path": str(tmp_path / "relay" / "history.db"),
                         "retention": {"max_age": "1h", "max_rows": 10000}})
    try:
        relay.start()
        for p in PAYLOADS[:5]:
            publish(mosquitto, topic, p.encode())
        relay.wait_count(5)
        received = [r["received_at"] for r in relay.rows()]
        assert all(t < 3 * DAY_MS for t in received), f"the shim did not shift the clock: {received}"

        shift.write_text("0\n")                                # NTP: 56 years forward
        time.sleep(3)                                          # retention runs every second
        assert relay.count() == 5, f"a forward step deleted rows:\n{relay.log()[-2000:]}"

        shift.write_text(f"{to_1970}\n")                       # and back
        for p in PAYLOADS[5:]:
            publish(mosquitto, topic, p.encode())
        relay.wait_count(10)
        time.sleep(2)
        assert relay.count() == 10

        shift.write_text("0\n")
        relay.restart()
        time.sleep(3)
        assert relay.count() == 10, f"a step deleted rows:\n{relay.log()[-2000:]}"

        lamp = ConsumerClient.connect(str(relay.workdir / "cmdrelay.sock"))
        lamp.hello(consumer="lamp", filter=topic)
        got = lamp.collect(count=10, timeout=10)
        assert [c["payload"] for c in got] == PAYLOADS
        lamp.close()
        assert [r["status"] for r in relay.rows()] == ["accepted"] * 10
        relay.stop()
    finally:
        if relay.running():
            relay.kill()
