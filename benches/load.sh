#!/usr/bin/env bash
# Load test: the relay against nginx as a reverse proxy, in one interleaved run on loopback.
#
#   benches/load.sh [--duration 10] [--rounds 3] [--no-queue] [--no-pg] [--board] [--no-install] [--no-build] [--keep]
#
# Run from the repository root. What it does (BENCHMARKS.md has the method and the results):
#   - installs nginx and wrk with apt-get when missing, builds the relay and the stand-in Motion
#     (examples/bench_motion.rs) in release mode;
#   - in a temporary directory: a self-signed ECDSA P-256 certificate for nginx's TLS listener,
#     benches/load/nginx.conf with free ports filled in, a relay config per mode;
#   - starts the stand-in Motion, nginx and the relay (RUST_LOG=warn), all on 127.0.0.1;
#   - warms each target up for 3 s, then runs ROUNDS rounds interleaving the targets with
#     `wrk -t2 -c64 -dDURATION --latency -s post.lua URL` and keeps the medians:
#       (a) wrk -> Motion                      the ceiling
#       (b) wrk -> nginx (HTTP) -> Motion      the baseline
#       (c) wrk -> relay, direct mode -> Motion
#       (c2) (c) with the requests of (d) (post-unique.lua): wrk's own cost of building distinct
#           bodies, on the machine it shares, is then the same on both sides of "queue / direct";
#       (d) wrk -> relay, queue mode ~> Motion (distinct bodies: post-unique.lua); only when the
#           relay accepts `mode = "queue"` (see target_relay_queue below), skip with --no-queue;
#       (f), (g) with --board: (c) and (d) again, each relay with one realtime-board client
#           connected for the whole run (`curl -N .../board/events`): what the board costs;
#       (h), (i) queue mode on PostgreSQL ([storage] backend = "postgres"), one relay and two
#           relays on one database (wrk's two threads split over the two relays: post-unique.lua
#           with RELAY_ADDRS); a throwaway PostgreSQL (Debian's /usr/lib/postgresql/*/bin) on
#           127.0.0.1 in the temporary directory, synchronous_commit on, fsync on; skipped loudly
#           when PostgreSQL is missing (--no-pg skips them quietly);
#       (e) wrk -> bare hyper proxy -> Motion  the floor of the relay's HTTP stack
#           (examples/bench_bare_proxy.rs: tokio + hyper + hyper-util's client, served per core
#           like the relay, with no checks, routing or headers): what the stack alone costs;
#   - samples the CPU time (utime+stime from /proc) of Motion, nginx and the relay around each
#     run and reports microseconds of CPU per request, and the proxy's context switches per
#     request (how often its threads hand work on or wait: a count that the machine's noise
#     barely moves, unlike req/s);
#   - prints a markdown table, flags wrk errors and non-2xx answers (a non-2xx from the relay
#     is a failure: exit status 1).
# Every process it starts runs under `timeout`, so none outlives the expected run time even if
# this script is killed with SIGKILL; on a normal exit or Ctrl-C they are stopped at once.
set -euo pipefail

DURATION=10
ROUNDS=3
WARMUP=3
THREADS=2
CONNECTIONS=64
WITH_QUEUE=auto
WITH_BOARD=0
WITH_PG=1
INSTALL=1
BUILD=1
KEEP=0

usage() { sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --duration) DURATION="$2"; shift 2 ;;
        --rounds) ROUNDS="$2"; shift 2 ;;
        --warmup) WARMUP="$2"; shift 2 ;;
        --connections) CONNECTIONS="$2"; shift 2 ;;
        --threads) THREADS="$2"; shift 2 ;;
        --no-queue) WITH_QUEUE=0; shift ;;
        --board) WITH_BOARD=1; shift ;;
        --no-pg) WITH_PG=0; shift ;;
        --queue) WITH_QUEUE=1; shift ;;
        --no-install) INSTALL=0; shift ;;
        --no-build) BUILD=0; shift ;;
        --keep) KEEP=1; shift ;;
        -h|--help) usage 0 ;;
        *) echo "unknown argument: $1" >&2; usage ;;
    esac
done
[[ "$DURATION" =~ ^[0-9]+$ && "$ROUNDS" =~ ^[1-9][0-9]*$ && "$WARMUP" =~ ^[0-9]+$ ]] || usage

[[ -f Cargo.toml && -d benches/load ]] || { echo "run from the repository root: benches/load.sh" >&2; exit 2; }
ROOT=$(pwd)
HERE="$ROOT/benches/load"
log() { printf '[load] %s\n' "$*" >&2; }
die() { printf '[load] ERROR: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------------------------------------
# Tools and build
# ---------------------------------------------------------------------------------------------
if [[ $INSTALL == 1 ]] && ! { command -v nginx && command -v wrk; } >/dev/null 2>&1; then
    SUDO=""; [[ $(id -u) == 0 ]] || SUDO="sudo"
    log "installing nginx and wrk with apt-get"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq nginx wrk >/dev/null
fi
# Debian puts nginx in /usr/sbin, not always on a user's PATH.
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
[[ -x $NGINX ]] || die "nginx not found (apt-get install nginx)"
command -v wrk >/dev/null || die "wrk not found (apt-get install wrk)"
command -v openssl >/dev/null || die "openssl not found"

if [[ $BUILD == 1 ]]; then
    log "cargo build --release --bin whatsapp-relay --example bench_motion --example bench_bare_proxy"
    cargo build --release --bin whatsapp-relay --example bench_motion --example bench_bare_proxy
fi
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps 2>/dev/null |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
TARGET_DIR=${TARGET_DIR:-$ROOT/target}
# RELAY_BIN=PATH measures another build of the relay (an earlier version, for a before/after).
RELAY_BIN=${RELAY_BIN:-"$TARGET_DIR/release/whatsapp-relay"}
MOTION_BIN="$TARGET_DIR/release/examples/bench_motion"
BARE_BIN="$TARGET_DIR/release/examples/bench_bare_proxy"
[[ -x $RELAY_BIN && -x $MOTION_BIN && -x $BARE_BIN ]] || die "binaries missing in $TARGET_DIR/release (drop --no-build)"

# ---------------------------------------------------------------------------------------------
# Processes: each one under `timeout` (its own process group), stopped by the EXIT trap
# ---------------------------------------------------------------------------------------------
TMP=$(mktemp -d "${TMPDIR:-/tmp}/relay-load.XXXXXX")
chmod 755 "$TMP"               # nginx workers run as nobody when started by root
PGIDS=()                       # process groups to stop (timeout makes itself a group leader)
WRK_PID=""                     # the wrk run in progress
N_TARGETS=7
PG_PID=""                      # the throwaway PostgreSQL of targets (h), (i)
# Budget: warm-ups, rounds (with up to 30 s of queue drain each), start-up and slack.
BUDGET=$(( N_TARGETS * (WARMUP + ROUNDS * (DURATION + 35)) + 120 ))

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    local g
    [[ -n ${WRK_PID:-} ]] && kill "$WRK_PID" 2>/dev/null
    for g in "${PGIDS[@]}"; do kill -TERM -- "-$g" 2>/dev/null || true; done
    # Give them 5 s to exit (the relay drains; Motion prints its counts), then SIGKILL.
    local deadline=$((SECONDS + 5))
    for g in "${PGIDS[@]}"; do
        while kill -0 -- "-$g" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
        kill -KILL -- "-$g" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    if [[ -f $TMP/motion.log ]]; then
        grep 'bench_motion: requests=' "$TMP/motion.log" | tail -n 1 | sed 's/^/[load] final Motion count: /' >&2 || true
    fi
    if [[ $KEEP == 1 || $status != 0 ]]; then log "logs kept in $TMP"; else rm -rf "$TMP"; fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start NAME LOGFILE CMD...: runs CMD in the background under a time budget; sets STARTED_PID
# to the pid of `timeout` (its process group holds CMD and CMD's children).
start() {
    local name=$1 logfile=$2; shift 2
    timeout -k 5 "$BUDGET" "$@" >"$logfile" 2>&1 &
    STARTED_PID=$!
    PGIDS+=("$STARTED_PID")
    log "started $name (pid $STARTED_PID, log $logfile)"
}

# A free TCP port on 127.0.0.1 (nothing answers a connect there, and not handed out before).
USED_PORTS=" "
free_port() {
    local p
    while :; do
        p=$((20000 + RANDOM % 40000))
        [[ $USED_PORTS == *" $p "* ]] && continue
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then USED_PORTS+="$p "; echo "$p"; return; fi
    done
}

# wait_port PORT PID NAME LOG: until something listens on PORT, or the process died (10 s max).
wait_port() {
    local i
    for ((i = 0; i < 100; i++)); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        kill -0 "$2" 2>/dev/null || { tail -n 20 "$4" >&2; die "$3 exited at start-up"; }
        sleep 0.1
    done
    tail -n 20 "$4" >&2
    die "$3 is not listening on 127.0.0.1:$1 after 10 s"
}

CLK_TCK=$(getconf CLK_TCK)

# ticks PID: CPU time (clock ticks, utime+stime, all threads) of one process.
ticks() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
    stat=${stat##*) }                          # fields after "(comm) ": state is $1, utime $12, stime $13
    awk '{print $12 + $13}' <<<"$stat"
}

# ctxsw PID: context switches (voluntary and not, all threads) of one process: how often its
# threads hand work to each other or wait. Unlike req/s and CPU time, the count per request
# barely moves with the machine's noise, so it shows what a change to the pipeline did.
ctxsw() {
    cat /proc/"$1"/task/*/status 2>/dev/null | awk '/ctxt_switches/ { s += $2 } END { print s + 0 }'
}

# tree COUNT "PID [PID…]": COUNT (ticks or ctxsw) summed over the processes (two relays) and all
# their descendants.
tree() {
    local count=$1 p kid t=0
    for p in $2; do
        t=$((t + $("$count" "$p")))
        for kid in $(cat /proc/"$p"/task/*/children 2>/dev/null); do t=$((t + $(tree "$count" "$kid"))); done
    done
    echo "$t"
}

# ---------------------------------------------------------------------------------------------
# Stand-in Motion
# ---------------------------------------------------------------------------------------------
MOTION_PORT=$(free_port)
start motion "$TMP/motion.log" "$MOTION_BIN" "$MOTION_PORT"
MOTION_PID=$STARTED_PID
wait_port "$MOTION_PORT" "$MOTION_PID" "the stand-in Motion" "$TMP/motion.log"

# Requests Motion has received so far (it prints its counts on SIGUSR1).
motion_count() {
    local before after i
    before=$(grep -c 'bench_motion: requests=' "$TMP/motion.log" || true)
    pkill -USR1 -P "$MOTION_PID" -x bench_motion 2>/dev/null || true
    for ((i = 0; i < 40; i++)); do
        after=$(grep -c 'bench_motion: requests=' "$TMP/motion.log" || true)
        ((after > before)) && break
        sleep 0.05
    done
    grep 'bench_motion: requests=' "$TMP/motion.log" | tail -n 1 | sed 's/.*requests=\([0-9]*\).*/\1/'
}

# A process and all its descendants, one pid a line.
tree_pids() {
    local kid
    echo "$1"
    for kid in $(cat /proc/"$1"/task/*/children 2>/dev/null); do tree_pids "$kid"; done
}

# motion_conns PID: established TCP connections to Motion's port held by PID or its descendants
# (the proxy's upstream pool); "-" without a PID, "?" when ss can't tell.
motion_conns() {
    [[ -n $1 ]] || { echo "-"; return; }
    command -v ss >/dev/null || { echo "?"; return; }
    local pids p
    pids=$(for p in $1; do tree_pids "$p"; done | paste -sd'|')
    ss -Htnp state established "( dport = :$MOTION_PORT )" 2>/dev/null | grep -cE "pid=($pids)," || true
}

# ---------------------------------------------------------------------------------------------
# nginx (config from benches/load/nginx.conf, the shared baseline with free ports)
# ---------------------------------------------------------------------------------------------
NGINX_HTTP_PORT=$(free_port)
NGINX_TLS_PORT=$(free_port)
NG="$TMP/nginx"
mkdir -p "$NG/logs" "$NG/tmp"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=127.0.0.1 -keyout "$NG/key.pem" -out "$NG/cert.pem" 2>/dev/null
sed -e "s/@MOTION_PORT@/$MOTION_PORT/" -e "s/@NGINX_HTTP_PORT@/$NGINX_HTTP_PORT/" \
    -e "s/@NGINX_TLS_PORT@/$NGINX_TLS_PORT/" "$HERE/nginx.conf" >"$NG/nginx.conf"
"$NGINX" -t -q -p "$NG/" -e "$NG/logs/error.log" -c nginx.conf || die "nginx rejects $NG/nginx.conf"
start nginx "$TMP/nginx.log" "$NGINX" -p "$NG/" -e "$NG/logs/error.log" -c nginx.conf -g 'daemon off;'
NGINX_PID=$STARTED_PID
wait_port "$NGINX_HTTP_PORT" "$NGINX_PID" nginx "$NG/logs/error.log"

# ---------------------------------------------------------------------------------------------
# The relay
# ---------------------------------------------------------------------------------------------
# relay_config MODE PORT DATA_DIR ADMIN_PORT: a config with one Motion ("bench") and one Kaleyra account
# ("1") checked by a shared token from X-Webhook-Token.
relay_config() {
    cat <<EOF
# generated by benches/load.sh
[server]
http = "127.0.0.1:$2"
public_url = "http://127.0.0.1:$2"
shutdown_grace = "2s"

[storage]
path = "$3"
${RELAY_STORAGE:-}

[delivery]
mode = "$1"

[admin]
listen = "127.0.0.1:$4"
token = "bench-admin-token"

[[motion]]
name = "bench"
url = "http://127.0.0.1:$MOTION_PORT"

  [[motion.account]]
  id = "1"
  provider = "kaleyra"
  shared_token = "bench-token"
EOF
}
WEBHOOK_PATH=/bench/api/whatsapp/accounts/1/notify

# start_relay NAME MODE [board]: writes and checks its config, starts it (with one board client
# connected when asked); sets RELAY_PORT and RELAY_PID.
# Returns 1 (with the reason in $TMP/NAME.check) when `check` refuses the config.
start_relay() {
    local name=$1 mode=$2 board=${3:-}
    RELAY_PORT=$(free_port)
    RELAY_ADMIN_PORT=$(free_port)
    mkdir -p "$TMP/$name-data"
    relay_config "$mode" "$RELAY_PORT" "$TMP/$name-data" "$RELAY_ADMIN_PORT" >"$TMP/$name.toml"
    if ! "$RELAY_BIN" check --config "$TMP/$name.toml" >"$TMP/$name.check" 2>&1; then
        return 1
    fi
    start "$name" "$TMP/$name.log" env RUST_LOG=warn "$RELAY_BIN" --config "$TMP/$name.toml"
    RELAY_PID=$STARTED_PID
    wait_port "$RELAY_PORT" "$RELAY_PID" "the relay ($name)" "$TMP/$name.log"
    if [[ -n $board ]]; then
        start "$name-board" "$TMP/$name-board.log" curl -sN -u "bench:bench-admin-token" \
            "http://127.0.0.1:$RELAY_ADMIN_PORT/board/events"
    fi
}

# ---------------------------------------------------------------------------------------------
# Targets: name, URL, wrk script, the process whose CPU is the proxy's, and whether deliveries
# are asynchronous (then Motion is waited for after each run)
# ---------------------------------------------------------------------------------------------
# T_PID may list several pids (two relays); T_ADDRS splits wrk's threads over several addresses.
T_NAME=() T_URL=() T_LUA=() T_PID=() T_ASYNC=() T_ADDRS=()
add_target() { T_NAME+=("$1"); T_URL+=("$2"); T_LUA+=("$3"); T_PID+=("$4"); T_ASYNC+=("$5"); T_ADDRS+=("${6:-}"); }

add_target "(a) wrk -> Motion (ceiling)" "http://127.0.0.1:$MOTION_PORT$WEBHOOK_PATH" post.lua "" 0
add_target "(b) wrk -> nginx (HTTP) -> Motion" "http://127.0.0.1:$NGINX_HTTP_PORT$WEBHOOK_PATH" post.lua "$NGINX_PID" 0
start_relay relay-direct direct || { cat "$TMP/relay-direct.check" >&2; die "the relay refuses its direct-mode config"; }
add_target "(c) wrk -> relay direct -> Motion" "http://127.0.0.1:$RELAY_PORT$WEBHOOK_PATH" post.lua "$RELAY_PID" 0
[[ $WITH_QUEUE == 0 ]] ||
    add_target "(c2) = (c) with distinct bodies" "http://127.0.0.1:$RELAY_PORT$WEBHOOK_PATH" post-unique.lua "$RELAY_PID" 0

# ===== HOOK: target (d), relay in queue mode ====================================================
# A second relay with `mode = "queue"`, loaded with distinct bodies (post-unique.lua) so that
# deduplication cannot flatter it. Its 200s mean "stored"; Motion is then waited for after each
# run (up to 30 s) and the backlog reported. Enabled when the relay's `check` accepts queue mode
# (or forced with --queue, which then fails if it doesn't); --no-queue skips it.
target_relay_queue() {
    if start_relay relay-queue queue; then
        add_target "(d) wrk -> relay queue ~> Motion" "http://127.0.0.1:$RELAY_PORT$WEBHOOK_PATH" post-unique.lua "$RELAY_PID" 1
    elif [[ $WITH_QUEUE == 1 ]]; then
        cat "$TMP/relay-queue.check" >&2
        die "the relay refuses mode = \"queue\""
    else
        log "(d) relay queue mode skipped: check refuses it: $(grep -m1 . "$TMP/relay-queue.check" || true)"
    fi
}
[[ $WITH_QUEUE == 0 ]] || target_relay_queue
# ================================================================================================


# ===== Targets (h), (i): queue mode on PostgreSQL, one and two relays ===========================
# start_pg: a throwaway PostgreSQL on 127.0.0.1 (as the postgres user when run as root: it refuses
# root); sets PG_URL. Returns 1, saying why, when PostgreSQL is missing.
start_pg() {
    local bin
    bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    [[ -n $bin && -x $bin/postgres && -x $bin/initdb ]] || return 1
    local as=() dir="$TMP/pg"
    mkdir -p "$dir"
    if [[ $(id -u) == 0 ]]; then
        id postgres >/dev/null 2>&1 || { log "no postgres user to run PostgreSQL as"; return 1; }
        chown postgres "$dir"
        as=(runuser -u postgres --)
    fi
    "${as[@]}" "$bin/initdb" -U relay --auth=trust -E UTF8 --locale=C -D "$dir/data" >"$TMP/pg-initdb.log" 2>&1 ||
        { tail -n 5 "$TMP/pg-initdb.log" >&2; return 1; }
    PG_PORT=$(free_port)
    start postgres "$TMP/pg.log" "${as[@]}" "$bin/postgres" -D "$dir/data" -p "$PG_PORT" -k "$dir" \
        -c listen_addresses=127.0.0.1 -c max_connections=100 -c synchronous_commit=on -c fsync=on
    PG_PID=$STARTED_PID
    wait_port "$PG_PORT" "$PG_PID" PostgreSQL "$TMP/pg.log"
    sleep 0.5
    "$bin/createdb" -h 127.0.0.1 -p "$PG_PORT" -U relay one && "$bin/createdb" -h 127.0.0.1 -p "$PG_PORT" -U relay two ||
        die "createdb failed"
    PG_URL="postgres://relay@127.0.0.1:$PG_PORT"
}

target_relay_pg() {
    if ! start_pg; then
        printf '\n[load] !!!!!!!! SKIPPED (h), (i): PostgreSQL is missing (apt-get install postgresql) !!!!!!!!\n\n' >&2
        return
    fi
    # (h) alone on database "one"; (i)'s two relays share database "two".
    RELAY_STORAGE=$(printf 'backend = "postgres"\nurl = "%s/one?sslmode=disable"\npool = 16' "$PG_URL")
    start_relay relay-pg1 queue || { cat "$TMP/relay-pg1.check" >&2; die "the relay refuses its postgres config"; }
    add_target "(h) wrk -> relay queue on PostgreSQL ~> Motion" "http://127.0.0.1:$RELAY_PORT$WEBHOOK_PATH" post-unique.lua "$RELAY_PID" 1
    RELAY_STORAGE=$(printf 'backend = "postgres"\nurl = "%s/two?sslmode=disable"\npool = 16' "$PG_URL")
    start_relay relay-pg2a queue || die "the relay refuses its postgres config"
    local a_port=$RELAY_PORT a_pid=$RELAY_PID
    start_relay relay-pg2b queue || die "the relay refuses its postgres config"
    add_target "(i) wrk -> 2 relays queue on PostgreSQL ~> Motion" "http://127.0.0.1:$a_port$WEBHOOK_PATH" post-unique.lua \
        "$a_pid $RELAY_PID" 1 "127.0.0.1:$a_port,127.0.0.1:$RELAY_PORT"
    RELAY_STORAGE=""
}
[[ $WITH_PG == 0 || $WITH_QUEUE == 0 ]] || target_relay_pg
# ================================================================================================

if [[ $WITH_BOARD == 1 ]]; then
    start_relay relay-direct-board direct board || die "the relay refuses its direct-mode config"
    add_target "(f) = (c) with a board client" "http://127.0.0.1:$RELAY_PORT$WEBHOOK_PATH" post.lua "$RELAY_PID" 0
    if [[ $WITH_QUEUE != 0 ]] && start_relay relay-queue-board queue board; then
        add_target "(g) = (d) with a board client" "http://127.0.0.1:$RELAY_PORT$WEBHOOK_PATH" post-unique.lua "$RELAY_PID" 1
    fi
fi

BARE_PORT=$(free_port)
start bare-proxy "$TMP/bare-proxy.log" "$BARE_BIN" "$BARE_PORT" "$MOTION_PORT"
BARE_PID=$STARTED_PID
wait_port "$BARE_PORT" "$BARE_PID" "the bare hyper proxy" "$TMP/bare-proxy.log"
add_target "(e) wrk -> bare hyper proxy -> Motion (stack floor)" "http://127.0.0.1:$BARE_PORT$WEBHOOK_PATH" post.lua "$BARE_PID" 0

cp "$HERE/body.json" "$HERE/post.lua" "$HERE/post-unique.lua" "$TMP/"
cd "$TMP"

# run_wrk I SECONDS TAG: one wrk run against target I; appends
# "rps p50 p99 requests errors non2xx proxy_us motion_us backlog pg_us proxy_ctxsw" to
# $TMP/results.I (unless a warm-up).
RUN_NO=0
run_wrk() {
    local i=$1 secs=$2 tag=$3 out line ppid=${T_PID[$1]}
    local p0=0 p1=0 m0 m1 c0 c1 rps p50 p99 reqs errs non2xx backlog=0 conns d0=0 d1=0 s0=0 s1=0
    RUN_NO=$((RUN_NO + 1))
    out="$TMP/wrk.$i.$tag.txt"
    c0=$(motion_count)
    m0=$(tree ticks "$MOTION_PID")
    [[ -n $PG_PID ]] && d0=$(tree ticks "$PG_PID")
    [[ -n $ppid ]] && p0=$(tree ticks "$ppid") && s0=$(tree ctxsw "$ppid")
    RELAY_ADDRS="${T_ADDRS[$i]}" RUN_ID=$(( $(date +%s) % 1000000 * 1000 + RUN_NO )) wrk -t"$THREADS" -c"$CONNECTIONS" -d"${secs}s" --latency -s "${T_LUA[$i]}" \
        "${T_URL[$i]}" >"$out" 2>&1 &
    WRK_PID=$!
    # Halfway through: how many connections the proxy holds open to Motion.
    sleep "$(awk -v s="$secs" 'BEGIN { print s / 2 }')"
    conns=$(motion_conns "$ppid")
    wait "$WRK_PID" || true
    WRK_PID=""
    [[ -n $ppid ]] && p1=$(tree ticks "$ppid") && s1=$(tree ctxsw "$ppid")
    m1=$(tree ticks "$MOTION_PID")
    # PostgreSQL's CPU during any run (its share of the others' is nil: it is idle then).
    [[ -n $PG_PID ]] && d1=$(tree ticks "$PG_PID")
    line=$(grep '^RESULT ' "$out" || true)
    [[ -n $line ]] || { cat "$out" >&2; die "wrk gave no result for ${T_NAME[$i]}"; }
    rps=$(sed 's/.* rps=\([0-9.]*\).*/\1/' <<<"$line")
    p50=$(sed 's/.* p50_ms=\([0-9.]*\).*/\1/' <<<"$line")
    p99=$(sed 's/.* p99_ms=\([0-9.]*\).*/\1/' <<<"$line")
    reqs=$(sed 's/.* requests=\([0-9]*\).*/\1/' <<<"$line")
    errs=$(sed 's/.* errors=\([0-9]*\).*/\1/' <<<"$line")
    non2xx=$(sed 's/.* non2xx=\([0-9]*\).*/\1/' <<<"$line")
    # Asynchronous deliveries: wait (up to 30 s) until Motion has seen every accepted request.
    c1=$(motion_count)
    if [[ ${T_ASYNC[$i]} == 1 ]]; then
        local want=$((c0 + reqs - non2xx)) t
        for ((t = 0; t < 300 && c1 < want; t++)); do sleep 0.1; c1=$(motion_count); done
        backlog=$((want > c1 ? want - c1 : 0))
        log "  queue drained $((c1 - c0))/$((reqs - non2xx)) within $((t / 10)).$((t % 10)) s after the run"
    elif ((c1 - c0 < reqs - non2xx)); then
        # A synchronous proxy answered 2xx for more requests than reached Motion: it is answering by itself.
        log "  !!! Motion received $((c1 - c0)) requests but wrk got $((reqs - non2xx)) 2xx answers"
        backlog=$((reqs - non2xx - (c1 - c0)))
    fi
    if [[ $tag != warmup ]]; then
        awk -v tck="$CLK_TCK" -v r="$reqs" -v pp="$((p1 - p0))" -v mm="$((m1 - m0))" \
            -v has="${ppid:+1}" -v l="$rps $p50 $p99 $reqs $errs $non2xx" -v b="$backlog" -v dd="$((d1 - d0))" \
            -v ss="$((s1 - s0))" \
            'BEGIN { printf "%s %s %s %s %s %s\n", l, (has && r ? pp / tck * 1e6 / r : "-"), (r ? mm / tck * 1e6 / r : "-"), b,
                     (r ? dd / tck * 1e6 / r : "-"), (has && r ? ss / r : "-") }' \
            >>"$TMP/results.$i"
    fi
    log "  $tag ${T_NAME[$i]}: $rps req/s, p50 $p50 ms, p99 $p99 ms, errors $errs, non-2xx $non2xx, proxy's connections to Motion $conns"
}

log "warm-up: ${WARMUP} s per target"
for i in "${!T_NAME[@]}"; do ((WARMUP > 0)) && run_wrk "$i" "$WARMUP" warmup; done
for ((r = 1; r <= ROUNDS; r++)); do
    log "round $r/$ROUNDS: ${DURATION} s per target"
    for i in "${!T_NAME[@]}"; do run_wrk "$i" "$DURATION" "round$r"; done
done

# ---------------------------------------------------------------------------------------------
# Report: medians over rounds; errors summed
# ---------------------------------------------------------------------------------------------
# median FILE COLUMN
median() {
    awk -v c="$2" '$c != "-" { print $c }' "$1" | sort -g |
        awk '{ v[NR] = $1 } END { if (NR == 0) print "-"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
colsum() { awk -v c="$2" '{ s += $c } END { print s + 0 }' "$1"; }

NG_RPS=$(median "$TMP/results.1" 1)
NG_P99=$(median "$TMP/results.1" 3)
# rps_of LABEL: the median req/s of the target named "LABEL ..." ("-" when it did not run).
rps_of() {
    local i
    for i in "${!T_NAME[@]}"; do
        [[ ${T_NAME[$i]} == "$1 "* ]] && { median "$TMP/results.$i" 1; return; }
    done
    echo -
}
# The relay's own direct mode, (c): what "ratio to direct" compares with.
DIRECT_RPS=$(rps_of "(c)")
FAIL=0
{
    echo
    echo "Medians of $ROUNDS x ${DURATION} s, wrk -t$THREADS -c$CONNECTIONS, $(nproc) cores, $(date -u +%Y-%m-%d)"
    echo
    echo "| target | req/s | p50 ms | p99 ms | ratio to nginx (req/s) | p99 vs nginx | ratio to direct | proxy CPU µs/req | Motion CPU µs/req | proxy context switches/req |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    for i in "${!T_NAME[@]}"; do
        f="$TMP/results.$i"
        awk -v n="${T_NAME[$i]}" -v rps="$(median "$f" 1)" -v p50="$(median "$f" 2)" -v p99="$(median "$f" 3)" \
            -v ngr="$NG_RPS" -v ngp="$NG_P99" -v dr="$DIRECT_RPS" -v pc="$(median "$f" 7)" -v mc="$(median "$f" 8)" \
            -v cs="$(median "$f" 11)" \
            'function us(x) { return x == "-" ? "-" : sprintf("%.1f", x) }
             BEGIN { printf "| %s | %.0f | %.2f | %.2f | %.2f | %.2fx | %.2f | %s | %s | %s |\n",
                     n, rps, p50, p99, rps / ngr, p99 / ngp, rps / dr, us(pc), us(mc), (cs == "-" ? "-" : sprintf("%.2f", cs)) }'
    done
    echo
    for i in "${!T_NAME[@]}"; do
        f="$TMP/results.$i"
        errs=$(colsum "$f" 5) non2xx=$(colsum "$f" 6) backlog=$(colsum "$f" 9)
        if [[ $errs != 0 || $non2xx != 0 || $backlog != 0 ]]; then
            echo "- ${T_NAME[$i]}: wrk errors $errs (of which non-2xx $non2xx), 2xx answers that never reached Motion (queue: within 30 s): $backlog"
        fi
        if [[ ${T_NAME[$i]} == *relay* && ($non2xx != 0 || $backlog != 0) ]]; then FAIL=1; fi
    done
    echo "- ratio: req/s over nginx's req/s (higher is better); p99 vs nginx: p99 over nginx's p99 (lower is better)."
    echo "- CPU: utime+stime from /proc of the proxy (nginx master + workers, or the relay) and of Motion, per request."
    echo "- context switches: the proxy's threads', voluntary and not, from /proc, per request (steadier than req/s on a noisy machine)."
    # queue / direct on the same requests: (d) over (c2), both with distinct bodies.
    c2=$(rps_of "(c2)") d=$(rps_of "(d)")
    if [[ $c2 != - && $d != - ]]; then
        awk -v c2="$c2" -v d="$d" 'BEGIN { printf "- queue / direct on the same requests (distinct bodies, (d) over (c2)): %.2f\n", d / c2 }'
    fi
    if [[ -n $PG_PID ]]; then
        for i in "${!T_NAME[@]}"; do
            if [[ ${T_NAME[$i]} == *PostgreSQL* ]]; then
                echo "- ${T_NAME[$i]}: PostgreSQL's CPU $(median "$TMP/results.$i" 10 | awk '{ printf "%.1f", $1 }') µs/req (all its processes)"
            fi
        done
    fi
} | tee "$TMP/report.md"

if [[ $FAIL == 1 ]]; then
    printf '\n[load] !!!!!!!! FAILURE: the relay answered non-2xx or left deliveries undone (logs: %s) !!!!!!!!\n' "$TMP" >&2
    for f in "$TMP"/relay-*.log; do echo "--- $f" >&2; tail -n 20 "$f" >&2; done
    KEEP=1
    exit 1
fi
