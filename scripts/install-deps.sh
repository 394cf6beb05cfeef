#!/usr/bin/env bash
# Install what cmdrelay needs to build and test, from Debian 12's apt.
#
#  - Fast and offline when everything is installed (dpkg-query only, no
#    apt-get update).
#  - Non-interactive; idempotent.
#  - System services are never stopped, restarted or reconfigured: a
#    gateway's own Mosquitto (a bridge, say), RabbitMQ node or epmd keeps
#    running. The tests and `make demo` start private brokers on free loopback
#    ports, so a system broker on 1883 or an epmd on 4369 is not in their way;
#    this script only says that it saw one.
#  - While installing packages that are missing, a temporary policy-rc.d
#    (only when the machine has none) keeps apt from *starting* the broker
#    services that those packages bring (mosquitto, rabbitmq-server, epmd);
#    every other service is left to apt as usual.
set -euo pipefail

PACKAGES=(
    # build
    build-essential pkg-config xxd
    libmosquitto-dev libsqlite3-dev libyaml-dev libsystemd-dev libjansson-dev libcmocka-dev
    # run and test
    sqlite3 openssl procps iproute2 util-linux socat jq nodejs systemd
    mosquitto mosquitto-clients rabbitmq-server
    python3 python3-pytest python3-paho-mqtt python3-yaml python3-prometheus-client
    # make fuzz (clang 14's libFuzzer and sanitizer runtimes are in libclang-rt-14-dev,
    # only recommended by clang), llvm-symbolizer for sanitizer stacks, make valgrind
    clang libclang-rt-14-dev llvm valgrind
    # make deb and scripts/package-check.sh (man-db for `man cmdrelayd`)
    debhelper dpkg-dev fakeroot lintian man-db
)

log() { printf 'install-deps: %s\n' "$*" >&2; }

SUDO=()
if [[ $EUID -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then SUDO=(sudo -n); else
        log "not root and no sudo: cannot install packages"; fi
fi

not_installed() {   # prints those of the given packages that are not installed
    local installed
    installed=$(dpkg-query -W -f='${db:Status-Abbrev} ${Package}\n' "$@" 2>/dev/null |
                awk '$1 == "ii" { print $2 }' | sed 's/:.*//' || true)
    local p
    for p in "$@"; do
        grep -qxF -- "$p" <<<"$installed" || printf '%s\n' "$p"
    done
}

mapfile -t missing < <(not_installed "${PACKAGES[@]}")

POLICY=/usr/sbin/policy-rc.d
created_policy=0
cleanup() {
    if [[ $created_policy -eq 1 ]] && grep -q 'cmdrelay install-deps' "$POLICY" 2>/dev/null; then
        "${SUDO[@]}" rm -f "$POLICY"
    fi
}
trap cleanup EXIT

if [[ ${#missing[@]} -gt 0 ]]; then
    log "installing: ${missing[*]}"
    if [[ ! -e $POLICY ]]; then
        # policy-rc.d(8) gets the service name first (options may precede it):
        # 101 = "action forbidden" for the brokers, 0 = allowed for the rest
        printf '%s\n' '#!/bin/sh' \
            '# temporary, written by cmdrelay install-deps: new brokers stay stopped' \
            'while [ "${1#-}" != "$1" ]; do shift; done' \
            'case "$1" in mosquitto|rabbitmq-server|epmd|epmd.socket|epmd.service) exit 101 ;; esac' \
            'exit 0' |
            "${SUDO[@]}" tee "$POLICY" >/dev/null
        "${SUDO[@]}" chmod 0755 "$POLICY"
        created_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    APT_OPTS=(-y -q -o DPkg::Lock::Timeout=300
              -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=300 update ||
        { sleep 5; "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -q update; }
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install "${APT_OPTS[@]}" \
        --no-install-recommends "${missing[@]}"
    mapfile -t still < <(not_installed "${missing[@]}")
    if [[ ${#still[@]} -gt 0 ]]; then
        log "still not installed: ${still[*]}"
        exit 1
    fi
    cleanup
    created_policy=0
fi

# ---- system brokers: seen, never touched -----------------------------------
# Only a note: the tests' brokers listen on free ports of their own.
note_running() {   # note_running WHAT PGREP-PATTERN
    local pids
    pids=$(pgrep -f "$2" | tr '\n' ' ' || true)
    [[ -z $pids ]] || log "leaving the system $1 running (pids ${pids% }): tests and make demo use private brokers on free ports"
}
note_running mosquitto '^/usr/sbin/mosquitto -c /etc/mosquitto/'
note_running "RabbitMQ node" 'beam[.]smp .*-home /var/lib/rabbitmq( |$)'
note_running epmd '^/usr/bin/epmd( -daemon)?( -systemd)?$'

log "all ${#PACKAGES[@]} packages present"
