#!/usr/bin/env bash
# Build the padnet-ds image with podman (or docker) from the repo root.
#
#   docker/build.sh [--variant cpu|cuda] [--tag T] [--no-cache] [-- extra build args]
#
#   cpu  (default): BASE_IMAGE=python:3.11-slim, tag padnet-ds:cpu. The CPU build of torch is put
#                   in docker/wheels/ first (pip download torch==TORCH_VERSION --no-deps), since
#                   PyPI's default Linux torch is a multi-GB CUDA build.
#   cuda          : BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04, torch from
#                   TORCH_INDEX_URL (default https://download.pytorch.org/whl/cu128), tag padnet-ds:cuda.
#
# Environment: ENGINE (podman|docker; default podman if present), BASE_IMAGE, TORCH_VERSION,
# TORCH_INDEX_URL, USER_UID, LOCAL_BASE (auto|yes|no: with auto, a missing python:*-slim base that
# cannot be pulled is made locally by docker/base/build-base.sh; yes: always use the local stand-in).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
cd "$repo"

variant=cpu tag="" extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --variant) variant=$2; shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    --no-cache) extra+=(--no-cache); shift ;;
    --) shift; extra+=("$@"); break ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "build.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

TORCH_VERSION=${TORCH_VERSION:-2.13.0}
case "$variant" in
  cpu) BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim}; TORCH_INDEX_URL=${TORCH_INDEX_URL:-} ;;
  cuda) BASE_IMAGE=${BASE_IMAGE:-nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04}
        TORCH_INDEX_URL=${TORCH_INDEX_URL-https://download.pytorch.org/whl/cu128} ;;
  *) echo "build.sh: --variant cpu|cuda" >&2; exit 2 ;;
esac
tag=${tag:-padnet-ds:$variant}

source "$here/engine.sh"

# --- the base image: local, pulled, or (python:*-slim only) the debootstrap stand-in
qualified=$BASE_IMAGE
case "$BASE_IMAGE" in */*) ;; *) qualified=docker.io/library/$BASE_IMAGE ;; esac
LOCAL_BASE=${LOCAL_BASE:-auto}
if ! engine_image_exists "$qualified"; then
  if [ "$LOCAL_BASE" != yes ]; then
    echo "build.sh: pulling $qualified"
    "${ENGINE_CMD[@]}" pull "$qualified" >/dev/null 2>&1 || echo "build.sh: cannot pull $qualified"
  fi
  if ! engine_image_exists "$qualified"; then
    case "$qualified:$LOCAL_BASE" in
      *:no) echo "build.sh: base image $BASE_IMAGE is not available and LOCAL_BASE=no" >&2; exit 1 ;;
      docker.io/library/python:3.11-slim:*)
        echo "build.sh: making the local stand-in for $BASE_IMAGE (docker/base/build-base.sh)"
        PODMAN=${ENGINE_CMD[0]} "$here/base/build-base.sh" "$qualified" ;;
      *) echo "build.sh: base image $BASE_IMAGE is neither local nor pullable (no registry?)." \
              "Load it first (docker load / podman load) or pass BASE_IMAGE=..." >&2; exit 1 ;;
    esac
  fi
fi

# --- local wheels: the CPU build of torch (skipped when one for this version is already there)
mkdir -p "$here/wheels"
if [ "$variant" = cpu ] && ! ls "$here/wheels"/torch-"$TORCH_VERSION"[-+]*.whl >/dev/null 2>&1; then
  pip_cmd=(python3 -m pip)
  [ -x "$repo/.venv/bin/python" ] && pip_cmd=("$repo/.venv/bin/python" -m pip)
  echo "build.sh: fetching torch==$TORCH_VERSION (CPU build) into docker/wheels/"
  "${pip_cmd[@]}" download -q --no-deps --only-binary :all: --python-version 3.11 \
    --platform manylinux_2_28_x86_64 ${TORCH_WHEEL_INDEX:+--extra-index-url "$TORCH_WHEEL_INDEX"} \
    -d "$here/wheels" "torch==$TORCH_VERSION" 2>&1 | grep -v "is ignored: it is neither" || true
  whl=$(ls "$here/wheels"/torch-"$TORCH_VERSION"*.whl 2>/dev/null | head -1)
  if [ -z "$whl" ]; then
    echo "build.sh: warning: no torch wheel fetched; the image build takes torch from the index" >&2
  elif [[ "$whl" != *+cpu* ]]; then
    echo "build.sh: warning: $(basename "$whl") is not a +cpu build (set TORCH_WHEEL_INDEX=https://download.pytorch.org/whl/cpu)" >&2
  fi
fi

# --- build
args=(-f docker/Dockerfile -t "$tag" --build-arg "BASE_IMAGE=$qualified" --build-arg "TORCH_VERSION=$TORCH_VERSION")
[ -n "$TORCH_INDEX_URL" ] && args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
[ -n "${USER_UID:-}" ] && args+=(--build-arg "USER_UID=$USER_UID")
if [ "$ENGINE" = podman ]; then
  args+=(--format docker --pull=never --ignorefile docker/Dockerfile.dockerignore "${ENGINE_ULIMITS[@]}")
fi
echo "build.sh: ${ENGINE_CMD[*]} build ${args[*]} ${extra[*]} ."
start=$(date +%s)
"${ENGINE_CMD[@]}" build "${args[@]}" "${extra[@]}" .
echo "build.sh: built $tag in $(( $(date +%s) - start )) s"
