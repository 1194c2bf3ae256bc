#!/usr/bin/env bash
# The test command: installs what it needs, then runs the whole suite (CPU only, gloo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh server,test
bash scripts/setup_browser.sh
.venv/bin/ruff check .
.venv/bin/pp1 diagrams --check
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
