#!/usr/bin/env bash
# Run the leo_dist training demo on several machines: NCCL on GPU nodes (default), gloo on CPU
# nodes (BACKEND=gloo). Start this script once on every node, with the same flags and
# environment except NODE_RANK (and, if you set them, LOCAL_ADDR / GLOO_SOCKET_IFNAME).
#
# Usage: NNODES=N NODE_RANK=i MASTER_ADDR=host [MASTER_PORT=29500] launch/run_multinode.sh [train.py flags...]
#    or: NNODES=N RDZV_ENDPOINT=host:port [RDZV_ID=job] launch/run_multinode.sh [train.py flags...]
#
# Environment:
#   NNODES          number of machines (required)
#   NODE_RANK       this machine's index, 0..NNODES-1 (required with MASTER_ADDR; node 0 hosts
#                   the rendezvous). Ignored with RDZV_ENDPOINT, where ranks are assigned on arrival.
#   MASTER_ADDR     address of node 0, reachable from every node (static rendezvous)
#   MASTER_PORT     a free TCP port on node 0 (default: 29500)
#   RDZV_ENDPOINT   host:port of a c10d rendezvous (elastic; used instead of MASTER_ADDR if set).
#                   The node that owns the host's address hosts the rendezvous store (found with
#                   `ip addr`, which also covers a second NIC torch's own hostname check misses).
#   RDZV_ID         job id shared by all nodes of one run, with RDZV_ENDPOINT (default: leo_dist_demo)
#   RDZV_IS_HOST    1/0: force whether this node hosts the c10d store (default: detected as above)
#   NPROC_PER_NODE  ranks per machine (default: number of GPUs nvidia-smi lists, else 1)
#   BACKEND         nccl (default) or gloo: passed to train.py as --backend. A later --backend
#                   among the train.py flags still wins (kept for older command lines).
#   GLOO_SOCKET_IFNAME  with BACKEND=gloo: the interface gloo uses between the nodes (default: the
#                   interface holding MASTER_ADDR/the RDZV_ENDPOINT host on the node that owns it,
#                   else the one `ip route get` picks towards it). gloo otherwise binds to the
#                   address of the machine's hostname, which may not be on the nodes' network.
#   LOCAL_ADDR      this node's address on that network, given to torchrun --local-addr (default:
#                   the address of that interface, with BACKEND=gloo; unset otherwise)
#   TORCHRUN        torchrun to use (default: torchrun on PATH, else .venv/bin/torchrun)
#
# A host name in MASTER_ADDR/RDZV_ENDPOINT must resolve on every node (checked with getent).
# Checkpoints: --checkpoint-dir must be on a filesystem every node can read for --resume.
# NCCL picks the network interface itself; set NCCL_SOCKET_IFNAME (e.g. eth0) if it picks wrong.
#
# Example, two nodes with 8 GPUs each:
#   node0$ NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 NPROC_PER_NODE=8 launch/run_multinode.sh --preset 10m --steps 2000
#   node1$ NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 NPROC_PER_NODE=8 launch/run_multinode.sh --preset 10m --steps 2000
# Two CPU nodes on gloo, c10d rendezvous on node 0 (10.0.0.1), two ranks each:
#   nodeX$ NNODES=2 RDZV_ENDPOINT=10.0.0.1:29400 NPROC_PER_NODE=2 BACKEND=gloo \
#            launch/run_multinode.sh --preset tiny --steps 200 --optimizer sharded_lion --grad-comm bf16
set -euo pipefail

usage() {
    # The header comment above, without its '# ' prefixes.
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
}
die() {
    echo "run_multinode.sh: $*" >&2
    echo >&2
    usage >&2
    exit 2
}
is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }
is_ipv4() { [[ "$1" =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ ]]; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# shellcheck source=launch/common.sh
source "$ROOT/launch/common.sh"

[[ -n "${NNODES:-}" ]] || die "set NNODES (number of machines)"
is_uint "$NNODES" && (( NNODES >= 1 )) || die "NNODES must be a positive integer, got '$NNODES'"

BACKEND="${BACKEND:-nccl}"
[[ "$BACKEND" == nccl || "$BACKEND" == gloo ]] || die "BACKEND must be nccl or gloo, got '$BACKEND'"

if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE=1
    if command -v nvidia-smi >/dev/null 2>&1; then
        gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
        (( gpus > 0 )) && NPROC_PER_NODE="$gpus"
    fi
fi
is_uint "$NPROC_PER_NODE" && (( NPROC_PER_NODE >= 1 )) || die "NPROC_PER_NODE must be a positive integer, got '$NPROC_PER_NODE'"

# host -> its IPv4 address (itself when it is one); dies when it does not resolve.
resolve() {
    local addr
    if is_ipv4 "$1"; then echo "$1"; return; fi
    addr="$(getent ahostsv4 "$1" 2>/dev/null | awk 'NR == 1 { print $1 }')" || true
    [[ -n "$addr" ]] || die "host '$1' does not resolve on this node (add it to /etc/hosts or use its address)"
    echo "$addr"
}
# The interface that owns address $1 on this node, if any.
owner_iface() {
    command -v ip >/dev/null 2>&1 || return 0
    ip -o -4 addr show 2>/dev/null | awk -v a="$1" '{ split($4, p, "/"); if (p[1] == a) { print $2; exit } }'
}

if [[ -n "${RDZV_ENDPOINT:-}" ]]; then
    [[ "$RDZV_ENDPOINT" == *:* ]] || die "RDZV_ENDPOINT must be host:port, got '$RDZV_ENDPOINT'"
    host="${RDZV_ENDPOINT%:*}"
    host_ip="$(resolve "$host")"
    rdzv=(--rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "${RDZV_ID:-leo_dist_demo}")
    if [[ -z "${RDZV_IS_HOST:-}" && -n "$(owner_iface "$host_ip")" ]]; then
        RDZV_IS_HOST=1
    fi
    if [[ -n "${RDZV_IS_HOST:-}" ]]; then
        [[ "$RDZV_IS_HOST" == 0 || "$RDZV_IS_HOST" == 1 ]] || die "RDZV_IS_HOST must be 0 or 1, got '$RDZV_IS_HOST'"
        rdzv+=(--rdzv-conf "is_host=$RDZV_IS_HOST")
    fi
else
    [[ -n "${MASTER_ADDR:-}" ]] || die "set MASTER_ADDR (node 0's address) or RDZV_ENDPOINT"
    [[ -n "${NODE_RANK:-}" ]] || die "set NODE_RANK (0..$((NNODES - 1))) on every node"
    is_uint "$NODE_RANK" && (( NODE_RANK < NNODES )) || die "NODE_RANK must be in 0..$((NNODES - 1)), got '$NODE_RANK'"
    MASTER_PORT="${MASTER_PORT:-29500}"
    is_uint "$MASTER_PORT" && (( MASTER_PORT >= 1 && MASTER_PORT <= 65535 )) || die "MASTER_PORT must be a TCP port, got '$MASTER_PORT'"
    host_ip="$(resolve "$MASTER_ADDR")"
    rdzv=(--node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
fi

if [[ "$BACKEND" == gloo && -z "${GLOO_SOCKET_IFNAME:-}" ]] && command -v ip >/dev/null 2>&1; then
    GLOO_SOCKET_IFNAME="$(owner_iface "$host_ip")"
    if [[ -z "$GLOO_SOCKET_IFNAME" ]]; then
        GLOO_SOCKET_IFNAME="$(ip -o route get "$host_ip" 2>/dev/null | sed -n 's/.* dev \([^ ]*\).*/\1/p')"
    fi
    [[ -n "$GLOO_SOCKET_IFNAME" ]] || die "cannot tell which interface reaches $host_ip; set GLOO_SOCKET_IFNAME"
    export GLOO_SOCKET_IFNAME
fi
if [[ -z "${LOCAL_ADDR:-}" && "$BACKEND" == gloo && -n "${GLOO_SOCKET_IFNAME:-}" ]] && command -v ip >/dev/null 2>&1; then
    LOCAL_ADDR="$(ip -o -4 addr show dev "$GLOO_SOCKET_IFNAME" 2>/dev/null | awk '{ split($4, p, "/"); print p[1]; exit }')"
fi
local_addr=()
[[ -n "${LOCAL_ADDR:-}" ]] && local_addr=(--local-addr "$LOCAL_ADDR")

cd "$ROOT"
exec "$TORCHRUN" --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" "${rdzv[@]}" "${local_addr[@]}" \
    launch/train.py --backend "$BACKEND" "$@"
