#!/usr/bin/env bash
# Run the leo_dist training demo on several machines over NCCL. Start this script once on every
# node, with the same flags and environment except NODE_RANK.
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
#   RDZV_ENDPOINT   host:port of a c10d rendezvous (elastic; used instead of MASTER_ADDR if set)
#   RDZV_ID         job id shared by all nodes of one run, with RDZV_ENDPOINT (default: leo_dist_demo)
#   NPROC_PER_NODE  ranks per machine (default: number of GPUs nvidia-smi lists, else 1)
#   TORCHRUN        torchrun to use (default: torchrun on PATH, else .venv/bin/torchrun)
#
# train.py gets --backend nccl; pass --backend gloo after it to override (e.g. CPU-only nodes).
# Checkpoints: --checkpoint-dir must be on a filesystem every node can read for --resume.
# NCCL picks the network interface itself; set NCCL_SOCKET_IFNAME (e.g. eth0) if it picks wrong.
#
# Example, two nodes with 8 GPUs each:
#   node0$ NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 NPROC_PER_NODE=8 launch/run_multinode.sh --preset 10m --steps 2000
#   node1$ NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 NPROC_PER_NODE=8 launch/run_multinode.sh --preset 10m --steps 2000
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

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# shellcheck source=launch/common.sh
source "$ROOT/launch/common.sh"

[[ -n "${NNODES:-}" ]] || die "set NNODES (number of machines)"
is_uint "$NNODES" && (( NNODES >= 1 )) || die "NNODES must be a positive integer, got '$NNODES'"

if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE=1
    if command -v nvidia-smi >/dev/null 2>&1; then
        gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
        (( gpus > 0 )) && NPROC_PER_NODE="$gpus"
    fi
fi
is_uint "$NPROC_PER_NODE" && (( NPROC_PER_NODE >= 1 )) || die "NPROC_PER_NODE must be a positive integer, got '$NPROC_PER_NODE'"

if [[ -n "${RDZV_ENDPOINT:-}" ]]; then
    [[ "$RDZV_ENDPOINT" == *:* ]] || die "RDZV_ENDPOINT must be host:port, got '$RDZV_ENDPOINT'"
    rdzv=(--rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "${RDZV_ID:-leo_dist_demo}")
else
    [[ -n "${MASTER_ADDR:-}" ]] || die "set MASTER_ADDR (node 0's address) or RDZV_ENDPOINT"
    [[ -n "${NODE_RANK:-}" ]] || die "set NODE_RANK (0..$((NNODES - 1))) on every node"
    is_uint "$NODE_RANK" && (( NODE_RANK < NNODES )) || die "NODE_RANK must be in 0..$((NNODES - 1)), got '$NODE_RANK'"
    MASTER_PORT="${MASTER_PORT:-29500}"
    is_uint "$MASTER_PORT" && (( MASTER_PORT >= 1 && MASTER_PORT <= 65535 )) || die "MASTER_PORT must be a TCP port, got '$MASTER_PORT'"
    rdzv=(--node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
fi

cd "$ROOT"
exec "$TORCHRUN" --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" "${rdzv[@]}" \
    launch/train.py --backend nccl "$@"
