#!/usr/bin/env bash
# Create .venv and install pp1 with what it needs. Idempotent; safe to run again.
# Prefers a CPU build of torch where no NVIDIA GPU is present (a plain `torch` would pull CUDA).
# Usage: scripts/setup.sh [extras]     e.g. scripts/setup.sh test   or   scripts/setup.sh server,test
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# --no-compile: byte-compiling all of torch at install costs ~40 s; modules compile on first import instead
pipi() { .venv/bin/python -m pip --disable-pip-version-check -q install --no-compile "$@"; }
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found: installing the default (CUDA) torch build" >&2
    pipi "torch>=2.4,<3"
  else
    echo "setup: no GPU: installing a CPU build of torch" >&2
    pipi "torch==2.13.0" 2>/dev/null \
      || pipi --index-url https://download.pytorch.org/whl/cpu "torch>=2.4,<3" 2>/dev/null \
      || pipi "torch>=2.4,<3"
  fi
fi
if [ -n "$extras" ]; then
  pipi -e ".[$extras]"
else
  pipi -e .
fi
