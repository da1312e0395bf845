#!/usr/bin/env bash
# Upload and download benchmark over loopback: builds release binaries, starts a daemon in a
# temp folder, moves one file each way and prints MB/s (1 MB = 10^6 bytes).
#
#   bench/transfer.sh [SIZE_MIB] [ROUNDS]      (defaults: 512 MiB, 3 rounds; best and median shown)
#
# Storage is a temp folder on the same disk as $TMPDIR; put TMPDIR on tmpfs to take the disk
# out of the measurement.
set -euo pipefail
SIZE_MIB=${1:-512}
ROUNDS=${2:-3}
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin xferd --bin xfer
BIN=$PWD/target/release
WORK=$(mktemp -d)
trap 'kill $DAEMON 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"' EXIT

"$BIN/xferd" --config "$WORK/etc/xferd.toml" init --listen 127.0.0.1:0 >/dev/null
echo bench-pw | "$BIN/xferd" --config "$WORK/etc/xferd.toml" user add bench --password-stdin >/dev/null
XFERD_LOG=warn,xferd::server=info "$BIN/xferd" --config "$WORK/etc/xferd.toml" serve 2>"$WORK/daemon.log" &
DAEMON=$!
for _ in $(seq 100); do grep -q 'listen=' "$WORK/daemon.log" && break; sleep 0.05; done
ADDR=$(grep -o 'listen=[^ ]*' "$WORK/daemon.log" | head -1 | cut -d= -f2)
FP=$("$BIN/xferd" --config "$WORK/etc/xferd.toml" fingerprint)
export XFER_CONFIG_DIR="$WORK/client"
echo bench-pw | "$BIN/xfer" -q login "bench@$ADDR" --fingerprint "$FP" --password-stdin

head -c "$((SIZE_MIB * 1024 * 1024))" /dev/urandom > "$WORK/payload"
mkdir "$WORK/down"
BYTES=$((SIZE_MIB * 1024 * 1024))

rate() { python3 -c "import sys; print(f'{$BYTES/float(sys.argv[1])/1e6:.0f}')" "$1"; }
now() { date +%s.%N; }
summary() { python3 -c "
import sys, statistics
r = sorted(float(x) for x in sys.argv[1:])
print(f'best {r[-1]:.0f} MB/s, median {statistics.median(r):.0f} MB/s over {len(r)} rounds')" "$@"; }

UP=(); DOWN=()
for i in $(seq "$ROUNDS"); do
  t0=$(now); "$BIN/xfer" -q upload "$WORK/payload"; t1=$(now)
  UP+=("$(rate "$(python3 -c "print($t1-$t0)")")")
  rm -f "$WORK/down/payload"
  t0=$(now); "$BIN/xfer" -q download payload --to "$WORK/down"; t1=$(now)
  DOWN+=("$(rate "$(python3 -c "print($t1-$t0)")")")
  cmp -s "$WORK/payload" "$WORK/down/payload" || { echo "downloaded file differs!" >&2; exit 1; }
done
echo "file: ${SIZE_MIB} MiB, loopback, TLS 1.3 (ring, AES-GCM), BLAKE3 verified, fsync on commit"
echo "upload:   $(summary "${UP[@]}")   (rounds: ${UP[*]})"
echo "download: $(summary "${DOWN[@]}")   (rounds: ${DOWN[*]})"
"$BIN/xfer" -q shutdown --password-stdin <<<"bench-pw" 2>/dev/null || kill "$DAEMON"
