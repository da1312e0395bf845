#!/usr/bin/env bash
# A 3-node Garage cluster (S3-compatible object store) on 127.0.0.1 for the tests: replication
# factor 3, each node its own zone, one bucket and one access key with read/write on it.
# Everything lives in DIR (configs, metadata, data, logs, pid files); nothing system-wide.
#
#   garage.sh start DIR [--owner PID]  starts the cluster, or what is not running of it (a
#                                      no-op when all runs), and writes DIR/s3.env. With
#                                      --owner, a watcher stops the cluster and deletes DIR
#                                      when process PID exits (the test fixture passes its own).
#   garage.sh stop DIR                 stops every node (and the watcher)
#   garage.sh stop-node DIR N          stops node N (1..3), to test the 2-of-3 quorum
#   garage.sh start-node DIR N         starts node N again and waits until the cluster is healthy
#   garage.sh env DIR                  prints DIR/s3.env
#
# DIR/s3.env (mode 0600, KEY=value lines a shell can source): XFER_S3_ENDPOINT (node 1),
# XFER_S3_REGION, XFER_S3_BUCKET, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, and per node N
# XFER_GARAGE_N_S3_PORT, XFER_GARAGE_N_RPC_PORT, XFER_GARAGE_N_PID.
#
# The garage binary (v2) is looked for in $GARAGE_BIN, ~/.cargo/bin/garage, then
# /var/cache/xfer-ci/bin/garage; build it with
#   cargo install garage --locked --version 2.5.0 --root /var/cache/xfer-ci
# (about 11 minutes; .ci/run does this when it is missing).
set -euo pipefail
SCRIPT=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
. "$(dirname "$0")/common.sh"

NODES=3
BUCKET=xfer-test
REGION=garage
# How long a node may take to come up, and the cluster to become healthy, before we fail.
BOOT_SECS=${XFER_GARAGE_BOOT_SECS:-60}

usage() {
    die "usage: garage.sh start DIR [--owner PID] | stop DIR | stop-node DIR N | start-node DIR N | env DIR"
}

find_garage() {
    local c
    for c in "${GARAGE_BIN:-}" "${CARGO_HOME:-$HOME/.cargo}/bin/garage" /var/cache/xfer-ci/bin/garage; do
        if [ -n "$c" ] && [ -x "$c" ]; then
            GARAGE=$c
            case "$("$GARAGE" --version 2>/dev/null)" in
            *" v2."* | *":2."*) return 0 ;; # "garage v2.x" (release), "garage cargo:2.x" (cargo install)
            *) die "$GARAGE is not garage v2 ($("$GARAGE" --version 2>&1 | head -n 1)); set GARAGE_BIN to a v2 binary" ;;
            esac
        fi
    done
    die "the garage binary was not found (looked in \$GARAGE_BIN, ${CARGO_HOME:-$HOME/.cargo}/bin/garage and /var/cache/xfer-ci/bin/garage). Build it (about 11 minutes) with:
    cargo install garage --locked --version 2.5.0 --root /var/cache/xfer-ci
or set GARAGE_BIN to a garage v2 binary. .ci/run builds it when it is missing."
}

hex() {
    od -An -tx1 -N"$1" /dev/urandom | tr -d ' \n'
}

# Runs the garage CLI against node $1 (it reads the RPC secret from that node's config).
g() {
    local n=$1
    shift
    "$GARAGE" -c "$DIR/node$n/garage.toml" "$@"
}

# Lets the CLI fail with its own message, prefixed by what we were doing.
g_or_die() {
    local what=$1 out
    shift
    out=$(g "$@" 2>&1) || die "$what failed: $out"
    printf '%s\n' "$out"
}

port_of() {
    cat "$DIR/node$1/$2_port"
}

# Writes each node's config once; later starts reuse it (same ports, same secret, same data).
configure() {
    local secret n rpc s3
    secret=$(hex 32)
    TAKEN=""
    for n in $(seq 1 $NODES); do
        free_port
        rpc=$FREE_PORT
        free_port
        s3=$FREE_PORT
        mkdir -p "$DIR/node$n/meta" "$DIR/node$n/data"
        echo "$rpc" >"$DIR/node$n/rpc_port"
        echo "$s3" >"$DIR/node$n/s3_port"
        (
            umask 077
            cat >"$DIR/node$n/garage.toml" <<CONF
# Node $n of the xfer test cluster (written by tests/cluster/garage.sh).
metadata_dir = "$DIR/node$n/meta"
data_dir = "$DIR/node$n/data"
# sqlite: no memory map to size, and enough for a test cluster.
db_engine = "sqlite"
replication_factor = $NODES
consistency_mode = "consistent"

rpc_bind_addr = "127.0.0.1:$rpc"
rpc_public_addr = "127.0.0.1:$rpc"
rpc_secret = "$secret"

[s3_api]
api_bind_addr = "127.0.0.1:$s3"
s3_region = "$REGION"
CONF
        )
    done
    (
        umask 077
        printf 'KEY_ID=GK%s\nKEY_SECRET=%s\n' "$(hex 12)" "$(hex 32)" >"$DIR/key"
    )
}

start_node_process() {
    local n=$1 p
    alive "$DIR/node$n/pid" && return 0
    for p in "$(port_of "$n" rpc)" "$(port_of "$n" s3)"; do
        listening "$p" && die "node $n's port 127.0.0.1:$p is taken by another process; stop it or start a new cluster in another DIR"
    done
    # setsid: a Ctrl-C in the terminal of the test run does not reach the nodes; they are
    # stopped by this script (the owner watcher or `stop`). The lock fds are closed, or the
    # node would hold the locks for as long as it runs.
    NO_COLOR=1 RUST_LOG=${XFER_GARAGE_LOG:-garage=info} setsid "$GARAGE" -c "$DIR/node$n/garage.toml" server \
        </dev/null >>"$DIR/node$n/garage.log" 2>&1 8>&- 9>&- &
    echo $! >"$DIR/node$n/pid"
}

wait_node_listening() {
    local n=$1
    wait_listening "$(port_of "$n" rpc)" "$BOOT_SECS" "garage node $n (RPC)" "$DIR/node$n/garage.log"
    wait_listening "$(port_of "$n" s3)" "$BOOT_SECS" "garage node $n (S3)" "$DIR/node$n/garage.log"
}

# Fills NODE_ID[n] (`<hex id>@127.0.0.1:<rpc port>`) for every running node.
read_node_ids() {
    local n out
    NODE_ID=()
    for n in $(seq 1 $NODES); do
        alive "$DIR/node$n/pid" || continue
        out=$(g_or_die "reading node $n's id" "$n" node id -q) || exit 1
        NODE_ID[n]=${out##*$'\n'}
    done
}

# Each node dials the others: the first time this is what joins them; after a restart it
# saves waiting for the peer list's own reconnection.
connect_all() {
    local n m
    read_node_ids
    for n in "${!NODE_ID[@]}"; do
        for m in "${!NODE_ID[@]}"; do
            [ "$n" = "$m" ] && continue
            g_or_die "connecting node $n to node $m" "$n" node connect "${NODE_ID[m]}" >/dev/null || exit 1
        done
    done
}

assign_layout() {
    local layout version n
    layout=$(g_or_die "reading the layout" 1 json-api GetClusterLayout) || exit 1
    version=$(sed -n 's/^  "version": \([0-9]*\),*$/\1/p' <<<"$layout")
    [ -n "$version" ] || die "no layout version in: $layout"
    [ "$version" = 0 ] || return 0
    for n in $(seq 1 $NODES); do
        g_or_die "assigning node $n a role" 1 layout assign -z "zone$n" -c 1G "${NODE_ID[n]%@*}" >/dev/null || exit 1
    done
    g_or_die "applying the layout" 1 layout apply --version 1 >/dev/null || exit 1
}

# Waits until every running node sees every running node up (with all three running, that is
# Garage's HEALTHY: all partitions fully replicated) and, with two or more, every partition
# has its quorum.
wait_healthy() {
    local n m i out up=0
    for m in $(seq 1 $NODES); do
        alive "$DIR/node$m/pid" && up=$((up + 1))
    done
    for n in $(seq 1 $NODES); do
        alive "$DIR/node$n/pid" || continue
        i=0
        until out=$(g "$n" health 2>&1) && healthy_enough "$out" "$up"; do
            i=$((i + 1))
            [ $i -le $((BOOT_SECS * 5)) ] || die "the cluster did not become healthy within ${BOOT_SECS}s (node $n says: $out); logs: $DIR/node*/garage.log"
            sleep 0.2
        done
    done
}

# Prints field $1 of `garage health` output $2.
health_field() {
    sed -n "s/^$1:[[:space:]]*//p" <<<"$2"
}

# $1 is `garage health` output, $2 how many nodes run.
healthy_enough() {
    [ "$(health_field 'Storage nodes up' "$1")" = "$2" ] || return 1
    [ "$2" -lt 2 ] ||
        [ "$(health_field 'Partitions with quorum' "$1")" = "$(health_field 'Partitions' "$1")" ] || return 1
    [ "$2" -lt $NODES ] || grep -q '^Cluster health:[[:space:]]*HEALTHY' <<<"$1"
}

create_bucket_and_key() {
    # shellcheck source=/dev/null
    . "$DIR/key"
    if ! g 1 bucket info "$BUCKET" >/dev/null 2>&1; then
        g_or_die "creating bucket $BUCKET" 1 bucket create "$BUCKET" >/dev/null || exit 1
    fi
    if ! g 1 key info "$KEY_ID" >/dev/null 2>&1; then
        # The secret goes through stdin, never argv.
        printf '{"accessKeyId":"%s","secretAccessKey":"%s","name":"xfer-test"}' "$KEY_ID" "$KEY_SECRET" |
            g_or_die "importing the access key" 1 json-api ImportKey - >/dev/null || exit 1
    fi
    g_or_die "allowing the key on $BUCKET" 1 bucket allow --read --write --owner --key "$KEY_ID" "$BUCKET" >/dev/null || exit 1
}

write_env() {
    local n tmp
    # shellcheck source=/dev/null
    . "$DIR/key"
    tmp=$(umask 077 && mktemp "$DIR/s3.env.XXXXXX")
    {
        echo "XFER_S3_ENDPOINT=http://127.0.0.1:$(port_of 1 s3)"
        echo "XFER_S3_REGION=$REGION"
        echo "XFER_S3_BUCKET=$BUCKET"
        echo "AWS_ACCESS_KEY_ID=$KEY_ID"
        echo "AWS_SECRET_ACCESS_KEY=$KEY_SECRET"
        for n in $(seq 1 $NODES); do
            echo "XFER_GARAGE_${n}_S3_PORT=$(port_of "$n" s3)"
            echo "XFER_GARAGE_${n}_RPC_PORT=$(port_of "$n" rpc)"
            echo "XFER_GARAGE_${n}_PID=$(cat "$DIR/node$n/pid" 2>/dev/null || echo 0)"
        done
    } >"$tmp"
    mv "$tmp" "$DIR/s3.env"
}

start_watcher() {
    local owner=$1
    running "$owner" || die "--owner $owner: no such process"
    alive "$DIR/watcher.pid" && return 0
    # tail --pid returns when the owner exits; then the cluster and its folder go with it.
    setsid bash -c 'tail --pid="$1" -f /dev/null; "$2" stop "$3"; rm -rf "$3"' \
        watcher "$owner" "$SCRIPT" "$DIR" </dev/null >/dev/null 2>&1 &
    echo $! >"$DIR/watcher.pid"
}

cmd_start() {
    local owner="" n started
    while [ $# -gt 0 ]; do
        case "$1" in
        --owner)
            [ $# -ge 2 ] || usage
            owner=$2
            shift 2
            ;;
        *) usage ;;
        esac
    done
    # The watcher comes first, so that a start failing half-way still leaves nothing behind
    # once the owner exits.
    [ -z "$owner" ] || start_watcher "$owner"
    find_garage
    started=$(date +%s%N)
    # One start at a time in DIR; the port lock is held until every node listens, so that a
    # concurrent start elsewhere cannot take the ports chosen here.
    exec 8>"$DIR/.lock"
    flock 8
    exec 9>"$PORT_LOCK"
    flock 9
    [ -s "$DIR/node1/garage.toml" ] || configure
    for n in $(seq 1 $NODES); do
        start_node_process "$n"
    done
    for n in $(seq 1 $NODES); do
        wait_node_listening "$n"
    done
    flock -u 9
    connect_all
    assign_layout
    wait_healthy
    create_bucket_and_key
    write_env
    local ms=$((($(date +%s%N) - started) / 1000000))
    echo "garage cluster up in $((ms / 1000)).$(printf '%03d' $((ms % 1000)))s: $DIR/s3.env" >&2
}

cmd_stop() {
    local n
    # The watcher itself calls stop: do not let it kill itself before it has cleaned up.
    if [ -s "$DIR/watcher.pid" ] && [ "$(cat "$DIR/watcher.pid")" != "$PPID" ]; then
        stop_pidfile "$DIR/watcher.pid"
    fi
    for n in $(seq 1 $NODES); do
        stop_pidfile "$DIR/node$n/pid"
    done
}

node_arg() {
    case "$1" in
    [1-9]) [ "$1" -le $NODES ] || die "node $1: the cluster has nodes 1..$NODES" ;;
    *) die "node must be 1..$NODES, not '$1'" ;;
    esac
}

[ $# -ge 2 ] || usage
CMD=$1
DIR=$2
shift 2
[ "$CMD" = start ] && mkdir -p "$DIR"
# Stopping what is already gone (the owner watcher removes DIR) is not an error.
[ "$CMD" = stop ] && [ ! -d "$DIR" ] && exit 0
[ -d "$DIR" ] || die "no cluster folder $DIR"
DIR=$(cd "$DIR" && pwd)
case "$CMD" in
start) cmd_start "$@" ;;
stop)
    [ $# -eq 0 ] || usage
    cmd_stop
    ;;
stop-node)
    [ $# -eq 1 ] || usage
    node_arg "$1"
    stop_pidfile "$DIR/node$1/pid"
    write_env
    ;;
start-node)
    [ $# -eq 1 ] || usage
    node_arg "$1"
    find_garage
    [ -s "$DIR/node$1/garage.toml" ] || die "no cluster in $DIR: run garage.sh start $DIR first"
    exec 9>"$PORT_LOCK"
    flock 9
    start_node_process "$1"
    wait_node_listening "$1"
    flock -u 9
    connect_all
    wait_healthy
    write_env
    ;;
env)
    [ $# -eq 0 ] || usage
    [ -s "$DIR/s3.env" ] || die "no $DIR/s3.env: run garage.sh start $DIR first"
    cat "$DIR/s3.env"
    ;;
*) usage ;;
esac
