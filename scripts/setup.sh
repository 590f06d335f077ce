#!/usr/bin/env bash
# Creates .venv (if missing) and installs swarmnode with the test extra, CPU torch first so pip
# never pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
pip install -q --upgrade pip >/dev/null
pip install -q "torch==2.13.0"
pip install -q -e ".[test]"
