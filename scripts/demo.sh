#!/usr/bin/env bash
# make demo: the seed scenario on a private Mosquitto, end to end.
#
# A gateway's durable session exists at the broker; a command is published
# retained, QoS 1, while cmdrelayd is down. cmdrelayd starts, gets the queued
# copy and the retained replay, records both and accepts the command once;
# a restart adds nothing. A consumer that connects only afterwards gets the
# command once. Everything lives in a temporary directory.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

TOPIC=/cf/v1/AAA/012C/012C000003AX/set
CLIENT_ID=gateway-012C000003AX
PAYLOAD='{"cmd":"reboot","seq":1}'

dir=$(mktemp -d /tmp/cmdrelay-demo.XXXXXX)
chmod 755 "$dir"
port=$(/usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mosq_pid=
relay_pid=
cleanup() {
	[[ -n $relay_pid ]] && kill "$relay_pid" 2>/dev/null && wait "$relay_pid" 2>/dev/null
	[[ -n $mosq_pid ]] && kill "$mosq_pid" 2>/dev/null && wait "$mosq_pid" 2>/dev/null
	rm -rf "$dir"
}
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

wait_rows() {	# wait until the history has at least $1 rows
	for _ in $(seq 100); do
		n=$(sqlite3 "$dir/history.db" 'SELECT count(*) FROM messages' 2>/dev/null || echo 0)
		[[ $n -ge $1 ]] && return 0
		sleep 0.1
	done
	echo "demo: timed out waiting for $1 history rows" >&2
	return 1
}

start_relay() {
	build/cmdrelayd -c "$dir/cmdrelay.yaml" 2>>"$dir/cmdrelayd.log" &
	relay_pid=$!
	sleep 1
}

stop_relay() {
	kill "$relay_pid"
	wait "$relay_pid"
	relay_pid=
}

step "Mosquitto on 127.0.0.1:$port"
cat >"$dir/mosquitto.conf" <<CONF
listener $port 127.0.0.1
allow_anonymous true
CONF
mosquitto -c "$dir/mosquitto.conf" >"$dir/mosquitto.log" 2>&1 &
mosq_pid=$!
for _ in $(seq 50); do mosquitto_pub -p "$port" -t /demo/ping -n 2>/dev/null && break; sleep 0.1; done

# MQTT 3.1.1, where the broker replays the retained copy at SUBSCRIBE: the
# seed scenario. The default (auto) speaks MQTT 5 to Mosquitto and asks it not
# to (Retain Handling 1), so there the history would hold one row only.
sed -e "s|^  port: .*|  port: $port|" \
    -e "s|^  protocol: .*|  protocol: mqttv311|" \
    -e "s|/var/lib/cmdrelay/history.db|$dir/history.db|" \
    -e "s|/run/cmdrelay/cmdrelay.sock|$dir/cmdrelay.sock|" \
    conf/cmdrelay.yaml >"$dir/cmdrelay.yaml"
build/cmdrelayd -t -c "$dir/cmdrelay.yaml"

step "The gateway's durable session exists at the broker (client id $CLIENT_ID)"
mosquitto_sub -p "$port" -i "$CLIENT_ID" -c -q 1 -t "$TOPIC" -E

step "cmdrelayd is down; a command is published retain=1, qos=1"
mosquitto_pub -p "$port" -t "$TOPIC" -q 1 -r -m "$PAYLOAD"
echo "published $PAYLOAD to $TOPIC"

step "cmdrelayd starts (MQTT 3.1.1): the broker sends the queued copy, then the retained replay"
start_relay
wait_rows 2
stop_relay

step "cmdrelayd restarts: the session is kept, so nothing is sent again"
start_relay
sleep 1
stop_relay

step "A consumer that starts only now still gets the command, once"
start_relay
build/cmdrelayctl -c "$dir/cmdrelay.yaml" tail --consumer demo-app --json >"$dir/consumer1.out" 2>/dev/null &
tail_pid=$!
sleep 1
kill "$tail_pid"; wait "$tail_pid" 2>/dev/null || true
sed 's/^/  /' "$dir/consumer1.out"
echo "  (the same consumer again: nothing old is sent twice)"
build/cmdrelayctl -c "$dir/cmdrelay.yaml" tail --consumer demo-app --json >"$dir/consumer2.out" 2>/dev/null &
tail_pid=$!
sleep 1
kill "$tail_pid"; wait "$tail_pid" 2>/dev/null || true
sed 's/^/  /' "$dir/consumer2.out"
stop_relay

step "cmdrelayd log"
sed 's/^/  /' "$dir/cmdrelayd.log"

step "History (cmdrelayctl history)"
build/cmdrelayctl --db "$dir/history.db" history

accepted=$(sqlite3 "$dir/history.db" "SELECT count(*) FROM messages WHERE status = 'accepted'")
replays=$(sqlite3 "$dir/history.db" "SELECT count(*) FROM messages WHERE reason = 'retained_replay'")
delivered=$(grep -c '"type":"command"' "$dir/consumer1.out" || true)
again=$(grep -c '"type":"command"' "$dir/consumer2.out" || true)
echo
echo "accepted: $accepted, retained replays marked duplicate: $replays,"
echo "delivered to the late consumer: $delivered, delivered again on its reconnect: $again"
[[ $accepted -eq 1 && $replays -ge 1 && $delivered -eq 1 && $again -eq 0 ]]
