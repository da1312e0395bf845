# Shared by garage.sh and haproxy.sh (sourced, not run): loopback port choice and process
# stopping. Ports come from below Linux's ephemeral range (32768 and up), so the ports that
# the other tests bind with 127.0.0.1:0 never collide with them.

die() {
    echo "${0##*/}: $*" >&2
    exit 1
}

# True when something accepts TCP connections on 127.0.0.1:$1.
listening() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Sets FREE_PORT to a port in 20000..32767 that nothing listens on and that no earlier call
# chose (they are kept in TAKEN; a variable, so do not call this in a $(...) subshell). The
# caller holds $PORT_LOCK until its process listens, so two scripts starting at once cannot
# pick the same port.
free_port() {
    local p tries=0
    while [ $tries -lt 200 ]; do
        p=$((20000 + RANDOM % 12768))
        tries=$((tries + 1))
        case " ${TAKEN:-} " in *" $p "*) continue ;; esac
        listening "$p" && continue
        TAKEN="${TAKEN:-} $p"
        FREE_PORT=$p
        return 0
    done
    die "no free loopback port found in 20000..32767"
}

PORT_LOCK="${TMPDIR:-/tmp}/xfer-cluster-ports.lock"

# Waits until 127.0.0.1:$1 accepts connections or $2 seconds pass; $3 names the process
# and $4 is its log, shown when it never comes up.
wait_listening() {
    local port=$1 secs=$2 what=$3 log=$4 i=0
    while ! listening "$port"; do
        i=$((i + 1))
        if [ $i -gt $((secs * 10)) ]; then
            echo "${0##*/}: $what did not listen on 127.0.0.1:$port within ${secs}s; its log ($log):" >&2
            tail -n 30 "$log" >&2 2>/dev/null || true
            exit 1
        fi
        sleep 0.1
    done
}

# True when process $1 runs (a zombie does not count: PID 1 here may never reap it).
running() {
    local stat
    stat=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null) || return 1
    [ -n "$stat" ] && [ "${stat%% *}" != Z ]
}

# True when the pid in file $1 is a running process.
alive() {
    [ -s "$1" ] && running "$(cat "$1")"
}

# Stops the process whose pid is in file $1: TERM, then KILL after 10 s. Removes the file.
stop_pidfile() {
    local f=$1 pid i=0
    [ -s "$f" ] || { rm -f "$f"; return 0; }
    pid=$(cat "$f")
    if running "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        while running "$pid"; do
            i=$((i + 1))
            if [ $i -gt 100 ]; then
                kill -KILL "$pid" 2>/dev/null || true
                break
            fi
            sleep 0.1
        done
    fi
    rm -f "$f"
}
