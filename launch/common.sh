# Sourced by run_local.sh and run_multinode.sh (after they define ROOT and usage): finds torchrun
# ($TORCHRUN, then PATH, then the repo's .venv) and answers -h/--help with the usage and train.py's flags.
if [[ -n "${TORCHRUN:-}" ]]; then
    :
elif command -v torchrun >/dev/null 2>&1; then
    TORCHRUN=torchrun
elif [[ -x "$ROOT/.venv/bin/torchrun" ]]; then
    TORCHRUN="$ROOT/.venv/bin/torchrun"
else
    echo "$(basename "$0"): torchrun not found; install torch or set TORCHRUN=/path/to/torchrun" >&2
    exit 2
fi

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    usage
    echo
    exec "$(dirname "$(command -v "$TORCHRUN")")/python" "$ROOT/launch/train.py" --help
fi
