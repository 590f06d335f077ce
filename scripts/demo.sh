#!/usr/bin/env bash
# The main job: set up the environment, then run the default CPU demo — a local swarm of 4 nodes
# on 127.0.0.1 that share rollouts and merge, with a live status table and a summary plot.
# Extra arguments go to `swarmnode local-swarm` (e.g. --nodes 4 --steps 60).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec swarmnode local-swarm "$@"
