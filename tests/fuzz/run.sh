#!/usr/bin/env bash
# Runs libFuzzer targets for a set time each: tests/fuzz/run.sh SECONDS BUILD_DIR TARGET...
#
# Each target BUILD_DIR/fuzz_TARGET starts from the kept corpus
# tests/fuzz/corpus/TARGET (read only) plus a scratch corpus in
# BUILD_DIR/corpus/TARGET (emptied first: what a run finds is not kept).
# A crash, leak, timeout or sanitizer report makes libFuzzer write the input
# to BUILD_DIR/artifacts/TARGET/ and exit non-zero; this script then goes on
# with the other targets and exits 1 at the end. Reproduce with
#   BUILD_DIR/fuzz_TARGET FILE
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

seconds=$1 build=$2; shift 2
case $build in /*) ;; *) build=$(realpath -m "../../$build") ;; esac
failed=()
for t in "$@"; do
    exe=$build/fuzz_$t scratch=$build/corpus/$t artifacts=$build/artifacts/$t
    rm -rf "$scratch" && mkdir -p "$scratch" "$artifacts" || exit 1
    dict=()
    [[ -f $t.dict ]] && dict=(-dict="$t.dict")
    echo "== fuzz $t: ${seconds}s, seed corpus corpus/$t ($(ls corpus/$t | wc -l) inputs)"
    start=$SECONDS
    # stdin from /dev/null: a fuzzed config may name /dev/stdin as password_file
    "$exe" -max_total_time="$seconds" -timeout=25 -rss_limit_mb=2048 -print_final_stats=1 \
        "${dict[@]}" -artifact_prefix="$artifacts/" "$scratch" "corpus/$t" \
        </dev/null >"$build/$t.log" 2>&1
    rc=$?
    grep -E '^(#[0-9]+[[:space:]]+(INITED|DONE)|stat::number_of_executed_units|stat::peak_rss_mb|==[0-9]+==ERROR|SUMMARY|Done [0-9]+ runs)' \
        "$build/$t.log" || true
    if [[ $rc -ne 0 ]]; then
        echo "!! fuzz $t: exit $rc after $((SECONDS - start))s; log $build/$t.log; inputs in $artifacts/:" >&2
        tail -n 60 "$build/$t.log" >&2
        ls -l "$artifacts" >&2
        failed+=("$t")
    else
        echo "== fuzz $t: no crash in $((SECONDS - start))s, $(ls "$scratch" | wc -l) new corpus inputs (not kept)"
    fi
done
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "fuzz: FAILED: ${failed[*]}" >&2
fi
# a closing line that CI reads as a test count: one "test" per target
echo "fuzz: $(($# - ${#failed[@]})) passed, ${#failed[@]} failed"
[[ ${#failed[@]} -eq 0 ]]
