#!/usr/bin/env bash
# Build a local stand-in for the upstream `python:3.11-slim` image with debootstrap, for machines
# where no container registry is reachable (the Dockerfile itself is unchanged: it says
# FROM python:3.11-slim and finds this image in local storage).
#
# What it makes (Debian bookworm, like the upstream image):
#   - python 3.11 with venv and pip; `python`, `python3`, `pip`, `pip3` on PATH; no PEP 668 marker
#     (the upstream image's pip installs system-wide too); LANG=C.UTF-8; CMD python3
#   - the machine's extra CA certificates (/usr/local/share/ca-certificates/*.crt) added to the
#     system bundle, and /etc/pip.conf pointing pip at that bundle (cert=) with the machine's
#     pip index settings that make sense inside a build (index-url / extra http(s) indexes,
#     timeout), so `pip install` and apt reach the registry through this machine's TLS proxy
#   - apt sources for bookworm, bookworm-updates and bookworm-security, empty package lists
#
# Cached: does nothing when the tag already exists (FORCE=1 rebuilds). Needs root, debootstrap, podman.
#   docker/base/build-base.sh [TAG]     (default docker.io/library/python:3.11-slim)
set -euo pipefail

TAG=${1:-${BASE_TAG:-docker.io/library/python:3.11-slim}}
SUITE=${DEBIAN_SUITE:-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
PODMAN=${PODMAN:-podman}

if [ "${FORCE:-0}" != 1 ] && $PODMAN image exists "$TAG"; then
  echo "build-base: $TAG exists (cached; FORCE=1 to rebuild)"
  exit 0
fi
for tool in debootstrap "$PODMAN"; do
  command -v "$tool" >/dev/null || { echo "build-base: $tool not found: run scripts/install-system-deps.sh docker" >&2; exit 1; }
done
[ "$(id -u)" -eq 0 ] || { echo "build-base: debootstrap needs root" >&2; exit 1; }

root=$(mktemp -d "${TMPDIR:-/var/tmp}/padnet-base.XXXXXX")
trap 'rm -rf "$root"' EXIT
echo "build-base: debootstrap $SUITE into $root ($MIRROR)"
debootstrap --variant=minbase \
  --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates,netbase \
  "$SUITE" "$root" "$MIRROR" >"$root.log" 2>&1 || { tail -30 "$root.log" >&2; exit 1; }
rm -f "$root.log"

# apt sources like the upstream Debian images
rm -f "$root/etc/apt/sources.list"
cat >"$root/etc/apt/sources.list.d/debian.sources" <<SRC
Types: deb
URIs: $MIRROR
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $SECURITY_MIRROR
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC

# The machine's extra CAs (TLS-intercepting proxies, private registries).
shopt -s nullglob
extra=(/usr/local/share/ca-certificates/*.crt)
if [ ${#extra[@]} -gt 0 ]; then
  cp "${extra[@]}" "$root/usr/local/share/ca-certificates/"
  chroot "$root" update-ca-certificates >/dev/null
  echo "build-base: added ${#extra[@]} CA certificate(s): ${extra[*]}"
fi

# pip: the system bundle (which now holds those CAs) instead of certifi's, and the machine's
# network index settings. Local paths (find-links /opt/..., file:// indexes) do not exist in a
# build and are left out.
{
  echo "[global]"
  echo "cert = /etc/ssl/certs/ca-certificates.crt"
  echo "default-timeout = 180"
  echo "disable-pip-version-check = 1"
  for key in index-url extra-index-url trusted-host; do
    val=$(pip3 config get "global.$key" 2>/dev/null || python3 -m pip config get "global.$key" 2>/dev/null || true)
    val=$(printf '%s\n' $val | grep -E '^(https?://|[A-Za-z0-9.-]+$)' | tr '\n' ' ' | sed 's/ $//' || true)
    [ -n "$val" ] && echo "$key = $val"
  done
} >"$root/etc/pip.conf"
echo "build-base: /etc/pip.conf:"; sed 's/^/  /' "$root/etc/pip.conf"

# Behave like the upstream image: pip installs system-wide, no caches, no package lists.
rm -f "$root"/usr/lib/python3*/EXTERNALLY-MANAGED
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/log/* "$root"/tmp/* \
  "$root"/usr/share/doc/* "$root"/usr/share/man/*
find "$root" -name __pycache__ -prune -exec rm -rf {} + 2>/dev/null || true

tar --numeric-owner -C "$root" -c . | $PODMAN import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  --message "debootstrap $SUITE stand-in for python:3.11-slim (padnet-ds docker/base/build-base.sh)" \
  - "$TAG" >/dev/null
echo "build-base: built $TAG ($($PODMAN image inspect --format '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1/1e6}'))"
