"""Rollout engine throughput on the tiny local policy; prints ONE JSON object.

    python scripts/bench_engines.py [--prompts 32] [--n 8] [--max-new-tokens 8] [--model DIR]

tokens/s counts generated tokens (EOS included, padding excluded). vLLM is measured only when it is
importable and a CUDA GPU is present; otherwise ``"vllm": null`` with the reason.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def measure(engine, prompts: list[str], params, repeats: int) -> dict[str, float]:
    engine.generate(prompts[:2], params)  # warm-up: first-call allocation and kernel selection
    best = float("inf")
    tokens = 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = engine.generate(prompts, params)
        dt = time.perf_counter() - t0
        tokens = sum(len(s.token_ids) for g in out for s in g)
        best = min(best, dt)
    return {"seconds": round(best, 4), "tokens": tokens, "tokens_per_s": round(tokens / best, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", type=Path, default=None, help="model dir (default: build the tiny one)")
    args = ap.parse_args()

    from swarmnode.engines import SamplingParams, make_engine
    from swarmnode.policy import load_policy
    from swarmnode.tasks import get_family

    model_dir = args.model
    if model_dir is None:
        from swarmnode.tinymodel import build_tiny_policy

        model_dir = build_tiny_policy(Path(tempfile.gettempdir()) / "swarmnode-tiny-add")
    family = get_family("add")
    prompts = [family.problem(0, i).prompt for i in range(args.prompts)]
    params = SamplingParams(n=args.n, max_new_tokens=args.max_new_tokens, temperature=1.0, seed=0)
    result: dict[str, object] = {
        "model": str(model_dir),
        "prompts": args.prompts,
        "n": args.n,
        "max_new_tokens": args.max_new_tokens,
        "torch_threads": torch.get_num_threads(),
    }
    policy = load_policy(model_dir)
    hf = make_engine("hf", policy)
    try:
        result["hf"] = measure(hf, prompts, params, args.repeats)
    finally:
        hf.close()
    try:
        import vllm  # noqa: F401
    except ImportError:
        result["vllm"] = None
        result["vllm_reason"] = "vllm is not installed (pip install 'swarmnode[vllm]')"
    else:
        if not torch.cuda.is_available():
            result["vllm"] = None
            result["vllm_reason"] = "no CUDA GPU"
        else:
            gpu_policy = load_policy(model_dir, device="cuda")
            eng = make_engine("vllm", gpu_policy)
            try:
                result["vllm"] = measure(eng, prompts, params, args.repeats)
            finally:
                eng.close()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
