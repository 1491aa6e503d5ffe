#!/usr/bin/env bash
# The deepspeed launcher's per-node mode (--no_ssh): run this once on EVERY node, each with its
# NODE_RANK, all with the same HOSTFILE, MASTER_ADDR (node 0's address) and MASTER_PORT. No
# pdsh or ssh: how the command reaches the nodes is up to you (Slurm, a scheduler, by hand).
#
#   node 0: HOSTFILE=h NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/deepspeed-node.sh train configs/default.yaml
#   node 1: HOSTFILE=h NODE_RANK=1 MASTER_ADDR=10.0.0.1 launch/deepspeed-node.sh train configs/default.yaml
#
# Env: HOSTFILE, NODE_RANK, MASTER_ADDR (required), MASTER_PORT (29500), DS_ARGS.
set -euo pipefail
: "${HOSTFILE:?set HOSTFILE (one line per node: 'host slots=N')}"
: "${NODE_RANK:?set NODE_RANK (0 .. nodes-1)}"
: "${MASTER_ADDR:?set MASTER_ADDR (node 0 address, reachable from every node)}"
source "$(dirname "$0")/env.sh"
preflight --launcher deepspeed --no-ssh --hostfile "$HOSTFILE" --node-rank "$NODE_RANK" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"
# shellcheck disable=SC2086
exec "$BIN_DIR/deepspeed" --hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" ${DS_ARGS:-} --module padnet_ds.cli "$@"
