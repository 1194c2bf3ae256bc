#!/usr/bin/env bash
# Run the main job on its embedded default: CPU, gloo, the tiny reference model, 1 front + 2 mesh ranks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/pp1 run "$@"
