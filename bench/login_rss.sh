#!/usr/bin/env bash
# Daemon memory and login latency under password logins: the resident size (VmRSS, VmHWM) of a
# real `xferd serve` before, during and after
#   (a) 120 concurrent password logins, each then holding an upload open,
#   (b) 300 failed logins for a user that does not exist (100 source addresses x 3),
#   (c) 1,000 sequential logins (median login latency),
# each on a fresh daemon with max_concurrent_logins = 2, from 127.0.x.y source addresses.
#
#   bench/login_rss.sh [OTHER_XFERD...]
#
# Measures this tree's release build, then each OTHER_XFERD binary with the same script (for
# the old code: `git worktree add /tmp/old REV && (cd /tmp/old && cargo build --release)`, then
# pass /tmp/old/target/release/xferd). Prints the FIGURES lines of daemon/tests/login_rss.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin xferd
cargo test --release --quiet -p xferd --test login_rss --no-run
for bin in "$PWD/target/release/xferd" "$@"; do
  XFERD_BIN=$(realpath "$bin") cargo test --release --quiet -p xferd --test login_rss -- \
    --ignored --nocapture login_rss_figures 2>&1 | grep '^FIGURES'
done
