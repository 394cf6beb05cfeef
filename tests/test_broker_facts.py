"""The broker behaviours that cmdrelay's de-duplication relies on
(design.md, "The seed scenario, as the brokers really behave"), checked
against both real brokers with plain MQTT clients -- no daemon involved.

If one of these fails after a broker upgrade, the daemon's duplicate
detection must be revisited before anything else.
"""

import time

import pytest

from brokers import RawMQTTClient, Subscriber, clear_retained, drop_session, publish

# (e) Packet id of a QoS 1 message redelivered after the subscriber's
# connection died without PUBACK. MQTT 3.1.1 wants the same one; what the
# brokers really do (measured, Debian 12):
#   mosquitto 2.0.11: the same packet id (it resends its in-flight message)
#   rabbitmq 3.10.8:  a new packet id (the message went back to the queue and
#                     is delivered anew on the new connection, numbered by it)
# So the daemon must not rely on the mid to recognise a redelivery.
REDELIVERY_KEEPS_MID = {"mosquitto": True, "rabbitmq": False}


@pytest.fixture
def names(broker, uid):
    """Topic and client ids unique to the test; retained messages and
    sessions it leaves behind are removed afterwards (the RabbitMQ node is
    shared by the whole session)."""
    n = {
        "topic": f"/cf/v1/TST/{uid}/dev{uid}/set",
        "sub": f"cmdrelay-facts-{uid}",
    }
    yield n
    if broker.is_running():
        clear_retained(broker, n["topic"])
        drop_session(broker, n["sub"])


def fmt(msgs):
    return [(m.payload, f"r{int(m.retain)}", f"d{int(m.dup)}", f"q{m.qos}", f"mid{m.mid}") for m in msgs]


def test_a_resubscribe_replays_retained_every_time(broker, names):
    """(a) a persistent-session subscriber on an exact topic that reconnects
    and SUBSCRIBEs again receives the retained message again, RETAIN=1."""
    topic = names["topic"]
    publish(broker, topic, "cmd-a", qos=1, retain=True)
    sub = Subscriber(broker, names["sub"], [topic])
    try:
        assert sub.connect() is False
        first = sub.wait_for(1)
        assert fmt(first) == [(b"cmd-a", "r1", "d0", "q1", f"mid{first[0].mid}")]
        for _ in range(2):
            sub.disconnect()
            sub.clear()
            assert sub.connect(subscribe=True) is True       # session present
            sub.wait_for(1)
            got = sub.settle(quiet=0.5)
            assert [(m.payload, m.retain, m.dup) for m in got] == [(b"cmd-a", True, False)], fmt(got)
    finally:
        sub.disconnect()


def test_b_offline_retained_publish_arrives_twice(broker, names):
    """(b) published retain=1 qos=1 while the subscriber is offline: at the
    next connect + SUBSCRIBE it arrives twice, the queued copy (RETAIN=0)
    first, then the retained replay (RETAIN=1)."""
    topic = names["topic"]
    sub = Subscriber(broker, names["sub"], [topic])
    try:
        assert sub.connect() is False
        assert sub.settle(quiet=0.3) == []
        sub.disconnect()

        publish(broker, topic, "cmd-b", qos=1, retain=True)

        assert sub.connect(subscribe=True) is True
        sub.wait_for(2)
        got = sub.settle(quiet=0.5)
        assert [(m.payload, m.retain, m.dup, m.qos) for m in got] == [
            (b"cmd-b", False, False, 1),    # the copy queued in the session
            (b"cmd-b", True, False, 1),     # the retained replay of the SUBSCRIBE
        ], fmt(got)
    finally:
        sub.disconnect()


def test_c_session_present_keeps_subscription_without_retained_replay(broker, names):
    """(c) reconnect with session present = 1 and no SUBSCRIBE: new
    publications still arrive, and no retained copy is sent."""
    topic = names["topic"]
    publish(broker, topic, "old", qos=1, retain=True)
    sub = Subscriber(broker, names["sub"], [topic])
    try:
        assert sub.connect() is False
        assert [(m.payload, m.retain) for m in sub.wait_for(1)] == [(b"old", True)]
        sub.disconnect()
        sub.clear()

        assert sub.connect(subscribe=False) is True
        assert sub.settle(quiet=0.5) == []          # no retained replay without SUBSCRIBE
        publish(broker, topic, "new", qos=1, retain=False)
        sub.wait_for(1)
        got = sub.settle(quiet=0.5)
        assert [(m.payload, m.retain, m.dup) for m in got] == [(b"new", False, False)], fmt(got)
    finally:
        sub.disconnect()


def test_d_live_retained_publish_arrives_with_retain_0(broker, names):
    """(d) a retain=1 publication to an already-subscribed client arrives
    with RETAIN=0; the same payload sent twice arrives twice (a genuinely new
    command, RETAIN=0 DUP=0 both times); it is still stored as retained."""
    topic = names["topic"]
    sub = Subscriber(broker, names["sub"], [topic])
    try:
        assert sub.connect() is False
        assert sub.settle(quiet=0.3) == []
        publish(broker, topic, "reboot", qos=1, retain=True)
        publish(broker, topic, "reboot", qos=1, retain=True)
        sub.wait_for(2)
        got = sub.settle(quiet=0.5)
        assert [(m.payload, m.retain, m.dup, m.qos) for m in got] == [
            (b"reboot", False, False, 1), (b"reboot", False, False, 1)], fmt(got)
        assert got[0].mid != got[1].mid
    finally:
        sub.disconnect()
    # a new subscriber gets the stored retained copy, flagged RETAIN=1
    probe = RawMQTTClient.for_broker(broker, names["sub"] + "-probe", clean_session=True, auto_ack=True)
    probe.connect()
    try:
        probe.subscribe(topic)
        got = probe.recv_all(quiet=0.5)
        assert [(m.payload, m.retain) for m in got] == [(b"reboot", True)], fmt(got)
    finally:
        probe.disconnect()


def test_e_unacked_message_redelivered_with_dup(broker, names, record_property):
    """(e) a QoS 1 message received but not PUBACKed before the subscriber's
    connection died is redelivered after reconnect with DUP=1, RETAIN=0 --
    and nothing that was PUBACKed comes again. Records whether the
    redelivery keeps the packet id (see REDELIVERY_KEEPS_MID)."""
    topic = names["topic"]
    c = RawMQTTClient.for_broker(broker, names["sub"], clean_session=False, timeout=10)
    assert c.connect() is False
    c.subscribe(topic, qos=1)
    # a few acknowledged messages first, so that the unacknowledged one does
    # not carry packet id 1 (a fresh connection's first id)
    for i in range(3):
        publish(broker, topic, f"acked-{i}")
        m = c.recv_publish(timeout=5)
        assert m is not None and m.payload == f"acked-{i}".encode() and not m.dup
        c.puback(m.mid)
    publish(broker, topic, "unacked")
    orig = c.recv_publish(timeout=5)
    assert orig is not None and orig.payload == b"unacked"
    assert (orig.qos, orig.retain, orig.dup) == (1, False, False)
    assert orig.mid != 1
    c.abort()                     # dies without PUBACK and without DISCONNECT

    c2 = RawMQTTClient.for_broker(broker, names["sub"], clean_session=False, timeout=10)
    try:
        assert c2.connect() is True               # session present; no SUBSCRIBE
        again = c2.recv_publish(timeout=10)
        assert again is not None, "no redelivery"
        assert (again.payload, again.qos, again.retain, again.dup) == (b"unacked", 1, False, True), fmt([again])
        c2.puback(again.mid)
        rest = c2.recv_all(quiet=0.5)
        assert rest == [], fmt(rest)
        same = again.mid == orig.mid
        record_property("redelivery_mid", f"{broker.name}: original {orig.mid}, redelivered {again.mid}")
        print(f"{broker.name}: original mid {orig.mid}, redelivered mid {again.mid}")
        assert same is REDELIVERY_KEEPS_MID[broker.name], (
            f"{broker.name}: original mid {orig.mid}, redelivered mid {again.mid}")
        # the subscription is still there for new messages
        publish(broker, topic, "after")
        m = c2.recv_publish(timeout=5)
        assert m is not None and (m.payload, m.dup, m.retain) == (b"after", False, False)
        c2.puback(m.mid)
    finally:
        c2.disconnect()


# RabbitMQ before 4.x sends no retained message to a wildcard subscription
RETAINED_TO_WILDCARD = {"mosquitto": True, "rabbitmq": False}


def test_f_retained_and_wildcard_subscriptions(broker, names, uid):
    """design.md: RabbitMQ (before 4.x) sends no retained messages to
    wildcard subscriptions; Mosquitto does, with RETAIN=1."""
    topic = names["topic"]
    publish(broker, topic, "cmd-f", qos=1, retain=True)
    c = RawMQTTClient.for_broker(broker, names["sub"] + "-wild", clean_session=True, auto_ack=True)
    c.connect()
    try:
        c.subscribe(f"/cf/v1/TST/{uid}/+/set")
        got = c.recv_all(quiet=0.7)
        expected = [(b"cmd-f", True)] if RETAINED_TO_WILDCARD[broker.name] else []
        assert [(m.payload, m.retain) for m in got] == expected, fmt(got)
    finally:
        c.disconnect()


@pytest.mark.persistence
def test_g_durable_session_survives_clean_broker_restart(broker, names, uid):
    """The fixtures' restart() keeps durable state: a persistent session, the
    message queued in it while the subscriber was offline, and retained
    messages survive a clean broker restart on the same port (Mosquitto
    with persistence; RabbitMQ always)."""
    topic = names["topic"]
    other = f"/cf/v1/TST/{uid}/other{uid}/set"
    sub = Subscriber(broker, names["sub"], [topic])
    try:
        assert sub.connect() is False
        sub.disconnect()
        publish(broker, topic, "queued", qos=1)
        publish(broker, other, "kept", qos=1, retain=True)
        port = broker.port
        broker.restart()
        assert broker.port == port
        print(f"{broker.name} restart: {broker.restart_seconds:.1f} s")

        assert sub.connect(subscribe=False) is True
        sub.wait_for(1)
        publish(broker, topic, "after", qos=1)
        sub.wait_for(2)
        got = sub.settle(quiet=0.5)
        assert [(m.payload, m.retain) for m in got] == [(b"queued", False), (b"after", False)], fmt(got)
    finally:
        sub.disconnect()
    probe = RawMQTTClient.for_broker(broker, names["sub"] + "-probe", clean_session=True, auto_ack=True)
    probe.connect()
    try:
        probe.subscribe(other)
        assert [(m.payload, m.retain) for m in probe.recv_all(quiet=0.5)] == [(b"kept", True)]
    finally:
        probe.disconnect()
        clear_retained(broker, other)


BARRIER_TOPIC = "$cmdrelay/barrier"    # broker.barrier_topic's default


def test_h_barrier_answer_means_pubacks_arrived(broker, names):
    """(h) The barrier the relay's dedup rule stands on (README, "How repeats
    are recognised"): once a SUBSCRIBE or UNSUBSCRIBE of the barrier topic
    sent after some PUBACKs is answered, the broker has those PUBACKs, so a
    crash right then (TCP reset with unread deliveries) never brings them
    again. On RabbitMQ the answer must come through the channel that got the
    acks: only a (UN)SUBSCRIBE of a filter this connection subscribed does.
    Many rounds, both requests."""
    topic = names["topic"]
    rounds, burst, unread = 12, 8, 2
    seq = 0
    for rnd in range(rounds):
        c = RawMQTTClient.for_broker(broker, names["sub"], clean_session=False, timeout=10)
        present = c.connect()
        assert present is (rnd > 0)
        if rnd == 0:
            c.subscribe(topic, qos=1)
        # what the last round left unread comes again first: PUBACK it
        for m in c.recv_all(quiet=0.3):
            assert m.dup and m.payload.startswith(b"unread-"), fmt([m])
            c.puback(m.mid)
        confirmed = []
        for _ in range(burst):
            publish(broker, topic, f"confirmed-{seq}")
            seq += 1
        for _ in range(burst):
            m = c.recv_publish(timeout=10)
            assert m is not None and not m.dup
            confirmed.append(m.payload)
            c.puback(m.mid)
        c.subscribe(BARRIER_TOPIC, qos=0)           # answered: the PUBACKs are in
        if rnd % 2:
            c.unsubscribe(BARRIER_TOPIC)            # the relay's other barrier
        for i in range(unread):
            publish(broker, topic, f"unread-{rnd}-{i}")
        time.sleep(0.1)                             # delivered, not read
        c.abort()

        c2 = RawMQTTClient.for_broker(broker, names["sub"], clean_session=False, timeout=10)
        try:
            assert c2.connect() is True
            again = c2.recv_all(quiet=0.5)
            assert [m.payload for m in again] == [f"unread-{rnd}-{i}".encode() for i in range(unread)], \
                f"round {rnd}: {fmt(again)} (confirmed: {confirmed})"
            assert all(m.dup for m in again)
            for m in again:
                c2.puback(m.mid)
            c2.subscribe(BARRIER_TOPIC, qos=0)
        finally:
            c2.disconnect()
