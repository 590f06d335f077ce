#!/usr/bin/env bash
# Sets up the environment and runs every check CI runs: ruff, mypy, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check .
ruff format --check .
# mypy cannot follow the package-dir mapping through an editable install: check the installed layout.
typed=$(mktemp -d)
trap 'rm -rf "$typed"' EXIT
pip install -q --no-deps --target "$typed" .
# Run from inside the installed tree (so the checkout does not shadow it) with the checkout's config.
root=$(pwd)
(cd "$typed" && mypy --config-file "$root/pyproject.toml" -p swarmnode)
set +e
pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: treating as a failure" >&2
  exit 1
fi
exit "$rc"
