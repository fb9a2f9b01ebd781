#!/usr/bin/env bash
# Run every tunnel-loadtest scenario against each path in one run, then print medians,
# ratios and the issue-6 targets: direct (no tunnel), Tether (Unix and mTLS frontends),
# haproxy (one-hop TCP relay, if installed) and rathole (plain TCP and TLS transports;
# installed under target/bench-tools if missing, unless NO_INSTALL=1). `hold` runs Tether as
# separate processes and reads the server's, the edge's and the relays' own RSS; `edges` runs
# once (EDGES edges on one server process, then a restart). Every run is bounded by
# `timeout`; every helper process is killed on exit.
#
#   loadtest/compare.sh                      # DURATION=3 REPEAT=1 HOLD=2000 EDGES=10000
#   DURATION=2 REPEAT=3 loadtest/compare.sh  # medians of three
#   SCENARIOS="rr connect" loadtest/compare.sh
#   PROCESSES=1 loadtest/compare.sh          # Tether as its binaries (shards, lane thread) in
#                                            # every scenario, as rathole and haproxy run;
#                                            # adds tether-unix-nolane (server.lane = false)
set -euo pipefail

DURATION=${DURATION:-3}
REPEAT=${REPEAT:-1}
HOLD=${HOLD:-2000}
EDGES=${EDGES:-10000}
SCENARIOS=${SCENARIOS:-"bulk rr hol connect hold edges"}
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
    # The server and edge binaries sit beside the load generator for --processes and edges.
    (cd "$ROOT" && cargo build --release -q -p tunnel-loadtest -p tunnel-server -p tunnel-edge)
    LOADTEST_BIN=$ROOT/target/release/tunnel-loadtest
fi

# rathole: from PATH, else from target/bench-tools, else installed there. `--locked` first,
# as published; its locked `time` 0.3.29 no longer compiles on current Rust, so then
# without the lock file (same rathole source, newer semver-compatible dependencies).
TOOLS=$ROOT/target/bench-tools
if ! command -v rathole >/dev/null && [[ -x $TOOLS/bin/rathole ]]; then
    PATH=$TOOLS/bin:$PATH
fi
if ! command -v rathole >/dev/null && [[ -z "${NO_INSTALL:-}" ]]; then
    echo "installing rathole into $TOOLS (NO_INSTALL=1 skips it)" >&2
    cargo install rathole --locked --root "$TOOLS" -q 2>"$WORK/rathole-install.log" ||
        cargo install rathole --root "$TOOLS" -q 2>>"$WORK/rathole-install.log" ||
        echo "rathole install failed: $(tail -n 3 "$WORK/rathole-install.log")" >&2
    PATH=$TOOLS/bin:$PATH
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
if [[ -n "${PROCESSES:-}" ]]; then PATHS+=("tether-unix-nolane:--frontend unix --no-lane"); fi
# Extra options per path for `hold`: Tether as processes, the relays' own processes attached.
declare -A HOLD_OPTS=(["tether-unix"]="--processes" ["tether-tls"]="--processes"
    ["tether-unix-nolane"]="--processes")

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
    HOLD_OPTS["haproxy"]="--attach server=$!"
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
        printf -v st '[server.transport]\ntype = "tls"\n[server.transport.tls]\npkcs12 = "%s"\npkcs12_password = "bench"' \
            "$WORK/rh.p12"
        printf -v ct '[client.transport]\ntype = "tls"\n[client.transport.tls]\ntrusted_root = "%s"\nhostname = "localhost"' \
            "$WORK/rh.pem"
    fi
    printf '[server]\nbind_addr = "127.0.0.1:%s"\n%s\n[server.services.t]\ntoken = "bench"\nbind_addr = "127.0.0.1:%s"\nnodelay = true\n' \
        "$sp" "$st" "$lp" >"$WORK/$name-server.toml"
    printf '[client]\nremote_addr = "127.0.0.1:%s"\n%s\n[client.services.t]\ntoken = "bench"\nlocal_addr = "127.0.0.1:%s"\nnodelay = true\n' \
        "$sp" "$ct" "$TARGET_PORT" >"$WORK/$name-client.toml"
    rathole -s "$WORK/$name-server.toml" >"$WORK/$name-server.log" 2>&1 &
    PIDS+=($!)
    HOLD_OPTS[$name]="--attach server=$!"
    wait_port "$sp"
    rathole -c "$WORK/$name-client.toml" >"$WORK/$name-client.log" 2>&1 &
    PIDS+=($!)
    HOLD_OPTS[$name]+=" --attach edge=$!"
    wait_port "$lp"
    PATHS+=("$name:--relay 127.0.0.1:$lp")
}

if command -v rathole >/dev/null; then
    start_rathole rathole-tcp tcp
    start_rathole rathole-tls tls
else
    echo "rathole not available: skipped (install it with: cargo install rathole --locked)" >&2
fi

LIMIT=$(python3 -c "print(int($DURATION * 3 + 30))")
for scenario in $SCENARIOS; do
    for rep in $(seq 1 "$REPEAT"); do
        if [[ $scenario == edges ]]; then
            # One server process and EDGES edges; not a path comparison.
            if ! timeout 400 "$LOADTEST_BIN" edges --edges "$EDGES" --limit 180 --json \
                >>"$RESULTS" 2>"$WORK/err"; then
                echo "FAILED: edges (run $rep): $(tail -n 3 "$WORK/err")" >&2
            fi
            continue
        fi
        for entry in "${PATHS[@]}"; do
            name=${entry%%:*}
            extra=""
            if [[ $scenario == hold ]]; then
                extra=${HOLD_OPTS[$name]:-}
            elif [[ -n "${PROCESSES:-}" && $name == tether-* ]]; then
                extra="--processes"
            fi
            # shellcheck disable=SC2086 # the path options are meant to split
            if ! timeout "$LIMIT" "$LOADTEST_BIN" "$scenario" ${entry#*:} $extra --label "$name" \
                --target-port "$TARGET_PORT" --duration "$DURATION" --hold "$HOLD" --json \
                >>"$RESULTS" 2>"$WORK/err"; then
                echo "FAILED: $scenario via $name (run $rep): $(tail -n 3 "$WORK/err")" >&2
            fi
        done
    done
done
if [[ -n "${KEEP_RESULTS:-}" ]]; then cp "$RESULTS" "$KEEP_RESULTS"; fi

python3 - "$RESULTS" <<'PY'
import json, statistics, sys
from collections import defaultdict
runs = defaultdict(list)
paths = []
for line in open(sys.argv[1]):
    r = json.loads(line)
    runs[(r["scenario"], r["path"])].append(r["figures"])
    if r["scenario"] != "edges" and r["path"] not in paths:
        paths.append(r["path"])
KEY = [("bulk", "total_gbit_s"), ("rr", "rps"), ("rr", "latency_p50_us"),
       ("rr", "latency_p99_us"), ("hol", "idle_rps"), ("hol", "busy_rps"),
       ("hol", "rps_ratio"), ("hol", "idle_p99_us"), ("hol", "busy_p50_us"),
       ("hol", "busy_p99_us"), ("hol", "busy_p999_us"), ("hol", "bulk_alone_mb_s"),
       ("hol", "bulk_mb_s"), ("hol", "bulk_ratio"), ("connect", "conn_per_s"),
       ("connect", "latency_p50_us"), ("connect", "latency_p99_us"),
       ("hold", "rss_per_conn_kib"), ("hold", "server_rss_per_conn_kib"),
       ("hold", "edge_rss_per_conn_kib")]
def med(s, p, f):
    v = [x[f] for x in runs.get((s, p), []) if f in x]
    return statistics.median(v) if v else None
n = max((len(v) for v in runs.values()), default=0)
print(f"\nmedian of {n} run(s); cell = value (ratio to direct)")
w = max(len(p) for p in paths) + 10 if paths else 20
print(f"{'scenario.figure':30}" + "".join(f"{p:>{w}}" for p in paths))
for s, f in KEY:
    base = med(s, "direct", f)
    cells = []
    for p in paths:
        v = med(s, p, f)
        if v is None:
            cells.append(f"{'-':>{w}}")
            continue
        ratio = f" ({v / base:.2f}x)" if base else ""
        cells.append(f"{v:>{w - len(ratio)}.{3 if v < 10 else 0}f}{ratio}")
    print(f"{s + '.' + f:30}" + "".join(cells))
edges = [x for (s, _), v in runs.items() if s == "edges" for x in v]
if edges:
    print()
    for f in ["edges", "join_secs", "server_rss_per_edge_kib", "storm_secs",
              "storm_sessions_per_edge"]:
        print(f"edges.{f:28}{statistics.median(x[f] for x in edges):>12.2f}")

# Issue 6's targets: (what, value, goal, higher is better).
def ratio(a, b):
    return a / b if a is not None and b else None
T = []
for fe in ["tether-unix", "tether-tls"]:
    T += [
        (f"bulk {fe} / rathole-tls", ratio(med("bulk", fe, "total_gbit_s"), med("bulk", "rathole-tls", "total_gbit_s")), 1.5, True),
        (f"bulk {fe} / direct", ratio(med("bulk", fe, "total_gbit_s"), med("bulk", "direct", "total_gbit_s")), 0.3, True),
        (f"connect/s {fe} / rathole-tcp", ratio(med("connect", fe, "conn_per_s"), med("connect", "rathole-tcp", "conn_per_s")), 1.0, True),
        (f"connect p50 {fe} / haproxy", ratio(med("connect", fe, "latency_p50_us"), med("connect", "haproxy", "latency_p50_us")), 2.0, False),
        (f"rr rps {fe} / rathole-tls", ratio(med("rr", fe, "rps"), med("rr", "rathole-tls", "rps")), 1.2, True),
        (f"rr p99 {fe} / direct p99", ratio(med("rr", fe, "latency_p99_us"), med("rr", "direct", "latency_p99_us")), 2.0, False),
        (f"hol busy/idle {fe}", med("hol", fe, "rps_ratio"), 0.9, True),
        (f"hold server KiB/conn {fe}", med("hold", fe, "server_rss_per_conn_kib"), 12.0, False),
    ]
    # Issue 16: small requests beside one bulk stream on the same session.
    rathole_hol = [med("hol", p, "rps_ratio") for p in ["rathole-tcp", "rathole-tls"]]
    rathole_hol = [v for v in rathole_hol if v is not None]
    T += [
        (f"hol rps ratio {fe}", med("hol", fe, "rps_ratio"), 0.6, True),
        (f"hol rps ratio {fe} / best rathole", ratio(med("hol", fe, "rps_ratio"), max(rathole_hol, default=None)), 1.0, True),
        (f"hol busy p99 ms {fe}", (lambda v: v / 1000 if v is not None else None)(med("hol", fe, "busy_p99_us")), 3.0, False),
        (f"hol busy p99 / idle p99 {fe}", med("hol", fe, "busy_p99_over_idle"), 4.0, False),
        (f"hol bulk beside / alone {fe}", med("hol", fe, "bulk_ratio"), 0.8, True),
        (f"rr rps {fe} / rathole-tcp", ratio(med("rr", fe, "rps"), med("rr", "rathole-tcp", "rps")), 1.0, True),
    ]
if edges:
    T += [("edges server KiB/edge", statistics.median(x["server_rss_per_edge_kib"] for x in edges), 100.0, False),
          ("edges reconnect storm s", statistics.median(x["storm_secs"] for x in edges), 60.0, False)]
print("\ntarget                                        measured      goal  verdict")
for what, v, goal, up in T:
    if v is None:
        print(f"{what:44}{'-':>10}{goal:>10}  not measured")
        continue
    ok = v >= goal if up else v <= goal
    print(f"{what:44}{v:>10.2f}{('>=' if up else '<=') + str(goal):>10}  {'met' if ok else 'MISS'}")
PY
