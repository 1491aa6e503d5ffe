# Sourced by docker/*.sh: which container engine, and the flags this kind of machine needs.
#   ENGINE=podman|docker (default: podman if installed, else docker)
#   PODMAN_RUNTIME: OCI runtime for podman (default runc when installed: Debian's podman has no crun)
# Sets ENGINE, ENGINE_CMD (array), ENGINE_ULIMITS (array, for build and run), engine_image_exists.
ENGINE=${ENGINE:-$(command -v podman >/dev/null && echo podman || echo docker)}
command -v "$ENGINE" >/dev/null || { echo "no container engine ($ENGINE): run scripts/install-system-deps.sh docker" >&2; exit 1; }
ENGINE_CMD=("$ENGINE")
ENGINE_ULIMITS=()
if [ "$ENGINE" = podman ]; then
  PODMAN_RUNTIME=${PODMAN_RUNTIME:-$(command -v crun >/dev/null && echo crun || echo runc)}
  ENGINE_CMD+=(--runtime "$PODMAN_RUNTIME")
  # podman's defaults ask for more open files than the hard limit here: stay within it.
  nofile=$(ulimit -Hn); [ "$nofile" = unlimited ] && nofile=1048576
  ENGINE_ULIMITS=(--ulimit "nofile=$nofile:$nofile" --ulimit nproc=32768:32768)
fi
engine_image_exists() {
  if [ "$ENGINE" = podman ]; then "${ENGINE_CMD[@]}" image exists "$1"
  else "${ENGINE_CMD[@]}" image inspect "$1" >/dev/null 2>&1; fi
}
