"""Session loss is an alarm (issue 17): when the broker answers
session-present = 0 although the history shows it held our session, the
relay warns that queued commands may be lost, counts it (stats, metrics) and
says so in STATUS until the next clean reconnect. The first connect is no
alarm."""
from brokers import publish
from consumer_client import ConsumerClient
from relay import Relay
from test_metrics import read_metrics

WARNING = "commands queued for us while we were away may be lost"
STATUS_MARK = "SESSION LOST"


def stats(relay):
    c = ConsumerClient.connect(str(relay.workdir / "cmdrelay.sock"))
    try:
        return c.stats()
    finally:
        c.close()


def status_lines(relay):
    return [s for s in relay.notify.seen("STATUS=")]


def start_relay(tmp_path, broker, uid, topic):
    prom = tmp_path / "cmdrelay.prom"
    relay = Relay(tmp_path / "relay", broker, f"gateway-{uid}", [topic],
                  metrics={"textfile": str(prom), "interval": "1s"})
    relay.start()
    return relay, prom


def assert_first_connect_is_quiet(relay, prom):
    assert stats(relay)["session_lost"] == 0
    assert WARNING not in relay.log()
    assert not [s for s in status_lines(relay) if STATUS_MARK in s]
    relay.wait_for(lambda: prom.exists(), 10, "the textfile")
    assert read_metrics(prom)[("cmdrelay_session_lost_total", ())] == 0


def assert_alarm(relay, prom):
    relay.wait_log(WARNING)
    assert stats(relay)["session_lost"] == 1
    relay.wait_for(lambda: [s for s in status_lines(relay) if STATUS_MARK in s], 10, "STATUS with the alarm")
    relay.wait_for(lambda: read_metrics(prom).get(("cmdrelay_session_lost_total", ())) == 1, 10,
                   "cmdrelay_session_lost_total 1")


def test_mosquitto_restart_without_persistence_is_an_alarm(mosquitto, tmp_path, uid):
    topic = f"/cf/v1/AAA/012C/{uid}/set"
    relay, prom = start_relay(tmp_path, mosquitto, uid, topic)
    try:
        assert_first_connect_is_quiet(relay, prom)
        mosquitto.restart(persistence=False)     # every session gone
        assert_alarm(relay, prom)
        relay.wait_log("subscriptions in place", 30)
        publish(mosquitto, topic, b"after", qos=1)   # re-subscribed (G8)
        relay.wait_count(1)

        # a reconnect that finds the session clears STATUS, keeps the count
        mark = len(relay.notify.seen("STATUS="))
        mosquitto.stop()
        mosquitto.start(persistence=True)
        # this restart also lost the session; the next one keeps it
        relay.wait_for(lambda: stats(relay)["session_lost"] == 2, 30, "second loss")
        mosquitto.restart(persistence=True)
        relay.wait_for(lambda: stats(relay)["broker"].get("session_present") is True, 30,
                       "a clean reconnect")
        relay.wait_for(lambda: STATUS_MARK not in relay.notify.seen("STATUS=")[-1], 10,
                       "STATUS without the alarm")
        assert mark < len(relay.notify.seen("STATUS="))
        assert stats(relay)["session_lost"] == 2
    finally:
        relay.stop()


def test_rabbitmq_deleted_session_queue_is_an_alarm(rabbitmq, tmp_path, uid):
    topic = f"/cf/v1/AAA/012C/{uid}/set"
    relay, prom = start_relay(tmp_path, rabbitmq, uid, topic)
    try:
        assert_first_connect_is_quiet(relay, prom)
    finally:
        relay.stop()
    publish(rabbitmq, topic, b"queued while away", qos=1)
    # what mqtt.subscription_ttl does to a gateway away too long
    r = rabbitmq.rabbitmqctl("delete_queue", f"mqtt-subscription-gateway-{uid}qos1")
    assert r.returncode == 0, r.stderr
    relay.start()
    try:
        assert_alarm(relay, prom)
        publish(rabbitmq, topic, b"after", qos=1)    # re-subscribed (G8)
        relay.wait_for(lambda: relay.query("SELECT payload FROM messages") == [(b"after",)], 30,
                       "the new command, and not the lost one")
    finally:
        relay.stop()


def test_rabbitmq_harness_runs_the_documented_session_settings(rabbitmq):
    """The README's RabbitMQ table, as the harness's node really runs it."""
    want = {"subscription_ttl": "86400000", "prefetch": "10", "durable_queue_type": "classic"}
    for key, value in want.items():
        r = rabbitmq.rabbitmqctl("eval", f"application:get_env(rabbitmq_mqtt, {key}).")
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == f"{{ok,{value}}}", (key, r.stdout)
