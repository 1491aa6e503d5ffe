#!/usr/bin/env bash
# System packages the project needs beyond Python (Debian/Ubuntu, run as root or with sudo).
#
#   scripts/install-system-deps.sh            # launch: Open MPI (mpirun + mpi4py's libmpi) and pdsh
#   scripts/install-system-deps.sh docker     # docker: podman + runc + debootstrap (make docker-test)
#   scripts/install-system-deps.sh all        # both
#
# Idempotent and quick when everything is present (no apt-get update then). CI (.ci/run) calls it
# with no argument before `make test`, so the mpirun / pdsh launcher tests run instead of skipping.
set -euo pipefail

group=${1:-launch}
launch_pkgs=(openmpi-bin libopenmpi-dev pdsh)
docker_pkgs=(podman runc debootstrap uidmap fuse-overlayfs)
case "$group" in
  launch) pkgs=("${launch_pkgs[@]}") ;;
  docker) pkgs=("${docker_pkgs[@]}") ;;
  all) pkgs=("${launch_pkgs[@]}" "${docker_pkgs[@]}") ;;
  *) echo "usage: $0 [launch|docker|all]" >&2; exit 2 ;;
esac

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-system-deps: $group packages already installed"
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "install-system-deps: no apt-get here; install by hand: ${missing[*]}" >&2
  exit 1
fi
SUDO=
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null; then SUDO=sudo; else
    echo "install-system-deps: need root (or sudo) to install: ${missing[*]}" >&2; exit 1
  fi
fi
echo "install-system-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# Wait for other apt runs instead of failing on the dpkg lock.
APT=(-o DPkg::Lock::Timeout=600 -y -q)
$SUDO apt-get "${APT[@]}" update
$SUDO apt-get "${APT[@]}" install --no-install-recommends "${missing[@]}"
