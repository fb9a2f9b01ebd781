#!/usr/bin/env bash
# Run every tunnel-loadtest scenario against each path in one run, then print medians and
# ratios: direct (no tunnel), Tether (Unix and mTLS frontends), haproxy (one-hop TCP relay,
# if installed) and rathole (plain TCP and TLS transports, if `rathole` is on PATH).
# Every run is bounded by `timeout`; every helper process is killed on exit.
#
#   loadtest/compare.sh                      # DURATION=3 REPEAT=1 HOLD=2000
#   DURATION=2 REPEAT=3 loadtest/compare.sh  # medians of three
#   SCENARIOS="rr connect" loadtest/compare.sh
set -euo pipefail

DURATION=${DURATION:-3}
REPEAT=${REPEAT:-1}
HOLD=${HOLD:-2000}
SCENARIOS=${SCENARIOS:-"bulk rr hol connect hold"}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d)
RESULTS=$WORK/results.jsonl
PIDS=()

cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

if [[ -z "${LOADTEST_BIN:-}" ]]; then
    (cd "$ROOT" && cargo build --release -q -p tunnel-loadtest)
    LOADTEST_BIN=$ROOT/target/release/tunnel-loadtest
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Wait (bounded) until something accepts on 127.0.0.1:$1.
wait_port() {
    for _ in $(seq 1 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    echo "nothing listening on 127.0.0.1:$1" >&2
    return 1
}

TARGET_PORT=$(free_port)
PATHS=("direct:--direct" "tether-unix:--frontend unix" "tether-tls:--frontend tls")

if command -v haproxy >/dev/null; then
    HP=$(free_port)
    cat >"$WORK/haproxy.cfg" <<CFG
global
    maxconn 8000
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
listen relay
    bind 127.0.0.1:$HP
    server target 127.0.0.1:$TARGET_PORT
CFG
    haproxy -f "$WORK/haproxy.cfg" -db >"$WORK/haproxy.log" 2>&1 &
    PIDS+=($!)
    wait_port "$HP"
    PATHS+=("haproxy:--relay 127.0.0.1:$HP")
else
    echo "haproxy not installed: skipping the one-hop relay baseline" >&2
fi

start_rathole() { # name transport(tcp|tls)
    local name=$1 transport=$2 sp lp
    sp=$(free_port); lp=$(free_port)
    local st="" ct=""
    if [[ $transport == tls ]]; then
        openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost \
            -addext subjectAltName=DNS:localhost -keyout "$WORK/rh.key" -out "$WORK/rh.pem" 2>/dev/null
        openssl pkcs12 -export -out "$WORK/rh.p12" -inkey "$WORK/rh.key" -in "$WORK/rh.pem" -passout pass:bench
        st=$'[server.transport]\ntype = "tls"\n[server.transport.tls]\npkcs12 = "'$WORK'/rh.p12"\npkcs12_password = "bench"'
        ct=$'[client.transport]\ntype = "tls"\n[client.transport.tls]\ntrusted_root = "'$WORK'/rh.pem"\nhostname = "localhost"'
    fi
    printf '[server]\nbind_addr = "127.0.0.1:%s"\n%s\n[server.services.t]\ntoken = "bench"\nbind_addr = "127.0.0.1:%s"\nnodelay = true\n' \
        "$sp" "$st" "$lp" >"$WORK/$name-server.toml"
    printf '[client]\nremote_addr = "127.0.0.1:%s"\n%s\n[client.services.t]\ntoken = "bench"\nlocal_addr = "127.0.0.1:%s"\nnodelay = true\n' \
        "$sp" "$ct" "$TARGET_PORT" >"$WORK/$name-client.toml"
    rathole -s "$WORK/$name-server.toml" >"$WORK/$name-server.log" 2>&1 &
    PIDS+=($!)
    wait_port "$sp"
    rathole -c "$WORK/$name-client.toml" >"$WORK/$name-client.log" 2>&1 &
    PIDS+=($!)
    wait_port "$lp"
    PATHS+=("$name:--relay 127.0.0.1:$lp")
}

if command -v rathole >/dev/null; then
    start_rathole rathole-tcp tcp
    start_rathole rathole-tls tls
else
    echo "rathole not on PATH: skipped (install it with: cargo install rathole --locked)" >&2
fi

LIMIT=$(python3 -c "print(int($DURATION * 3 + 30))")
for scenario in $SCENARIOS; do
    for rep in $(seq 1 "$REPEAT"); do
        for entry in "${PATHS[@]}"; do
            name=${entry%%:*}
            # shellcheck disable=SC2086 # the path options are meant to split
            if ! timeout "$LIMIT" "$LOADTEST_BIN" "$scenario" ${entry#*:} --label "$name" \
                --target-port "$TARGET_PORT" --duration "$DURATION" --hold "$HOLD" --json \
                >>"$RESULTS" 2>"$WORK/err"; then
                echo "FAILED: $scenario via $name (run $rep): $(tail -n 3 "$WORK/err")" >&2
            fi
        done
    done
done

python3 - "$RESULTS" <<'PY'
import json, statistics, sys
from collections import defaultdict
runs = defaultdict(list)
paths = []
for line in open(sys.argv[1]):
    r = json.loads(line)
    runs[(r["scenario"], r["path"])].append(r["figures"])
    if r["path"] not in paths:
        paths.append(r["path"])
# (scenario, figure, higher is better)
KEY = [("bulk", "total_gbit_s", True), ("rr", "rps", True), ("rr", "latency_p50_us", False),
       ("rr", "latency_p99_us", False), ("hol", "idle_rps", True), ("hol", "busy_rps", True),
       ("hol", "rps_ratio", True), ("hol", "busy_p99_us", False), ("connect", "conn_per_s", True),
       ("connect", "latency_p50_us", False), ("connect", "latency_p99_us", False),
       ("hold", "rss_per_conn_kib", False)]
def med(s, p, f):
    v = [x[f] for x in runs.get((s, p), []) if f in x]
    return statistics.median(v) if v else None
n = max((len(v) for v in runs.values()), default=0)
print(f"\nmedian of {n} run(s); cell = value (ratio to direct)")
w = max(len(p) for p in paths) + 10 if paths else 20
print(f"{'scenario.figure':28}" + "".join(f"{p:>{w}}" for p in paths))
for s, f, _ in KEY:
    base = med(s, "direct", f)
    cells = []
    for p in paths:
        v = med(s, p, f)
        if v is None:
            cells.append(f"{'-':>{w}}")
            continue
        ratio = f" ({v / base:.2f}x)" if base else ""
        cells.append(f"{v:>{w - len(ratio)}.{3 if v < 10 else 0}f}{ratio}")
    print(f"{s + '.' + f:28}" + "".join(cells))
PY
