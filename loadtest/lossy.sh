#!/usr/bin/env bash
# Lossy-link comparison of the edge session's transports: `hol` (small requests beside one
# bulk transfer) over TCP and over QUIC at 0 %, 1 % and 3 % packet loss. Loss is real: the
# run happens inside a network namespace made here, where iptables drops every Nth packet
# of the edge session (`-m statistic --mode nth`, deterministic, for TCP and UDP alike).
# Only the session loses packets: the loadtest puts the server's edge listener on EDGE_PORT
# (TCP and UDP), the rules match that port, and the frontend (the Unix socket) and the
# edge's leg to the target (loopback TCP on another port) lose nothing, so a loss shows
# the session transport's own cost and not TCP's retransmission timeout on another leg.
#
# One rule per protocol and direction (to the port, from the port). The nth counter is per
# rule and counts only the packets that rule matches (the port match comes first), so each
# direction of the session loses exactly one packet in N: edge to server and server to edge
# alike, data and acknowledgements alike. Counting rules in front of the drops see every
# session packet; after each run the script prints both rules' counters per direction, so
# the loss that happened is on record beside the figures. Needs root (ip netns, iptables).
#
#   loadtest/lossy.sh                 # BIN=target/release/tunnel-loadtest DURATION=4
#   BIN=target/debug/tunnel-loadtest EDGE_PORT=47001 loadtest/lossy.sh
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN:-$ROOT/target/release/tunnel-loadtest}
DURATION=${DURATION:-4}
EDGE_PORT=${EDGE_PORT:-47001}
NS=tether-lossy-$$

cleanup() { ip netns delete "$NS" 2>/dev/null || true; }
trap cleanup EXIT
ip netns add "$NS"
ip netns exec "$NS" ip link set lo up

# every N-th packet per direction: 0 = no loss, 100 = 1 %, 33 = 3 %
for every in 0 100 33; do
    ip netns exec "$NS" iptables -F INPUT
    for proto in tcp udp; do
        for dir in --dport --sport; do
            # counts every session packet of this protocol and direction (no target)
            ip netns exec "$NS" iptables -A INPUT -i lo -p "$proto" "$dir" "$EDGE_PORT"
            if [ "$every" -gt 0 ]; then
                ip netns exec "$NS" iptables -A INPUT -i lo -p "$proto" "$dir" "$EDGE_PORT" \
                    -m statistic --mode nth --every "$every" --packet 0 -j DROP
            fi
        done
    done
    for transport in tcp quic; do
        echo "== loss every=${every} transport=${transport}"
        timeout $((DURATION * 4 + 60)) ip netns exec "$NS" "$BIN" hol \
            --transport "$transport" --edge-port "$EDGE_PORT" --duration "$DURATION"
        echo "session packets seen / dropped (pkts of the counting and the DROP rules):"
        ip netns exec "$NS" iptables -L INPUT -v -n -x -Z | awk 'NR > 2 && $1 > 0'
    done
done
