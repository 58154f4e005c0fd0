#!/usr/bin/env bash
# Create .venv and install the pinned stack into it. Idempotent: a second run with nothing changed
# only compares a stamp (the hash of requirements.txt + setup.py) and returns in about a second.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.llava_ft_stamp
want=$(cat requirements.txt setup.py | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x .venv/bin/python ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
echo "setup: installing the pinned stack into .venv (a few minutes, once)"
# This machine's pip config names local index folders that may be absent: drop those warnings only.
quiet() { "$@" 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }; }
quiet .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
quiet .venv/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
echo "$want" > "$stamp"
echo "setup: .venv ready"
