#!/usr/bin/env bash
# The main job: set up the environment, then run the default CPU demo — a local swarm of 4 nodes
# on 127.0.0.1 that share rollouts and merge, plus one node alone beside them (same model, same
# share of the cores), with a live status table and a summary + plot of swarm vs alone.
# Extra arguments go to `swarmnode local-swarm` (e.g. --nodes 4 --steps 60, or
# --mix tiny-64:2,tiny-128:1,tiny-128:1:slow=3 for two cohorts and a throttled node).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec swarmnode local-swarm "$@"
