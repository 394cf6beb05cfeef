#!/usr/bin/env bash
# Install what cmdrelay needs to build and test, from Debian 12's apt.
#
#  - Fast and offline when everything is installed (dpkg-query only, no
#    apt-get update).
#  - Non-interactive; idempotent.
#  - apt must not start the system-wide mosquitto / rabbitmq-server services:
#    the tests run their own private brokers (tests/brokers.py). While
#    installing, a temporary policy-rc.d forbids service starts (when the
#    machine has none already), and afterwards any system-wide mosquitto,
#    RabbitMQ node or epmd that is running anyway is stopped.
#    CMDRELAY_KEEP_SYSTEM_BROKERS=1 skips that last step.
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
)

log() { printf 'install-deps: %s\n' "$*" >&2; }

SUDO=()
if [[ $EUID -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then SUDO=(sudo -n); else
        log "not root and no sudo: cannot install or stop services"; fi
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
        # keep apt's postinst scripts from starting mosquitto / rabbitmq / epmd
        printf '#!/bin/sh\n# temporary, written by cmdrelay install-deps: no service starts\nexit 101\n' |
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

# ---- no system-wide broker left running ---------------------------------------
stop_pids() {   # stop_pids WHAT PID...: TERM, wait up to 20 s, then KILL
    local what=$1; shift
    [[ $# -gt 0 ]] || return 0
    log "stopping system-wide $what (pids $*)"
    "${SUDO[@]}" kill -TERM "$@" 2>/dev/null || true
    for _ in $(seq 1 200); do
        local alive=()
        for p in "$@"; do kill -0 "$p" 2>/dev/null && alive+=("$p"); done
        [[ ${#alive[@]} -eq 0 ]] && return 0
        sleep 0.1
    done
    "${SUDO[@]}" kill -KILL "$@" 2>/dev/null || true
}

if [[ ${CMDRELAY_KEEP_SYSTEM_BROKERS:-0} != 1 ]]; then
    # the packaged mosquitto service: started with the system config
    mapfile -t pids < <(pgrep -f '^/usr/sbin/mosquitto -c /etc/mosquitto/mosquitto.conf' || true)
    stop_pids mosquitto "${pids[@]}"
    # the packaged RabbitMQ node: the one whose HOME is the system one (test nodes have private HOMEs)
    mapfile -t pids < <(pgrep -f 'beam[.]smp .*-home /var/lib/rabbitmq( |$)' || true)
    stop_pids "RabbitMQ node" "${pids[@]}"
    # an epmd on the standard port 4369 (the tests' nodes use private epmd ports)
    pids=()
    for p in $(pgrep -x epmd || true); do
        if ss -Hltnp 'sport = :4369' 2>/dev/null | grep -q "pid=$p,"; then pids+=("$p"); fi
    done
    stop_pids epmd "${pids[@]}"
fi

log "all ${#PACKAGES[@]} packages present"
