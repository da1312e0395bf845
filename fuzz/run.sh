#!/usr/bin/env bash
# Builds and runs every fuzz target for SECONDS each (default 60), then prints what each run
# did. Needs only a Rust toolchain (stable is fine: see RUSTC_BOOTSTRAP below) and a C++
# compiler for libFuzzer; installs cargo-fuzz when it is missing.
#
#   fuzz/run.sh [SECONDS] [TARGET...]      e.g. fuzz/run.sh 30, fuzz/run.sh 600 session
#
# The corpus grows in fuzz/corpus/TARGET (not in git; seeds in fuzz/seeds/TARGET are read
# too). A crash is saved in fuzz/artifacts/TARGET/ and makes this script exit 1; reproduce it
# with `cargo fuzz run TARGET fuzz/artifacts/TARGET/crash-...` (same environment).
set -euo pipefail
cd "$(dirname "$0")"

seconds="${1:-60}"
shift || true
if ! [[ "$seconds" =~ ^[0-9]+$ ]] || [ "$seconds" -lt 1 ]; then
    echo "usage: fuzz/run.sh [SECONDS] [TARGET...]" >&2
    exit 2
fi

# cargo fuzz passes nightly-only flags (-Zsanitizer=address, -Cpasses=sancov-module, ...).
# RUSTC_BOOTSTRAP=1 lets a stable toolchain accept them; harmless on nightly.
export RUSTC_BOOTSTRAP=1
export CARGO_TERM_COLOR=never

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz (cargo install cargo-fuzz --locked)"
    cargo install cargo-fuzz --locked
fi
cargo --version
cargo fuzz --version

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

start=$SECONDS
for target in "${targets[@]}"; do
    echo "== building $target"
    cargo fuzz build "$target"
done
echo "== build: $((SECONDS - start)) s"

status=0
summary=()
for target in "${targets[@]}"; do
    mkdir -p "corpus/$target" "artifacts/$target"
    corpora=("corpus/$target")
    [ -d "seeds/$target" ] && corpora+=("seeds/$target")
    log="artifacts/$target/last-run.log"
    echo "== fuzzing $target for $seconds s (log: fuzz/$log)"
    t0=$SECONDS
    # -timeout: one input running longer than this is reported as a hang (the session target
    # has its own 30 s deadline per input); -rss_limit_mb: libFuzzer's default, made explicit.
    if cargo fuzz run "$target" "${corpora[@]}" -- \
        -max_total_time="$seconds" -timeout=60 -rss_limit_mb=2048 \
        -print_final_stats=1 >"$log" 2>&1; then
        result="ok"
    else
        result="FAILED (exit $?)"
        status=1
        # What libFuzzer said about the failure: the panic, the input and where it was saved.
        grep -v -E '^#[0-9]+[[:space:]]+(NEW|REDUCE|pulse)|^[[:space:]]+NEW_FUNC' "$log" | tail -n 60
    fi
    elapsed=$((SECONDS - t0))
    done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -n 1 || true)
    runs=$(grep -E '^Done [0-9]+ runs in' "$log" | tail -n 1 || true)
    stats=$(grep -E '^stat::(number_of_executed_units|average_exec_per_sec|new_units_added|slowest_unit_time_sec|peak_rss_mb)' "$log" | tr '\n' ' ' || true)
    echo "$target: $result"
    echo "  ${done_line:-no DONE line (see the log)}"
    echo "  ${runs:-}"
    echo "  $stats"
    summary+=("$target: $result, ${elapsed} s; ${done_line:-no DONE line}")
done

echo "== summary (build and runs: $((SECONDS - start)) s)"
printf '%s\n' "${summary[@]}"
exit "$status"
