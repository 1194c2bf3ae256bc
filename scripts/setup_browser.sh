#!/usr/bin/env bash
# The browser the viewer-page test drives: Debian's chromium (through PyPI playwright, no browser
# download). Installs it with apt when missing; when apt is impossible (not root, no apt, no
# package source) it says so and exits 0: the browser test then skips, naming why.
set -uo pipefail
CHROMIUM="${PP1_CHROMIUM:-/usr/bin/chromium}"
if [ -x "$CHROMIUM" ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "setup_browser: no apt-get: the browser test will skip (install chromium at $CHROMIUM)" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "setup_browser: not root and no sudo: the browser test will skip (apt-get install chromium)" >&2
    exit 0
  fi
fi
echo "setup_browser: installing Debian's chromium (apt-get)" >&2
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get install -y -qq chromium >/dev/null 2>&1; then
  $SUDO apt-get update -qq >/dev/null 2>&1 || true
  $SUDO apt-get install -y -qq chromium >/dev/null 2>&1 \
    || echo "setup_browser: apt-get install chromium failed: the browser test will skip" >&2
fi
exit 0
