#!/usr/bin/env bash
# Lossy-link comparison of the edge session's transports: `hol` (small requests beside one
# bulk transfer) over TCP and over QUIC at 0 %, 1 % and 3 % packet loss. Loss is real: the
# run happens inside a network namespace made here, where iptables drops every Nth packet
# on loopback (`-m statistic --mode nth`, deterministic, for TCP and UDP alike). The
# frontend is the Unix socket (no packets); the edge's leg to the target is on loopback too
# and loses the same share for both transports. Needs root (ip netns, iptables).
#
#   loadtest/lossy.sh                 # BIN=target/release/tunnel-loadtest DURATION=4
#   BIN=target/debug/tunnel-loadtest loadtest/lossy.sh
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN:-$ROOT/target/release/tunnel-loadtest}
DURATION=${DURATION:-4}
NS=tether-lossy-$$

cleanup() { ip netns delete "$NS" 2>/dev/null || true; }
trap cleanup EXIT
ip netns add "$NS"
ip netns exec "$NS" ip link set lo up

# every N-th packet: 0 = no loss, 100 = 1 %, 33 = 3 %
for every in 0 100 33; do
    ip netns exec "$NS" iptables -F INPUT
    if [ "$every" -gt 0 ]; then
        ip netns exec "$NS" iptables -A INPUT -i lo -m statistic --mode nth \
            --every "$every" --packet 0 -j DROP
    fi
    for transport in tcp quic; do
        echo "== loss every=${every} transport=${transport}"
        timeout $((DURATION * 4 + 60)) ip netns exec "$NS" "$BIN" hol \
            --transport "$transport" --duration "$DURATION"
    done
done
