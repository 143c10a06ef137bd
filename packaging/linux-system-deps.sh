#!/usr/bin/env bash
# Install the Debian packages Velox Studio needs at run time, skipping those present.
#   libopenblas0-pthread: MLX's Linux wheel links the reference BLAS (~45x slower
#   matmul); veloxcore loads OpenBLAS before MLX when it is installed.
#   The rest: Qt's runtime libraries (PySide6 wheels do not bundle them).
set -euo pipefail
missing=()
for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null; then
    echo "warning: not a Debian-like system; please install: ${missing[*]}" >&2
    exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "Installing system packages: ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
