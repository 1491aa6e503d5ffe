#!/usr/bin/env bash
# torchrun (torch.distributed.run): NPROC ranks on this node; for several nodes run it on each
# with NNODES, NODE_RANK and the same MASTER_ADDR/MASTER_PORT (static rendezvous).
#
#   launch/torchrun.sh train configs/smoke.yaml output_dir=runs/x
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 launch/torchrun.sh train configs/default.yaml   # on node 1
#
# Env: NPROC (per node), NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), MASTER_PORT (29500),
# TORCHRUN_ARGS (extra flags).
set -euo pipefail
export MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
source "$(dirname "$0")/env.sh"
NNODES=${NNODES:-1} NODE_RANK=${NODE_RANK:-0}
preflight --launcher torchrun --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"
# shellcheck disable=SC2086
exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" \
  --nproc_per_node "$NPROC" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  ${TORCHRUN_ARGS:-} -m padnet_ds.cli "$@"
