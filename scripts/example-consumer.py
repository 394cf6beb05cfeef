#!/usr/bin/python3
# A named cmdrelay consumer: gets every command once, in order, also those
# that arrived while it was not running. Usage: example-consumer.py [SOCKET]
import json, socket, sys

s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1] if len(sys.argv) > 1 else "/run/cmdrelay/cmdrelay.sock")
f = s.makefile("rw")
f.write(json.dumps({"op": "hello", "consumer": "lamp", "filter": "/cf/v1/+/+/+/set"}) + "\n")
f.flush()
for line in f:
    msg = json.loads(line)
    if msg["type"] == "command":
        print(msg["id"], msg["fields"].get("device"), msg["payload"], flush=True)  # act on it here
        f.write(json.dumps({"op": "ack", "id": msg["id"]}) + "\n")
        f.flush()
    elif msg["type"] == "error":
        print("cmdrelayd:", msg["code"], msg["message"], file=sys.stderr)
