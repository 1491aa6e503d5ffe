# Sourced by launch/*.sh: the python to use, and the environment every launcher needs.
# Only fills what is unset; see launch/README.md for each variable.
LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$LAUNCH_DIR/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
  if [ -n "${VIRTUAL_ENV:-}" ]; then PYTHON=$VIRTUAL_ENV/bin/python
  elif [ -x "$REPO_DIR/.venv/bin/python" ]; then PYTHON=$REPO_DIR/.venv/bin/python
  else PYTHON=$(command -v python3 || command -v python); fi
fi
BIN_DIR=$(dirname "$PYTHON")

# GPUs: NCCL; none: DeepSpeed's CPU accelerator with gloo.
if [ -z "${NUM_GPUS:-}" ]; then
  NUM_GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
if [ "${NUM_GPUS:-0}" -gt 0 ] && [ "${DS_ACCELERATOR:-}" != cpu ]; then
  NPROC=${NPROC:-$NUM_GPUS}
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
else
  export DS_ACCELERATOR=cpu
  NPROC=${NPROC:-2}
  # ranks x threads should not exceed the cores (oversubscription makes gloo collectives crawl)
  cores=$(nproc 2>/dev/null || echo 1)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / NPROC > 0 ? cores / NPROC : 1 ))}
fi
export MASTER_PORT=${MASTER_PORT:-29500}
case "${MASTER_ADDR:-}" in  # single machine: gloo on loopback (a multi-node job must not pin lo)
  127.*|localhost) export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo} ;;
esac
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$REPO_DIR/.torch_extensions}
export PYTHONUNBUFFERED=1

preflight() {  # preflight --launcher X [...]: exits the script with its message on a problem
  "$PYTHON" "$LAUNCH_DIR/preflight.py" "$@" || exit $?
}
