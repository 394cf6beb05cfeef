"""broker.protocol: mqttv5 and auto (the default) against Mosquitto 2.0, and
auto against RabbitMQ 3.10, which has no MQTT 5."""
import os
import signal
import time

from brokers import publish, publish_many
from consumer_client import ConsumerClient
from relay import Relay


def v5_relay(tmp_path, broker, uid, topics):
    relay = Relay(tmp_path / "relay", broker, f"gateway-{uid}", topics)
    relay.write_config(topics, broker={
        "host": broker.host, "port": broker.port, "client_id": f"gateway-{uid}",
        "keepalive": 10, "protocol": "mqttv5", "session_expiry": "1h",
        "reconnect": {"min_delay": "100ms", "max_delay": "2s"}})
    return relay


def test_seed_scenario_without_retained_replays(mosquitto, tmp_path, uid):
    """The seed scenario on MQTT 5: Retain Handling 1 stops the replays at
    the broker, so the history holds the command once and no duplicate, over
    a first start with a fresh history and three restarts."""
    topic = f"/cf/v1/AAA/012C/{uid}/set"
    relay = v5_relay(tmp_path, mosquitto, uid, [topic])
    relay.start()                 # creates the session (expiry 1h) and subscribes
    relay.stop()
    publish(mosquitto, topic, b'{"cmd":"reboot"}', qos=1, retain=True)
    for _ in range(4):
        relay.start()
        relay.wait_count(1)
        time.sleep(0.5)
        assert "session present: yes" in relay.log(since_start=True)
        relay.stop()
    rows = relay.rows()
    assert [(r["status"], r["reason"], bytes(r["payload"])) for r in rows] == \
        [("accepted", None, b'{"cmd":"reboot"}')]


def test_new_filter_still_gets_the_retained_command(mosquitto, tmp_path, uid):
    """Retain Handling 1 sends retained messages for a subscription the
    session did not have: a filter added later gets the topic's command."""
    a, b = f"/cf/v1/AAA/012C/{uid}/set", f"/cf/v1/AAA/012C/{uid}-b/set"
    relay = v5_relay(tmp_path, mosquitto, uid, [a])
    relay.start()
    publish(mosquitto, b, b"for b", qos=1, retain=True)
    relay.stop()
    relay.write_config([a, b], broker={
        "host": mosquitto.host, "port": mosquitto.port, "client_id": f"gateway-{uid}",
        "keepalive": 10, "protocol": "mqttv5", "session_expiry": "1h",
        "reconnect": {"min_delay": "100ms", "max_delay": "2s"}})
    relay.start()
    relay.wait_count(1)
    time.sleep(0.5)
    assert [(r["status"], r["retain"], bytes(r["payload"])) for r in relay.rows()] == \
        [("accepted", 1, b"for b")]
    relay.stop()


def test_session_survives_while_down(mosquitto, tmp_path, uid):
    """clean_start = 0 with a session expiry: commands published while the
    relay is down wait at the broker and arrive once, in order."""
    topic = f"/cf/v1/AAA/012C/{uid}/set"
    relay = v5_relay(tmp_path, mosquitto, uid, [topic])
    relay.start()
    relay.stop()
    for i in range(5):
        publish(mosquitto, topic, f"c{i}".encode(), qos=1)
    relay.start()
    relay.wait_count(5)
    time.sleep(0.3)
    assert [bytes(r["payload"]) for r in relay.accepted()] == [f"c{i}".encode() for i in range(5)]
    relay.stop()


def default_relay(tmp_path, broker, uid, topics, **broker_keys):
    """The daemon's default protocol (auto), packet ids as the broker does them."""
    relay = Relay(tmp_path / "relay", broker, f"gateway-{uid}", topics)
    relay.write_config(topics, broker={
        "host": broker.host, "port": broker.port, "client_id": f"gateway-{uid}", "keepalive": 10,
        "packet_ids": broker.packet_ids, "protocol": None,
        "reconnect": {"min_delay": "100ms", "max_delay": "2s"}, **broker_keys})
    return relay


def queued_while_away_arrive(relay, broker, topic, protocol, before=()):
    """Five commands published while the relay is stopped arrive once, in
    order, after a restart on the session the broker kept, over protocol."""
    relay.stop()
    for i in range(5):
        publish(broker, topic, b"c%d" % i)
    relay.start()
    relay.wait_count(len(before) + 5)
    log = relay.log(since_start=True)
    assert "session present: yes" in log, log
    with ConsumerClient.connect(relay.workdir / "cmdrelay.sock") as c:
        assert c.stats()["broker"]["protocol"] == protocol
    time.sleep(0.3)
    assert [bytes(r["payload"]) for r in relay.accepted()] == list(before) + [b"c%d" % i for i in range(5)]
    return log


def tcp_rx_queue(pid):
    """Bytes waiting in the receive queue of the process's one TCP socket."""
    inodes = {os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1] for fd in os.listdir(f"/proc/{pid}/fd")
              if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:[")}
    queues = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in list(f)[1:]:
                cols = line.split()
                if cols[9] in inodes:
                    queues.append(int(cols[4].split(":")[1], 16))
    assert len(queues) == 1, queues
    return queues[0]


def test_receive_maximum_is_the_window_mosquitto_sends(mosquitto, tmp_path, uid):
    """broker.receive_maximum goes into the MQTT 5 CONNECT and Mosquitto
    sends that many unacknowledged PUBLISHes, no more: with the relay
    stopped, 300 queued commands put exactly 100 into its socket (the old
    code asked for libmosquitto's 20); the window is logged; all 300 arrive."""
    topic = f"/cf/v1/AAA/012C/{uid}/set"
    relay = default_relay(tmp_path, mosquitto, uid, [topic], receive_maximum=100)
    relay.start()
    assert "the broker sends us up to 100 unacknowledged messages" in relay.log(since_start=True)
    relay.proc.send_signal(signal.SIGSTOP)
    try:
        payloads = [b"cmd-%03d" % i for i in range(300)]
        publish_many(mosquitto, topic, payloads)
        rest = 2 + len(topic) + 2 + 1 + len(payloads[0])    # topic, packet id, no properties, payload
        packet = 1 + 1 + rest                                # fixed header with a one-byte length
        deadline, seen = time.monotonic() + 10, -1
        while time.monotonic() < deadline:
            now = tcp_rx_queue(relay.proc.pid)
            if now == seen and now > 0:
                break
            seen = now
            time.sleep(0.5)
        assert seen == 100 * packet, f"{seen} bytes: {seen / packet:.1f} PUBLISHes"
    finally:
        relay.proc.send_signal(signal.SIGCONT)
    relay.wait_count(300)
    assert [bytes(r["payload"]) for r in relay.accepted()] == payloads
    relay.stop()


def test_auto_keeps_the_session_on_mosquitto(mosquitto, tmp_path, uid):
    """The default (auto) talks MQTT 5 to Mosquitto; a session made over
    MQTT 3.1.1 (an upgrade from the old default) and then its own both keep
    what was queued while the relay was away: it arrives once, in order."""
    topic = f"/cf/v1/AAA/012C/{uid}/set"
    old = Relay(tmp_path / "relay", mosquitto, f"gateway-{uid}", [topic])
    old.start()
    old.stop()
    publish(mosquitto, topic, b"queued under 3.1.1")
    relay = default_relay(tmp_path, mosquitto, uid, [topic])
    relay.start()
    relay.wait_count(1)
    log = relay.log(since_start=True)
    assert "session present: yes" in log and "MQTT 5: the broker sends us up to 1024" in log, log
    queued_while_away_arrive(relay, mosquitto, topic, "mqttv5", [b"queued under 3.1.1"])
    relay.stop()


def test_auto_falls_back_to_311_on_rabbitmq_and_keeps_the_session(rabbitmq, tmp_path, uid):
    """RabbitMQ 3.10 closes an MQTT 5 CONNECT without a CONNACK: auto
    logs that and connects with MQTT 3.1.1 at once, same client id, same
    durable session; commands queued while the relay was away arrive once,
    in order, after a restart that falls back again."""
    topic = f"/cf/v1/AAA/012C/{uid}/set"
    relay = default_relay(tmp_path, rabbitmq, uid, [topic])
    relay.start()
    log = relay.log(since_start=True)
    assert "no CONNACK to MQTT 5" in log and "refused MQTT 5 and took MQTT 3.1.1" in log, log
    assert "DISCONNECT: reason code" not in log, log      # the broker sent none
    log = queued_while_away_arrive(relay, rabbitmq, topic, "mqttv311")
    assert "refused MQTT 5 and took MQTT 3.1.1" in log, log
    relay.stop()
