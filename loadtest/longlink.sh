#!/usr/bin/env bash
# The edge session's transports over a long, lossy link: `hol` (small requests beside one
# bulk transfer) over TCP and QUIC at 0 %, 1 % and 3 % loss, and `bulk` (both ways at once)
# at 0 % and 1 %, with DELAY_MS of one-way delay (default 20 ms: a 40 ms round trip, an IDC
# far from its cloud region). Unlike lossy.sh, where a loopback round trip is tens of µs and
# a TCP retransmission costs microseconds, a loss here costs at least a round trip, which is
# where head-of-line blocking on one TCP session shows and QUIC's per-stream recovery should.
#
# Everything runs inside a network namespace made here, with `lo` at a real link's MTU
# (1500, so a packet is one MTU and not a 64 KB offload segment). `tunnel-linkem` delays and
# drops only the session's packets (TCP and UDP to and from EDGE_PORT, both directions, via
# NFQUEUE): the Unix-socket frontend and the edge's leg to the target stay lossless
# loopback. After each run the script prints the emulator's counters (packets seen, lost,
# tail-dropped per direction, and the kernel's own queue drops), so the loss that happened
# is on record beside the figures. Needs root (ip netns, iptables).
#
#   loadtest/longlink.sh          # BIN_DIR=target/release DURATION=6 DELAY_MS=20 SEED=1
#   BIN_DIR=target/debug DURATION=2 loadtest/longlink.sh
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN_DIR=${BIN_DIR:-$ROOT/target/release}
DURATION=${DURATION:-6}
DELAY_MS=${DELAY_MS:-20}
SEED=${SEED:-1}
EDGE_PORT=${EDGE_PORT:-47001}
# Which transports to run (e.g. TRANSPORTS=quic for QUIC's rows only).
TRANSPORTS=${TRANSPORTS:-tcp quic}
# Extra tunnel-loadtest arguments for every run (e.g. "--json").
LOADTEST_ARGS=${LOADTEST_ARGS:-}
NS=tether-longlink-$$
LINK_PID=

cleanup() {
    if [ -n "$LINK_PID" ]; then kill "$LINK_PID" 2>/dev/null || true; fi
    ip netns delete "$NS" 2>/dev/null || true
}
trap cleanup EXIT
ip netns add "$NS"
ip netns exec "$NS" ip link set lo up mtu 1500

# udp_counter NAME: one Udp counter of /proc/net/snmp in the namespace (RcvbufErrors: the
# datagrams a receiving socket's full buffer dropped, a loss the link did not make).
udp_counter() {
    # shellcheck disable=SC2016 # the $ are awk's own
    ip netns exec "$NS" awk -v name="$1" '
        $1 == "Udp:" && !header { for (i = 2; i <= NF; i++) col[$i] = i; header = 1; next }
        $1 == "Udp:" && header { print $col[name]; exit }' /proc/net/snmp
}

# run LOSS_PERCENT SCENARIO TRANSPORT: one tunnel-loadtest run through the link.
run() {
    local loss=$1 scenario=$2 transport=$3 rules
    ip netns exec "$NS" "$BIN_DIR/tunnel-linkem" run --port "$EDGE_PORT" \
        --delay-ms "$DELAY_MS" --loss-percent "$loss" --seed "$SEED" &
    LINK_PID=$!
    # Ready once its four rules (TCP and UDP, to and from the port) are in; bounded.
    for _ in $(seq 100); do
        rules=$(ip netns exec "$NS" iptables -S INPUT | grep -c NFQUEUE || true)
        [ "$rules" -ge 4 ] && break
        sleep 0.1
    done
    [ "$rules" -ge 4 ] || { echo "tunnel-linkem did not start" >&2; exit 1; }
    echo "== ${scenario} loss=${loss}% delay=${DELAY_MS}ms transport=${transport}"
    local rcvbuf_errors
    rcvbuf_errors=$(udp_counter RcvbufErrors)
    # shellcheck disable=SC2086 # LOADTEST_ARGS is a list of words
    # A run that fails (a bulk stream that cannot drain its windows within the loadtest's
    # grace is reported as stalled) is on record as such; the others still run.
    timeout $((DURATION * 4 + 60)) ip netns exec "$NS" "$BIN_DIR/tunnel-loadtest" "$scenario" \
        --transport "$transport" --edge-port "$EDGE_PORT" --duration "$DURATION" $LOADTEST_ARGS \
        || echo "== run failed (exit status $?)"
    echo "UdpRcvbufErrors: $(($(udp_counter RcvbufErrors) - rcvbuf_errors))"
    kill -TERM "$LINK_PID"
    echo -n "link counters: "
    wait "$LINK_PID"
    LINK_PID=
}

for loss in 0 1 3; do
    for transport in $TRANSPORTS; do
        run "$loss" hol "$transport"
    done
done
for loss in 0 1; do
    for transport in $TRANSPORTS; do
        run "$loss" bulk "$transport"
    done
done
