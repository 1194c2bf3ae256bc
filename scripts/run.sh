#!/usr/bin/env bash
# Serve the model on its embedded default: CPU, gloo, the tiny reference model, 1 front + 2 mesh ranks,
# the viewer on http://127.0.0.1:8000/ (Ctrl-C drains and stops). Options go to `pp1 serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh server
exec .venv/bin/pp1 serve "$@"
