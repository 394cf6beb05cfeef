#!/usr/bin/python3
# A named cmdrelay consumer: handles every command once, in order, acks each
# one only after handling it, and reconnects with backoff when the relay goes
# away. Usage: consumer.py [SOCKET [NAME [FILTER]]]
import json, socket, sys, time

path = sys.argv[1] if len(sys.argv) > 1 else "/run/cmdrelay/cmdrelay.sock"
name = sys.argv[2] if len(sys.argv) > 2 else "lamp"
filt = sys.argv[3] if len(sys.argv) > 3 else "#"
last, delay = 0, 0.1  # last id handled: a redelivery of it is acked, not redone


def handle(cmd):  # act on the command here
    print(cmd["id"], cmd["topic"], cmd["encoding"], cmd["payload"], flush=True)


def send(s, obj):
    s.sendall((json.dumps(obj) + "\n").encode())


while True:
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(path)
            send(s, {"op": "hello", "consumer": name, "filter": filt})
            # Binary reads, writes on the socket: a text makefile("rw") drops read-ahead lines.
            for line in s.makefile("rb"):
                msg = json.loads(line)
                if msg["type"] == "error":
                    sys.exit(f"cmdrelayd: {msg['code']}: {msg['message']}")
                delay = 0.1
                if msg["type"] == "command":
                    if msg["id"] > last:
                        handle(msg)
                        last = msg["id"]
                    send(s, {"op": "ack", "id": msg["id"]})
    except (FileNotFoundError, ConnectionError) as e:
        print("cmdrelayd:", e, file=sys.stderr)
    time.sleep(delay)
    delay = min(delay * 2, 30)
