#!/usr/bin/env bash
# Install Debian's chromium for the browser test of `llava-ft serve` (tests/test_serve.py). Idempotent: returns
# at once when a chromium is already there. Playwright drives this binary (executable_path); it downloads no
# browser of its own. Needs root (apt-get); without it, it says so and the browser test skips.
set -euo pipefail
for bin in "${CHROMIUM:-}" /usr/bin/chromium /usr/bin/chromium-browser; do
  if [ -n "$bin" ] && [ -x "$bin" ]; then
    exit 0
  fi
done
if [ "$(id -u)" -ne 0 ] && ! command -v sudo >/dev/null; then
  echo "setup_browser: chromium is missing and this user cannot apt-get install it; the browser test will skip" >&2
  exit 0
fi
SUDO=$([ "$(id -u)" -eq 0 ] && echo "" || echo "sudo")
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q >/dev/null
$SUDO apt-get install -y -q --no-install-recommends chromium >/dev/null
echo "setup_browser: $(/usr/bin/chromium --version 2>/dev/null || echo 'chromium installed')"
