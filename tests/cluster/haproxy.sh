#!/usr/bin/env bash
# HAProxy in TCP mode for the cluster tests: one frontend on a loopback port, round robin
# over the given backends, its own config, pid file and log in DIR (nothing system-wide).
#
#   haproxy.sh start DIR PORT BACKEND...   BACKEND is host:port; PORT 0 picks a free one.
#                                          Prints the port. Restarts with the new backends
#                                          when DIR already holds a running HAProxy.
#   haproxy.sh stop DIR                    stops it (nothing to do when it is not running)
#   haproxy.sh port DIR                    prints the port it listens on
#
# HAProxy comes from Debian: apt-get install haproxy (.ci/run installs it).
set -euo pipefail
. "$(dirname "$0")/common.sh"

usage() {
    die "usage: haproxy.sh start DIR PORT BACKEND... | stop DIR | port DIR"
}

start() {
    local dir=$1 port=$2
    shift 2
    [ $# -ge 1 ] || usage
    command -v haproxy >/dev/null ||
        die "haproxy is not installed: apt-get install -y haproxy (Debian package haproxy)"
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    stop_pidfile "$dir/haproxy.pid"

    exec 9>"$PORT_LOCK"
    flock 9
    if [ "$port" = 0 ]; then
        free_port
        port=$FREE_PORT
    fi
    listening "$port" && die "127.0.0.1:$port is already in use"

    # One thread: with several, round robin is kept per thread and connections in a row may
    # skip a backend, which the tests that check the rotation would see. No active health
    # checks: a connection refused by a stopped backend is retried on the next one
    # (redispatch), and the tests see every backend's own errors unfiltered. Long client and
    # server timeouts, so that HAProxy is never the one ending an idle transfer.
    {
        echo "global"
        echo "    maxconn 1024"
        echo "    nbthread 1"
        echo "defaults"
        echo "    mode tcp"
        echo "    timeout connect 5s"
        echo "    timeout client 10m"
        echo "    timeout server 10m"
        echo "    retries 3"
        echo "    option redispatch 1"
        echo "frontend front"
        echo "    bind 127.0.0.1:$port"
        echo "    default_backend back"
        echo "backend back"
        echo "    balance roundrobin"
        local i=0 b
        for b in "$@"; do
            i=$((i + 1))
            echo "    server s$i $b"
        done
    } >"$dir/haproxy.cfg"
    haproxy -c -q -f "$dir/haproxy.cfg" >"$dir/haproxy.log" 2>&1 ||
        die "HAProxy refused $dir/haproxy.cfg: $(cat "$dir/haproxy.log")"
    # fd 9 closed: the daemon would otherwise hold the port lock for as long as it runs.
    haproxy -D -f "$dir/haproxy.cfg" -p "$dir/haproxy.pid" </dev/null >>"$dir/haproxy.log" 2>&1 9>&- ||
        die "HAProxy did not start: $(cat "$dir/haproxy.log")"
    wait_listening "$port" 10 HAProxy "$dir/haproxy.log"
    flock -u 9
    echo "$port" >"$dir/haproxy.port"
    echo "$port"
}

case "${1:-}" in
start)
    [ $# -ge 4 ] || usage
    shift
    start "$@"
    ;;
stop)
    [ $# -eq 2 ] || usage
    stop_pidfile "$2/haproxy.pid"
    ;;
port)
    [ $# -eq 2 ] || usage
    [ -s "$2/haproxy.port" ] && alive "$2/haproxy.pid" || die "no HAProxy running in $2"
    cat "$2/haproxy.port"
    ;;
*) usage ;;
esac
