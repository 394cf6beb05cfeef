"""broker.protocol: mqttv5 against Mosquitto 2.0 (RabbitMQ 3.10 has no MQTT 5)."""
import time

from brokers import publish
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
