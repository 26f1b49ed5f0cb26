#!/usr/bin/env bash
# Run the leo_dist training demo on this machine: NPROC ranks, gloo on CPU (nccl when CUDA is
# available, as launch/train.py picks by default), rendezvous on a free local port (--standalone).
#
# Usage: launch/run_local.sh [train.py flags...]
#   NPROC      ranks to start (default: 2)
#   TORCHRUN   torchrun to use (default: torchrun on PATH, else .venv/bin/torchrun)
#
# Examples:
#   launch/run_local.sh --preset tiny --steps 200
#   NPROC=4 launch/run_local.sh --optimizer sharded_lion --grad-comm bf16
#   launch/run_local.sh --help          # every train.py flag
set -euo pipefail

usage() {
    # The header comment above, without its '# ' prefixes.
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
}

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NPROC="${NPROC:-2}"
if ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
    echo "run_local.sh: NPROC must be a positive integer, got '$NPROC'" >&2
    usage >&2
    exit 2
fi

# shellcheck source=launch/common.sh
source "$ROOT/launch/common.sh"

# Ranks share this machine's cores; one intra-op thread each avoids oversubscription (torchrun
# sets this too, with a warning; an explicit value from the caller wins).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
cd "$ROOT"
exec "$TORCHRUN" --standalone --nproc-per-node "$NPROC" launch/train.py "$@"
