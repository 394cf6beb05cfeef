#!/usr/bin/env bash
# Builds the Debian package (make deb, lintian included), installs it with
# dpkg -i on this machine, checks what an operator first runs, then removes
# and purges it. Called by .ci/run; prints how long it took.
#
# It starts no service: the units are installed disabled, deb-systemd-invoke
# starts no disabled unit, and when systemd runs this machine a temporary
# policy-rc.d (only if there is none) forbids cmdrelayd starts outright.
# It refuses to run where cmdrelay is installed or has left state, rather
# than remove an operator's history on purge.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
start=$SECONDS
log() { printf 'package-check: %s\n' "$*" >&2; }
fail() { log "FAIL: $*"; exit 1; }

if dpkg-query -W -f='${db:Status-Abbrev}' cmdrelay 2>/dev/null | grep -q '^[ih]'; then
    fail "the package cmdrelay is installed already; not touching it"
fi
for d in /etc/cmdrelay /var/lib/cmdrelay; do
    [[ ! -e $d ]] || fail "$d exists (an earlier install?); purging would remove it"
done

POLICY=/usr/sbin/policy-rc.d
created_policy=0
cleanup() {
    if dpkg-query -W -f='${db:Status-Abbrev}' cmdrelay 2>/dev/null | grep -q '^[ihr]'; then
        dpkg -P cmdrelay >/dev/null 2>&1 || true
    fi
    [[ $created_policy -eq 0 ]] || rm -f "$POLICY"
}
trap cleanup EXIT
if [[ -d /run/systemd/system && ! -e $POLICY ]]; then
    printf '%s\n' '#!/bin/sh' '# temporary, written by cmdrelay package-check' \
        'while [ "${1#-}" != "$1" ]; do shift; done' \
        'case "$1" in cmdrelayd*) exit 101 ;; esac' 'exit 0' >"$POLICY"
    chmod 0755 "$POLICY"
    created_policy=1
fi

make -s deb
deb=$(ls build/deb/cmdrelay_*_amd64.deb build/deb/cmdrelay_*.deb 2>/dev/null | grep -v dbgsym | head -1)
[[ -n $deb ]] || fail "make deb made no .deb"
log "lintian: $(grep -c '^E:' build/deb/lintian.txt || true) errors, $(grep -c '^W:' build/deb/lintian.txt || true) warnings"

dpkg -i "$deb"
version=$(dpkg-query -W -f='${Version}' cmdrelay)
[[ $(/usr/bin/cmdrelayd --version) == *"$version"* ]] || fail "cmdrelayd --version does not say $version"
/usr/bin/cmdrelayctl --help | grep -q '^usage: cmdrelayctl' || fail "cmdrelayctl --help"
MANWIDTH=200 man -P cat cmdrelayd 2>/dev/null | grep -q 'losing none and repeating none' || fail "man cmdrelayd"
man -w cmdrelayctl >/dev/null && man -w 5 cmdrelay.yaml >/dev/null || fail "man pages"
grep -qx /etc/cmdrelay/cmdrelay.yaml /var/lib/dpkg/info/cmdrelay.conffiles || fail "config is no conffile"
getent passwd cmdrelay >/dev/null || fail "postinst made no user cmdrelay"
[[ $(stat -c '%U:%G %a' /etc/cmdrelay/cmdrelay.yaml) == "root:cmdrelay 640" ]] ||
    fail "/etc/cmdrelay/cmdrelay.yaml is $(stat -c '%U:%G %a' /etc/cmdrelay/cmdrelay.yaml)"
/usr/bin/cmdrelayd -t -c /etc/cmdrelay/cmdrelay.yaml || fail "the packaged config does not pass -t"
grep -q '^Documentation=man:cmdrelayd(8)' /lib/systemd/system/cmdrelayd.service || fail "unit Documentation="
[[ -f /usr/lib/sysusers.d/cmdrelay.conf && -f /usr/lib/tmpfiles.d/cmdrelay.conf ]] || fail "sysusers/tmpfiles"
[[ -f /usr/share/bash-completion/completions/cmdrelayctl ]] || fail "bash completion"

dpkg -r cmdrelay
[[ ! -e /usr/bin/cmdrelayd ]] || fail "dpkg -r left /usr/bin/cmdrelayd"
[[ -e /etc/cmdrelay/cmdrelay.yaml ]] || fail "dpkg -r removed the conffile"
dpkg -P cmdrelay
[[ ! -e /etc/cmdrelay/cmdrelay.yaml ]] || fail "dpkg -P left the conffile"
[[ ! -e /var/lib/cmdrelay ]] || fail "dpkg -P left /var/lib/cmdrelay"
rmdir /etc/cmdrelay 2>/dev/null || true
log "OK: built, lintian-clean, installed, checked, removed and purged $deb in $((SECONDS - start)) s"
