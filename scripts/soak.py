#!/usr/bin/python3
"""Soak test: cmdrelayd under a long randomized mix of faults, without loss.

    scripts/soak.py [--minutes 30] [--broker mosquitto|rabbitmq|both] [--seed N]
                    [--rate 300] [--workdir DIR]

(`make soak` runs it with the defaults; `make soak SOAK_ARGS="--minutes 5"`.)

Starts its own broker on loopback (Mosquitto with persistence, or a private
RabbitMQ node with the MQTT plugin, as the tests do), the real build/cmdrelayd
and two named consumer processes with different filters, and publishes a
stream of QoS 1 commands over three device topics, in rounds of 40-80 s.
During each round, at random moments: `kill -9` of the relay (several per
round), `kill -9` of a consumer, a clean relay restart, a broker restart.
After each round it waits until every command the broker confirmed is in the
history and both consumers acked the last one, then checks everything so far
(tests/test_faults.py: check_history, check_consumer):

- every confirmed command accepted exactly once, in publish order per topic,
  duplicates only as recorded redeliveries of the accepted row;
- each consumer got every command, in order from its durable cursor, and got
  one again only above that cursor, when its ack was lost to a relay end.

Prints a summary (commands, kills, restarts, verified) and exits 0, or 1 at the
first loss, repeat or stall (the work directory is kept for the post-mortem).
With --broker both, each broker gets --minutes.
"""
import argparse
import os
import random
import secrets
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import test_faults as tf  # noqa: E402
from brokers import BrokerStartError, Mosquitto, RabbitMQ  # noqa: E402
from relay import CMDRELAYD  # noqa: E402


def say(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


class Failed(Exception):
    pass


def soak_one(kind, minutes, rate, seed, workdir):
    rng = random.Random(seed)
    bdir = workdir / kind
    bdir.mkdir(parents=True, exist_ok=True)
    if kind == "mosquitto":
        broker = Mosquitto(bdir / "mosquitto")
        broker.start(persistence=True)
    else:
        broker = RabbitMQ(bdir / "rabbitmq")
        broker.start()
    say(f"{kind}: broker up on {broker.host}:{broker.port}; soaking for {minutes} min at ~{rate} commands/s")
    uid = secrets.token_hex(4)
    run = tf.FaultRun(bdir / "run", broker, uid, n_topics=3, seed=seed)
    t_start = time.monotonic()
    end = t_start + minutes * 60
    rounds = 0
    figures = {}
    try:
        run.start()
        while time.monotonic() < end - 10:
            rounds += 1
            length = min(rng.uniform(40, 80), max(10.0, end - time.monotonic() - 5))
            r_rate = rate * rng.uniform(0.5, 1.5)
            n = max(100, int(r_rate * length))
            t0 = time.monotonic()
            run.publish(n, rate=r_rate)
            faults = [(rng.uniform(0.05, 0.9) * length, "relay kill") for _ in range(rng.randint(2, 6))]
            faults += [(rng.uniform(0.05, 0.9) * length, "consumer kill") for _ in range(rng.randint(0, 3))]
            if rng.random() < (0.4 if kind == "mosquitto" else 0.25):
                faults.append((rng.uniform(0.1, 0.8) * length, "broker restart"))
            if rng.random() < 0.3:
                faults.append((rng.uniform(0.1, 0.8) * length, "relay restart"))
            done = []
            for at, what in sorted(faults):
                time.sleep(max(0.0, t0 + at - time.monotonic()))
                if what == "relay kill":
                    run.kill_relay()
                elif what == "consumer kill":
                    run.kill_consumer(rng.choice(run.consumers), restart_after=rng.uniform(0, 1.0))
                elif what == "broker restart":
                    run.restart_broker()
                else:
                    run.restart_relay()
                done.append(what)
            try:
                run.wait_settled(timeout=300)
                figures = run.verify(stop_consumers=False)
            except AssertionError as e:
                raise Failed(f"round {rounds}: {e}") from e
            elapsed = (time.monotonic() - t_start) / 60
            say(f"{kind}: round {rounds} ({elapsed:.1f} min): {n} commands, faults {sorted(done)}; "
                f"verified {figures['accepted']} commands so far")
        figures = run.verify()
        figures["rounds"] = rounds
        figures["minutes"] = round((time.monotonic() - t_start) / 60, 1)
        return figures
    finally:
        run.close()
        if kind == "rabbitmq":
            broker.close()
        else:
            broker.stop()


def _on_term(signum, frame):
    raise KeyboardInterrupt("SIGTERM")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--minutes", type=float, default=30.0, help="per broker (default 30)")
    p.add_argument("--broker", choices=["mosquitto", "rabbitmq", "both"], default="mosquitto")
    p.add_argument("--rate", type=float, default=None,
                   help="commands/s on average (default 300 on Mosquitto, 150 on RabbitMQ)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--workdir", type=Path, default=None, help="kept; default: a temporary directory "
                   "removed after a successful run")
    a = p.parse_args()
    if not os.access(CMDRELAYD, os.X_OK):
        sys.exit(f"soak: {CMDRELAYD} is missing: run make first")
    seed = a.seed if a.seed is not None else random.SystemRandom().randrange(1 << 31)
    workdir = a.workdir or Path(tempfile.mkdtemp(prefix="cmdrelay-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _on_term)
    kinds = ["mosquitto", "rabbitmq"] if a.broker == "both" else [a.broker]
    say(f"soak: seed {seed}, work directory {workdir}")
    results, status = {}, 0
    t0 = time.monotonic()
    try:
        for kind in kinds:
            rate = a.rate or (300 if kind == "mosquitto" else 150)
            results[kind] = soak_one(kind, a.minutes, rate, seed, workdir)
    except Failed as e:
        say(f"soak: FAILED: {e}")
        status = 1
    except BrokerStartError as e:
        say(f"soak: the broker did not start: {e}")
        status = 1
    except KeyboardInterrupt:
        say("soak: interrupted")
        status = 130

    print()
    print(f"soak summary (seed {seed}, {(time.monotonic() - t0) / 60:.1f} min)")
    for kind, f in results.items():
        cons = f["consumers"]
        print(f"  {kind}: {f['minutes']} min, {f['rounds']} rounds verified")
        print(f"    commands: {f['confirmed']} confirmed by the broker (+{f['maybe']} in flight at a broker "
              f"restart, {f['maybe_arrived']} of them arrived), {f['accepted']} accepted once each, "
              f"duplicate rows {f['duplicate_rows']}")
        print(f"    faults: {f['relay_kills']} relay kill -9, {f['relay_restarts']} clean relay restarts, "
              f"{f['consumer_kills']} consumer kill -9, {f['broker_restarts']} broker restarts")
        for name, c in cons.items():
            print(f"    consumer {name}: {c['distinct']} commands, {c['deliveries']} deliveries over "
                  f"{c['connections']} connections; again: {c['again_unacked']} unacked, "
                  f"{c['again_after_lost_ack']} after {c['lost_acks']} acks lost to a relay end "
                  f"(at most {c['longest_ack_to_kill_s']} s before it)")
    if status == 0 and len(results) == len(kinds):
        print("  verdict: no loss, no repeat")
        if a.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"  verdict: FAILED; see {workdir}")
    sys.exit(status)


if __name__ == "__main__":
    main()
