"""pytest fixtures: real brokers on loopback (see tests/brokers.py).

Fixtures
    uid          short unique string per test, for client ids and topics
    mosquitto    a fresh, started Mosquitto per test (function scope);
                 @pytest.mark.persistence starts it with persistence on
    rabbitmq     the one RabbitMQ node of the session (started on first use)
    broker       parametrized: the per-test Mosquitto, then the shared RabbitMQ
                 (ids "mosquitto" and "rabbitmq")
    sockdir      a fresh directory everyone may traverse, for a socket that
                 other users must reach

A broker that cannot start makes the test ERROR with the broker's log: the
brokers are never skipped. Run with /usr/bin/python3 (Debian's pytest and paho).
"""

import os
import secrets
import shutil
import tempfile
from pathlib import Path
import signal
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from brokers import BrokerStartError, Mosquitto, RabbitMQ  # noqa: E402

_TIMINGS = []   # (what, seconds) reported at the end of the run


def pytest_configure(config):
    config.addinivalue_line("markers", "persistence: start the per-test Mosquitto with persistence enabled")
    # a SIGTERM to pytest (CI timeout, make interrupted) still runs fixture teardown
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        def _term(signum, frame):
            raise KeyboardInterrupt("SIGTERM")
        signal.signal(signal.SIGTERM, _term)


def pytest_terminal_summary(terminalreporter):
    if _TIMINGS:
        terminalreporter.write_sep("-", "broker timings")
        for what, secs in _TIMINGS:
            terminalreporter.write_line(f"{what}: {secs:.1f} s")


@pytest.fixture
def uid():
    """A short string unique to this test (and this run): use it in client ids
    and topics so tests sharing the RabbitMQ node never see each other."""
    return secrets.token_hex(4)


def _start_or_fail(broker, **kw):
    try:
        broker.start(**kw)
    except BrokerStartError as e:
        pytest.fail(f"{broker.name} failed to start:\n{e}", pytrace=False)
    return broker


@pytest.fixture
def mosquitto(request, tmp_path):
    m = Mosquitto(tmp_path / "mosquitto")
    persistence = request.node.get_closest_marker("persistence") is not None
    try:
        _start_or_fail(m, persistence=persistence)
        yield m
    finally:
        m.stop()


@pytest.fixture(scope="session")
def rabbitmq(tmp_path_factory):
    r = RabbitMQ(tmp_path_factory.mktemp("rabbitmq"))
    try:
        _start_or_fail(r)
        _TIMINGS.append((f"RabbitMQ {r.nodename} first start", r.start_seconds))
        yield r
    finally:
        restarts = r.restart_seconds
        r.close()
        if restarts is not None:
            _TIMINGS.append(("RabbitMQ last restart() (stop + start)", restarts))
        if r.stop_seconds is not None:
            _TIMINGS.append(("RabbitMQ final stop", r.stop_seconds))


@pytest.fixture(params=["mosquitto", "rabbitmq"])
def broker(request):
    """Either broker, behind the same attributes: host, port, name, log_path,
    start(), stop(), restart(), read_log()."""
    if request.param == "mosquitto":
        return request.getfixturevalue("mosquitto")
    r = request.getfixturevalue("rabbitmq")
    try:
        r.ensure_running()       # an earlier test may have stopped or crashed it
    except BrokerStartError as e:
        pytest.fail(f"rabbitmq failed to start:\n{e}", pytrace=False)
    return r


@pytest.fixture
def cleanup():
    """Callables run at teardown, last first; a failing one does not stop the rest."""
    todo = []
    yield todo.append
    for fn in reversed(todo):
        try:
            fn()
        except Exception:
            pass


@pytest.fixture
def sockdir():
    """A directory everyone may traverse, for the socket."""
    d = Path(tempfile.mkdtemp(prefix="cmdrelay-sock-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
