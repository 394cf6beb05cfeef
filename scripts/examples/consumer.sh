#!/bin/sh
# A named cmdrelay consumer in shell: cmdrelayctl tail --exec runs the handler
# once per command, in order, with the command's JSON on stdin, and acks it
# only when the handler exits 0. It reconnects by itself when the relay
# restarts; a failing handler stops it (exit 1) without acking that command,
# so run it with Restart=on-failure. Usage: consumer.sh [SOCKET [NAME [FILTER]]]
exec "${CMDRELAYCTL:-cmdrelayctl}" --socket "${1:-/run/cmdrelay/cmdrelay.sock}" \
    tail --consumer "${2:-lamp}" --filter "${3:-#}" \
    --exec 'read -r cmd; echo "$CMDRELAY_ID $cmd"'   # act on it here, e.g. with jq
