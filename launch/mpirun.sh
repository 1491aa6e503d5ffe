#!/usr/bin/env bash
# Open MPI's mpirun, ranks discovered through mpi4py: `python -m mpi4py -m padnet_ds.cli` aborts
# the whole job when one rank fails (plain `python` would leave the others hanging in a collective).
# padnet_ds maps OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK} to RANK/WORLD_SIZE/LOCAL_RANK itself.
#
#   launch/mpirun.sh train configs/smoke.yaml output_dir=runs/x                 # one node, NPROC ranks
#   HOSTFILE=launch/hostfile MASTER_ADDR=node0 launch/mpirun.sh train ...      # nodes of HOSTFILE
#
# Env: NPROC (total ranks), HOSTFILE (Open MPI reads the same 'host slots=N' format), MASTER_ADDR
# (the first rank's host; default 127.0.0.1 on one node), MASTER_PORT (29500), MPI_ARGS (extra flags).
set -euo pipefail
[ -n "${HOSTFILE:-}" ] || export MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}  # one node
source "$(dirname "$0")/env.sh"
mpi=(-np "$NPROC")
if [ -n "${HOSTFILE:-}" ]; then
  : "${MASTER_ADDR:?set MASTER_ADDR to the address of the first host (rank 0) in HOSTFILE}"
  preflight --launcher mpirun --hostfile "$HOSTFILE" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"
  mpi+=(--hostfile "$HOSTFILE" --mca btl self,vader,tcp)
else
  export MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
  preflight --launcher mpirun --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"
  # one machine: shared memory between ranks, MPI's own wiring on loopback; --oversubscribe lets
  # NPROC exceed the cores Open MPI counts.
  mpi+=(--oversubscribe --mca btl self,vader --mca oob_tcp_if_include lo)
fi
if [ "$(id -u)" = 0 ]; then mpi+=(--allow-run-as-root); fi
for v in MASTER_ADDR MASTER_PORT DS_ACCELERATOR OMP_NUM_THREADS GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME \
         NCCL_DEBUG TORCH_EXTENSIONS_DIR PYTHONUNBUFFERED PATH; do
  if [ -n "${!v:-}" ]; then mpi+=(-x "$v"); fi
done
# shellcheck disable=SC2086
exec mpirun "${mpi[@]}" ${MPI_ARGS:-} "$PYTHON" -m mpi4py -m padnet_ds.cli "$@"
