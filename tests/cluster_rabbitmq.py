"""A three-node RabbitMQ 3.10 cluster with mqtt.durable_queue_type = quorum
(issue 17 item 4): the relay lists all three nodes; while a publisher on
another node streams commands, the node the relay is connected to stops and
later comes back. No command is lost, none is accepted twice (unless the
publisher itself had to send it again), the session survives (no
session-loss alarm) and the log names the failover.

Three Erlang nodes are too heavy for `make check` on two cores: `make
check-cluster` runs this file on its own (the name keeps it out of
`pytest tests/`)."""
import time

import pytest

import threading

from brokers import RabbitMQ, publish_many
from relay import Relay
from test_failover import with_hosts

COMMANDS = 600      # 20 chunks of 30, 0.2 s apart: the stream spans the node stop


class RetryingPublisher(threading.Thread):
    """Chunks of QoS 1 publications to one node; a chunk cut off (the node
    drops its MQTT connections while the cluster changes) is sent again,
    so its commands may really be published twice: `resent` holds them."""

    def __init__(self, broker, topic, payloads, chunk, pause):
        super().__init__(daemon=True)
        self.args = broker, topic, payloads, chunk, pause
        self.resent, self.errors = set(), []
        self.start()

    def run(self):
        broker, topic, payloads, chunk, pause = self.args
        for start in range(0, len(payloads), chunk):
            part = payloads[start:start + chunk]
            for attempt in range(20):
                try:
                    publish_many(broker, topic, part, qos=1)
                    break
                except (ConnectionError, OSError) as e:
                    self.errors.append(e)
                    self.resent.update(part)
                    time.sleep(0.5)
            time.sleep(pause)


@pytest.fixture
def cluster(tmp_path):
    first = RabbitMQ(tmp_path / "n1", durable_queue_type="quorum").start()
    nodes = [first]
    try:
        for i in (2, 3):
            n = RabbitMQ(tmp_path / f"n{i}", cluster_with=first, durable_queue_type="quorum").start()
            nodes.append(n)
            n.join_cluster(first)
        yield nodes
    finally:
        for n in reversed(nodes):
            n.close()


def test_failover_inside_a_quorum_cluster_loses_and_repeats_nothing(cluster, tmp_path, uid):
    n1, n2, n3 = cluster
    topic = f"/cf/v1/AAA/012C/{uid}/set"
    relay = Relay(tmp_path / "relay", n1, f"gateway-{uid}", [topic])
    with_hosts(relay, [f"{n.host}:{n.port}" for n in cluster])
    relay.start()
    try:
        q = n1.rabbitmqctl("list_queues", "name", "type")
        assert f"mqtt-subscription-gateway-{uid}qos1\tquorum" in q.stdout, q.stdout
        payloads = [f"cmd-{i:05d}".encode() for i in range(COMMANDS)]
        pub = RetryingPublisher(n3, topic, payloads, chunk=30, pause=0.2)
        relay.wait_count(60)
        t0 = time.monotonic()
        n1.stop()
        relay.wait_log(f"connected to {n2.host}:{n2.port}", 60)
        failover_s = time.monotonic() - t0
        pub.join(180)
        assert not pub.is_alive()
        relay.wait_for(lambda: len({r["payload"] for r in relay.accepted()}) >= COMMANDS, 120,
                       "every command accepted")
        n1.start()                      # back; the relay stays on n2
        accepted = [r["payload"] for r in relay.accepted()]
        twice = {p for p in accepted if accepted.count(p) > 1}
        log = relay.log()
        print(f"cluster: {COMMANDS} commands, 1 node stop, failover {failover_s:.1f} s, "
              f"{len(set(payloads) - set(accepted))} lost, {len(accepted) - len(set(accepted))} accepted twice, "
              f"{relay.count()} rows, {len(pub.errors)} publisher reconnects, {len(pub.resent)} resent")
        assert set(accepted) == set(payloads), "lost commands"
        assert twice <= pub.resent, f"accepted twice without being published twice: {sorted(twice - pub.resent)[:5]}"
        assert f"failing over from {n1.host}:{n1.port} to {n2.host}:{n2.port}" in log
        assert "may be lost" not in log, "a quorum session must survive a node"
    finally:
        relay.stop()
