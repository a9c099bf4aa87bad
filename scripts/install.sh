#!/usr/bin/env bash
# Installs everything ntklens needs on a fresh machine: the offline Fashion-MNIST
# package, a CPU build of PyTorch (unless a torch is already importable, e.g. a user's
# CUDA build), and ntklens itself with its development, Ray, Lightning and docs extras.
# Pass --with-browser to also install Chromium, which the report test opens pages in.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

want_browser=0
[ "${1:-}" = "--with-browser" ] && want_browser=1

apt_packages=()
[ -d /usr/share/datasets/fashion-mnist ] || apt_packages+=(dataset-fashion-mnist)
if [ "$want_browser" = 1 ] && ! command -v chromium >/dev/null 2>&1; then
  apt_packages+=(chromium)
fi
if [ "${#apt_packages[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_packages[@]}" >/dev/null
  else
    echo "note: could not install ${apt_packages[*]} (needs root and apt-get);" \
         "ntklens falls back to scikit-learn digits where Fashion-MNIST is missing" >&2
  fi
fi

# An unpinned torch would pull a multi-GB CUDA build; pin the CPU wheel unless one exists.
"$PYTHON" -c "import torch" 2>/dev/null || "$PYTHON" -m pip install -q "torch==2.13.0"
"$PYTHON" -m pip install -q -e ".[dev,ray,lightning,docs]"
