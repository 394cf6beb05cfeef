#!/usr/bin/node
// A named cmdrelay consumer (Node.js, standard library): handles every command
// once, in order, acks each one only after handling it, and reconnects with
// backoff when the relay goes away. Usage: consumer.js [SOCKET [NAME [FILTER]]]
"use strict";
const net = require("net"), readline = require("readline");
const [path = "/run/cmdrelay/cmdrelay.sock", name = "lamp", filter = "#"] = process.argv.slice(2);
let last = 0, delay = 100; // last id handled: a redelivery of it is acked, not redone

function handle(cmd) { // act on the command here (writes to a pipe are synchronous on Linux)
  process.stdout.write(`${cmd.id} ${cmd.topic} ${cmd.encoding} ${cmd.payload}\n`);
}

function connect() {
  const s = net.createConnection(path);
  const send = (obj) => s.write(JSON.stringify(obj) + "\n");
  s.on("connect", () => send({ op: "hello", consumer: name, filter }));
  const lines = readline.createInterface({ input: s });
  lines.on("error", () => {}); // the socket's own handler below says it once
  lines.on("line", (line) => {
    const msg = JSON.parse(line);
    if (msg.type === "error") {
      console.error(`cmdrelayd: ${msg.code}: ${msg.message}`);
      process.exit(1);
    }
    delay = 100;
    if (msg.type !== "command" || s.destroyed) return;
    if (msg.id > last) {
      handle(msg);
      last = msg.id;
    }
    send({ op: "ack", id: msg.id });
  });
  s.on("error", (e) => console.error(`cmdrelayd: ${e.message}`));
  s.on("close", () => {
    setTimeout(connect, delay);
    delay = Math.min(delay * 2, 30000);
  });
}
connect();
