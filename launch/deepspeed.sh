#!/usr/bin/env bash
# The deepspeed launcher: one node (NPROC ranks), or every node of HOSTFILE from this one
# (over pdsh/ssh by default; DS_MULTINODE=openmpi|mvapich|slurm|... picks another transport).
#
#   launch/deepspeed.sh train configs/smoke.yaml output_dir=runs/x          # one node, NPROC ranks
#   HOSTFILE=launch/hostfile MASTER_ADDR=node0 launch/deepspeed.sh train configs/default.yaml
#
# Env: NPROC (default: GPUs, or 2 on CPU), MASTER_PORT (29500), MASTER_ADDR (one node: 127.0.0.1;
# multi-node: default the first host), HOSTFILE, DS_MULTINODE, DS_ARGS (extra launcher flags).
# Everything after the script name goes to `padnet-ds`.
set -euo pipefail
[ -n "${HOSTFILE:-}" ] || export MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}  # one node
source "$(dirname "$0")/env.sh"
args=(--master_port "$MASTER_PORT")
if [ -n "${HOSTFILE:-}" ]; then
  transport=${DS_MULTINODE:-pdsh}
  preflight --launcher deepspeed --hostfile "$HOSTFILE" --multinode-launcher "$transport" \
    ${MASTER_ADDR:+--master-addr "$MASTER_ADDR"} --master-port "$MASTER_PORT"
  args+=(--hostfile "$HOSTFILE" --launcher "$transport")
  if [ -n "${MASTER_ADDR:-}" ]; then args+=(--master_addr "$MASTER_ADDR"); fi
else
  export MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
  preflight --launcher deepspeed --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"
  # On CPU the launcher counts no accelerators and would start one process: say how many.
  args+=(--num_accelerators "$NPROC" --master_addr "$MASTER_ADDR")
fi
# shellcheck disable=SC2086
exec "$BIN_DIR/deepspeed" "${args[@]}" ${DS_ARGS:-} --module padnet_ds.cli "$@"
