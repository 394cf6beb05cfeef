#!/usr/bin/env bash
# Reproduces what `make check-sanitize` and `make valgrind` found in
# cmdrelayctl (not in cmdrelayd): jansson objects still allocated when an
# error path leaves through ctl_die()/ctl_usage() -> exit(). LeakSanitizer
# then aborts the program (SIGABRT, 134 instead of the documented status),
# valgrind reports them as definitely lost. Harmless in production (the
# process is exiting), but they fail the sanitizer and valgrind runs.
# Fixed by f629a78 (tail, publish) and 8e862cc (stats); kept as a regression
# check: every case must print its documented status, and no leak report.
#
#   tests/fuzz/crashes/cmdrelayctl-exit-leaks.sh [BUILD_DIR]   (default build/asan: make SANITIZE=1 all)
#
# Each case prints the exit status; 64 / 1 is right, 134 is the leak.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/../../.."
ctl=${1:-build/asan}/cmdrelayctl
export ASAN_OPTIONS=abort_on_error=1:detect_leaks=1:fast_unwind_on_malloc=0
dir=$(mktemp -d)
trap 'kill $fake 2>/dev/null; rm -rf "$dir"' EXIT

echo "== 1. tail --from bogus: 'hello' of cmd_tail (json_pack) at ctl_die(EX_USAGE)"
"$ctl" --db "$dir/none.db" --socket "$dir/no.sock" tail --from bogus; echo "exit $?"

echo "== 2. stats with no daemon and a file that is not a history: 'reply' and"
echo "      'consumers' of stats_from_history at ctl_die(1) (found by valgrind; ASan"
echo "      sees it only when no stale pointer to them is left on the stack)"
printf 'this is not a database\n' > "$dir/history.db"
"$ctl" --db "$dir/history.db" --socket "$dir/no.sock" stats; echo "exit $?"
if command -v valgrind >/dev/null && [[ -x build/cmdrelayctl ]]; then
    valgrind -q --leak-check=full --show-leak-kinds=definite --errors-for-leak-kinds=definite \
        --error-exitcode=99 build/cmdrelayctl --db "$dir/history.db" --socket "$dir/no.sock" stats
    echo "exit $? (valgrind, build/cmdrelayctl)"
fi

echo "== 3. publish refused by the daemon: 'reply' of cmd_publish at ctl_die(1)"
/usr/bin/python3 - "$dir/fake.sock" <<'PY' &
import socket, sys
s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(1)
c, _ = s.accept(); c.makefile().readline()
c.sendall(b'{"type":"error","code":"not_allowed","message":"publish: a/b is not in uplink.allow"}\n')
c.close()
PY
fake=$!
for _ in $(seq 50); do [[ -S $dir/fake.sock ]] && break; sleep 0.1; done
"$ctl" --db "$dir/none.db" --socket "$dir/fake.sock" publish a/b nope; echo "exit $?"
