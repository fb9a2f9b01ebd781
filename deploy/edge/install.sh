#!/bin/sh
# Import this machine into a Tether node pool: the one command `tunnel-server token create
# --print-join-command` prints. POSIX sh; run as root with the tunnel-edge binary beside it.
#
#   sh install.sh --server LB:443 --token ID.SECRET --ca-hash sha256:HEX [options]
#   sh install.sh uninstall [--root DIR] [--no-systemd]
#
# Steps, in this order, each skipped when already done (a second run changes nothing and
# says so):
#   1. join: `tunnel-edge join --ca-hash` exchanges the token for this node's certificate
#      into /var/lib/tether. It runs first and writes nothing unless the server proved it
#      holds the pinned CA, so a wrong pin or token leaves the machine untouched.
#   2. /usr/local/bin/tunnel-edge, /etc/tether/edge.toml (checked with check-config).
#   3. the systemd unit tunnel-edge.service (hardened), enabled and started.
#   4. kubelet wiring: a drop-in that hands kubelet the pool's labels and taints (join's
#      /var/lib/tether/kubelet.env) through $KUBELET_EXTRA_ARGS.
#   5. the node pool's user script (--user-script), run again only when it changed; its
#      output goes to /var/log/tether/user-script.log.
# Everything created is listed in /etc/tether/install.manifest; `uninstall` removes exactly
# that. --root DIR installs under DIR (tests, image builds); --no-systemd skips systemctl.
set -eu

usage() {
    sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'
    cat <<'EOF'
Options:
  --server HOST:PORT        registration API (the load balancer's 443)
  --token ID.SECRET         bootstrap token (or TETHER_JOIN_TOKEN in the environment)
  --ca-hash sha256:HEX      pin of the CA that issued the registration certificate
  --server-name NAME        name to verify in the registration certificate
  --node-name NAME          this node's Kubernetes name (default: hostname)
  --node-ip IP              an InternalIP of this node; repeatable
  --tunnel-address H:P      edge listener (default: what the server advertised at join)
  --allow-port PORT         local port kube-apiserver may reach (default 10250); repeatable
  --self-host IP            dial targets naming this node at IP (a kubelet on loopback)
  --apiserver-forward ADDR  loopback listener carried to kube-apiserver, or "none"
                            (default 127.0.0.1:6443)
  --config-extra FILE       TOML appended to edge.toml (e.g. [[allow.extra]])
  --user-script FILE        the node pool's script, run after the edge is up
  --binary FILE             tunnel-edge to install (default: beside this script)
  --root DIR                install under DIR
  --no-systemd              do not call systemctl
EOF
}

die() {
    echo "install.sh: $*" >&2
    exit 1
}

say() {
    echo "install.sh: $*"
}

action=install
root=
server=
token=${TETHER_JOIN_TOKEN:-}
ca_hash=
server_name=
node_name=
node_ips=
tunnel_address=
allow_ports=
self_host=
apiserver_forward=127.0.0.1:6443
config_extra=
user_script=
binary=
systemd=yes

need_value() {
    if [ "$#" -lt 2 ] || [ -z "$2" ]; then
        die "$1 needs a value"
    fi
}

while [ "$#" -gt 0 ]; do
    case "$1" in
        install | uninstall) action=$1 ;;
        --server) need_value "$@"; server=$2; shift ;;
        --token) need_value "$@"; token=$2; shift ;;
        --ca-hash) need_value "$@"; ca_hash=$2; shift ;;
        --server-name) need_value "$@"; server_name=$2; shift ;;
        --node-name) need_value "$@"; node_name=$2; shift ;;
        --node-ip) need_value "$@"; node_ips="$node_ips $2"; shift ;;
        --tunnel-address) need_value "$@"; tunnel_address=$2; shift ;;
        --allow-port) need_value "$@"; allow_ports="$allow_ports $2"; shift ;;
        --self-host) need_value "$@"; self_host=$2; shift ;;
        --apiserver-forward) need_value "$@"; apiserver_forward=$2; shift ;;
        --config-extra) need_value "$@"; config_extra=$2; shift ;;
        --user-script) need_value "$@"; user_script=$2; shift ;;
        --binary) need_value "$@"; binary=$2; shift ;;
        --root) need_value "$@"; root=${2%/}; shift ;;
        --no-systemd) systemd=no ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
    shift
done

# Paths as the running system sees them; "$root$X" is where this run writes them.
BIN=/usr/local/bin/tunnel-edge
CONF_DIR=/etc/tether
CONF=$CONF_DIR/edge.toml
MANIFEST=$CONF_DIR/install.manifest
USER_SCRIPT=$CONF_DIR/user-script
USER_SCRIPT_DONE=$CONF_DIR/user-script.sha256
STATE=/var/lib/tether
LOG_DIR=/var/log/tether
UNIT_DIR=/etc/systemd/system
UNIT=$UNIT_DIR/tunnel-edge.service
KUBELET_DROPIN_DIR=$UNIT_DIR/kubelet.service.d
KUBELET_DROPIN=$KUBELET_DROPIN_DIR/20-tether.conf

changed=0

systemctl_run() {
    if [ "$systemd" = yes ]; then
        systemctl "$@"
    fi
}

# Record PATH (relative to the root) in the manifest once.
record() {
    touch "$root$MANIFEST"
    grep -qxF "$1 $2" "$root$MANIFEST" || echo "$1 $2" >>"$root$MANIFEST"
}

# The directories of DIR (a system path) that do not exist yet, outermost first.
missing_dirs() {
    d=$1
    out=
    while [ -n "$d" ] && [ "$d" != / ] && [ ! -d "$root$d" ]; do
        out="$d $out"
        d=$(dirname "$d")
    done
    echo "$out"
}

# mkdir -p DIR (a system path), recording each directory it creates.
make_dir() {
    created=$(missing_dirs "$1")
    [ -z "$created" ] && return 0
    mkdir -p "$root$1"
    for d in $created; do
        record dir "$d"
    done
}

# Put CONTENT_FILE at PATH with MODE unless PATH already holds exactly that.
put_file() {
    src=$1 dst=$2 mode=$3
    if [ -f "$root$dst" ] && cmp -s "$src" "$root$dst"; then
        return 0
    fi
    make_dir "$(dirname "$dst")"
    cp "$src" "$root$dst.tmp"
    chmod "$mode" "$root$dst.tmp"
    mv -f "$root$dst.tmp" "$root$dst"
    record file "$dst"
    changed=$((changed + 1))
    say "wrote $dst"
}

uninstall() {
    [ -f "$root$MANIFEST" ] || die "nothing to uninstall: $root$MANIFEST not found"
    if [ -f "$root$UNIT" ]; then
        systemctl_run disable --now tunnel-edge.service || true
    fi
    # Files first, then the state directory, then directories innermost first.
    while read -r kind path; do
        case "$kind" in
            file) rm -f "$root$path" ;;
            tree) rm -rf "${root:?}$path" ;;
        esac
    done <"$root$MANIFEST"
    dirs=$(awk '$1 == "dir" { print $2 }' "$root$MANIFEST" | sort -r)
    rm -f "$root$MANIFEST"
    for d in $dirs; do
        rmdir "$root$d" 2>/dev/null || say "kept $d: not empty"
    done
    systemctl_run daemon-reload || true
    say "uninstalled"
}

if [ "$action" = uninstall ]; then
    uninstall
    exit 0
fi

# --- Check everything before touching anything. ------------------------------------------
[ -n "$server" ] || die "--server HOST:PORT is required"
[ -n "$token" ] || die "--token (or TETHER_JOIN_TOKEN) is required"
[ -n "$ca_hash" ] || die "--ca-hash sha256:... is required (token create --print-join-command prints it)"
case "$ca_hash" in
    sha256:*) ;;
    *) die "--ca-hash must look like sha256:<64 hex>; nothing was changed" ;;
esac
here=$(cd "$(dirname "$0")" && pwd)
[ -n "$binary" ] || binary=$here/tunnel-edge
[ -x "$binary" ] || die "no tunnel-edge binary at $binary (give --binary FILE)"
[ -n "$node_name" ] || node_name=$(hostname)
[ -z "$config_extra" ] || [ -f "$config_extra" ] || die "--config-extra $config_extra: no such file"
[ -z "$user_script" ] || [ -f "$user_script" ] || die "--user-script $user_script: no such file"
[ -n "$allow_ports" ] || allow_ports=10250
if [ -n "$root" ]; then
    mkdir -p "$root" 2>/dev/null || die "--root $root: cannot create"
    root=$(cd "$root" && pwd)
fi

# --- 1. Join (writes nothing unless the pinned CA and the token are accepted). ------------
state_created=$(missing_dirs "$STATE")
conf_created=$(missing_dirs "$CONF_DIR")
set -- join --server "https://$server" --ca-hash "$ca_hash" --node-name "$node_name" \
    --state-dir "$root$STATE"
[ -z "$server_name" ] || set -- "$@" --server-name "$server_name"
for ip in $node_ips; do
    set -- "$@" --node-ip "$ip"
done
# The token goes through the environment: argv is visible to every user.
join_out=$(TETHER_JOIN_TOKEN=$token "$binary" "$@" 2>&1) || {
    echo "$join_out" >&2
    die "join failed; nothing was changed"
}
echo "$join_out"
case "$join_out" in
    *"already joined"*) ;;
    *) changed=$((changed + 1)) ;;
esac
mkdir -p "$root$CONF_DIR"
for d in $conf_created; do
    record dir "$d"
done
# The state directory goes whole on uninstall; the directories above it one by one.
for d in $state_created; do
    if [ "$d" = "$STATE" ]; then
        record tree "$d"
    else
        record dir "$d"
    fi
done

# --- 2. Binary and configuration. ---------------------------------------------------------
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
put_file "$binary" "$BIN" 0755

ports=
for p in $allow_ports; do
    ports="${ports:+$ports, }$p"
done
{
    echo "# Written by Tether's install.sh; a re-run rewrites it (add settings with --config-extra)."
    echo "# The unit passes --state-dir $STATE: CA, certificate, key and renewal come from there."
    echo
    echo "[server]"
    if [ -n "$tunnel_address" ]; then
        echo "address = \"$tunnel_address\""
    else
        echo "# address: the tunnel endpoint the server advertised at join"
    fi
    echo
    echo "[allow]"
    echo "ports = [$ports]"
    if [ -n "$self_host" ]; then
        echo
        echo "[dial]"
        echo "self_host = \"$self_host\""
    fi
    if [ "$apiserver_forward" != none ]; then
        echo
        echo "# kubelet reaches kube-apiserver here; its kubeconfig needs tls-server-name (README)."
        echo "[[forward]]"
        echo "listen = \"$apiserver_forward\""
        echo "upstream = \"kube-apiserver\""
        echo "max_connections = 256"
    fi
    echo
    echo "[log]"
    echo "format = \"json\""
    if [ -n "$config_extra" ]; then
        echo
        cat "$config_extra"
    fi
} >"$work/edge.toml"
put_file "$work/edge.toml" "$CONF" 0644
"$root$BIN" check-config "$root$CONF" --state-dir "$root$STATE" >"$work/check" 2>&1 || {
    cat "$work/check" >&2
    die "$CONF does not pass check-config (no tunnel endpoint advertised? give --tunnel-address)"
}

# --- 3. The systemd unit. -----------------------------------------------------------------
cat >"$work/unit" <<'UNIT'
[Unit]
Description=Tether edge agent (reverse tunnel to the cloud control plane)
After=network-online.target
Wants=network-online.target

[Service]
# /var/lib/tether is what `tunnel-edge join` wrote: certificate, key and CA, renewed in place
# (StateDirectory keeps it writable under ProtectSystem=strict). deploy/edge/install.sh
# installs this file as it is; a test checks the two copies match.
ExecStart=/usr/local/bin/tunnel-edge run --config /etc/tether/edge.toml --state-dir /var/lib/tether
Restart=always
RestartSec=2
# SIGTERM: stop taking new streams, let in-flight ones finish (shutdown_grace).
KillSignal=SIGTERM
TimeoutStopSec=40
NoNewPrivileges=true
ProtectSystem=strict
ProtectHome=true
ReadOnlyPaths=/etc/tether
StateDirectory=tether
StateDirectoryMode=0700
PrivateTmp=true
PrivateDevices=true
ProtectKernelTunables=true
ProtectKernelModules=true
ProtectControlGroups=true
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
RestrictNamespaces=true
LockPersonality=true
# It dials out, listens on loopback ports above 1024 and writes its own state: no capability.
CapabilityBoundingSet=

[Install]
WantedBy=multi-user.target
UNIT
unit_before=$changed
put_file "$work/unit" "$UNIT" 0644

# --- 4. kubelet: the pool's labels and taints. ----------------------------------------------
cat >"$work/dropin" <<DROPIN
# Written by Tether's install.sh. kubeadm's kubelet unit (10-kubeadm.conf) starts kubelet with
# \$KUBELET_EXTRA_ARGS; $STATE/kubelet.env, written by \`tunnel-edge join\`, sets it to the
# node pool's --node-labels and --register-with-taints. Read after /etc/default/kubelet and
# /etc/sysconfig/kubelet, so it wins over a KUBELET_EXTRA_ARGS set there: merge by hand.
[Service]
EnvironmentFile=-$STATE/kubelet.env
DROPIN
put_file "$work/dropin" "$KUBELET_DROPIN" 0644
for f in /etc/default/kubelet /etc/sysconfig/kubelet; do
    if [ -f "$root$f" ] && grep -q '^KUBELET_EXTRA_ARGS=..' "$root$f"; then
        say "warning: $f sets KUBELET_EXTRA_ARGS; $STATE/kubelet.env replaces it: merge them"
    fi
done

if [ "$systemd" = yes ]; then
    if [ "$changed" -gt "$unit_before" ]; then
        systemctl daemon-reload
    fi
    systemctl enable --now tunnel-edge.service
    if [ "$changed" -gt 0 ]; then
        systemctl restart tunnel-edge.service
    fi
else
    say "--no-systemd: start it with: $BIN run --config $CONF --state-dir $STATE"
fi

# --- 5. The node pool's user script. --------------------------------------------------------
if [ -n "$user_script" ]; then
    put_file "$user_script" "$USER_SCRIPT" 0755
    sum=$(cksum <"$root$USER_SCRIPT")
    if [ -f "$root$USER_SCRIPT_DONE" ] && [ "$(cat "$root$USER_SCRIPT_DONE")" = "$sum" ]; then
        :
    else
        make_dir "$LOG_DIR"
        record file "$LOG_DIR/user-script.log"
        say "running the user script (output in $LOG_DIR/user-script.log)"
        {
            echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) user script"
        } >>"$root$LOG_DIR/user-script.log"
        if TETHER_ROOT=$root sh "$root$USER_SCRIPT" >>"$root$LOG_DIR/user-script.log" 2>&1; then
            echo "$sum" >"$work/done"
            put_file "$work/done" "$USER_SCRIPT_DONE" 0644
        else
            die "the user script failed (see $root$LOG_DIR/user-script.log); a re-run runs it again"
        fi
    fi
fi

if [ "$changed" -eq 0 ]; then
    say "nothing to do: node $node_name is already installed and up to date"
else
    say "node $node_name installed ($changed changes)"
fi
