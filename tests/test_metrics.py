"""metrics.textfile: a Prometheus textfile with the stats op's numbers,
parsed with prometheus_client's own parser."""
import os
import time

from prometheus_client.parser import text_string_to_metric_families

from brokers import publish
from consumer_client import ConsumerClient
from relay import Relay


def read_metrics(path):
    text = path.read_text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def test_textfile_matches_stats(mosquitto, tmp_path, uid):
    topic = f"/cf/v1/AAA/012C/{uid}/set"
    prom = tmp_path / "cmdrelay.prom"
    relay = Relay(tmp_path / "relay", mosquitto, f"gateway-{uid}", [topic],
                  metrics={"textfile": str(prom), "interval": "1s"})
    relay.start()
    publish(mosquitto, topic, b"one", retain=True)
    publish(mosquitto, topic, b"two")
    relay.wait_count(2)
    lamp = ConsumerClient.connect(str(relay.workdir / "cmdrelay.sock"))
    lamp.hello(consumer="lamp")
    got = lamp.collect(count=2, timeout=10)
    lamp.ack(got[0]["id"])
    stats = lamp.stats()
    time.sleep(2.5)                       # at least one more rewrite

    m = read_metrics(prom)
    assert m[("cmdrelay_received_total", ())] == stats["received"] == 2
    assert m[("cmdrelay_accepted_total", ())] == stats["accepted"] == 2
    assert m[("cmdrelay_duplicates_total", (("reason", "retained_replay"),))] == 0
    assert m[("cmdrelay_duplicates_total", (("reason", "redelivery"),))] == 0
    assert m[("cmdrelay_broker_connected", ())] == 1
    assert m[("cmdrelay_consumer_lag", (("consumer", "lamp"),))] == 1
    assert m[("cmdrelay_consumer_connections", ())] == 1
    assert m[("cmdrelay_database_bytes", ())] > 0
    assert 0 < m[("cmdrelay_last_commit_seconds", ())] < 5
    assert m[("cmdrelay_commit_failures_total", ())] == 0
    # Atomic rewrites: no temporary file is left beside it.
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("cmdrelay.prom")] == ["cmdrelay.prom"]

    # The broker goes away: the gauge follows within an interval or two.
    mosquitto.stop()
    relay.wait_for(lambda: read_metrics(prom)[("cmdrelay_broker_connected", ())] == 0, 10,
                   "cmdrelay_broker_connected 0")
    lamp.close()
    relay.stop()


def test_textfile_mode_ignores_the_umask(mosquitto, tmp_path, uid):
    # under the unit's UMask= the file would be private to cmdrelay, and
    # node_exporter (user prometheus) could not read it: metrics.mode decides
    for mode, expect in ((None, 0o644), ("0640", 0o640)):
        prom = tmp_path / f"m{expect:o}.prom"
        metrics = {"textfile": str(prom), "interval": "1s"}
        if mode:
            metrics["mode"] = mode
        relay = Relay(tmp_path / f"relay{expect:o}", mosquitto, f"mm-{uid}", [f"/mm/{uid}/#"], metrics=metrics)
        old = os.umask(0o077)
        try:
            relay.start(wait_subscribed=False)
        finally:
            os.umask(old)
        try:
            relay.wait_for(lambda: prom.exists(), 10, "the textfile")
            assert oct(os.stat(prom).st_mode & 0o777) == oct(expect)
        finally:
            relay.stop()
