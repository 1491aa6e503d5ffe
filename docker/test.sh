#!/usr/bin/env bash
# make docker-test: lint the Dockerfile, build the CPU image (base image and layers cached), then
# run the 2-rank smoke training inside it with the deepspeed launcher, as the image's non-root
# user, without network (the image must be self-contained), and check it wrote summary.json.
#
#   docker/test.sh            (ENGINE, TAG, PORT, KEEP_VOLUME=1 to keep the run volume)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
cd "$repo"
source "$here/engine.sh"
TAG=${TAG:-padnet-ds:cpu}
PORT=${PORT:-29651}
t0=$(date +%s)

echo "== hadolint"
"$here/lint.sh"

echo "== build $TAG"
"$here/build.sh" --variant cpu --tag "$TAG"
t1=$(date +%s)

echo "== non-root check"
uid=$("${ENGINE_CMD[@]}" run --rm "${ENGINE_ULIMITS[@]}" --network none --entrypoint id "$TAG" -u)
[ "$uid" != 0 ] || { echo "docker-test: FAIL: the image runs as root" >&2; exit 1; }
echo "image user uid=$uid"

echo "== 2-rank smoke training in the container (deepspeed launcher)"
vol=padnet-docker-test-$$
"${ENGINE_CMD[@]}" volume create "$vol" >/dev/null
cleanup() { [ "${KEEP_VOLUME:-0}" = 1 ] || "${ENGINE_CMD[@]}" volume rm -f "$vol" >/dev/null 2>&1 || true; }
trap cleanup EXIT
run=("${ENGINE_CMD[@]}" run --rm "${ENGINE_ULIMITS[@]}" --network none --shm-size 512m
     -e DS_ACCELERATOR=cpu -e OMP_NUM_THREADS=1 -v "$vol:/workspace/runs")
"${run[@]}" --entrypoint deepspeed "$TAG" \
  --num_accelerators 2 --master_port "$PORT" --module padnet_ds.cli \
  train configs/smoke.yaml output_dir=runs/smoke
t2=$(date +%s)

echo "== check summary.json"
"${run[@]}" --entrypoint python "$TAG" -c '
import json, os, sys
d = json.load(open("runs/smoke/summary.json"))
st = os.stat("runs/smoke/summary.json")
print("summary.json: world_size=%(world_size)s steps=%(steps)s train_loss=%(train_loss).4f "
      "dynamic_ratio=%(dynamic_ratio).3f" % d, "owner_uid=%d" % st.st_uid)
ok = d["world_size"] == 2 and d["steps"] > 0 and st.st_uid == os.getuid() != 0
sys.exit(0 if ok else "summary.json is not a finished 2-rank run written by the non-root user")
'
echo "docker-test: OK (lint+build $((t1 - t0)) s, training run $((t2 - t1)) s)"
