"""Rollout engine throughput, HF vs vLLM on the same model; prints ONE JSON object.

    python scripts/bench_engines.py [--prompts 32] [--n 8] [--max-new-tokens 8] [--model DIR]

Run it with ``.venv-vllm/bin/python`` (``bash scripts/setup_vllm_cpu.sh``) for vLLM's CPU build, or
in an environment with the ``vllm`` extra on a GPU. Without vLLM, ``"vllm": null`` with the reason.

The default model is the head_dim-64 tiny one (``build_vllm_tiny_policy``), which both engines load.
tokens/s counts generated tokens (EOS included, padding excluded), best of ``--repeats``. For vLLM it
also reports how far its per-token logprobs are from the trainer's ``log_softmax(logits / T)`` on the
same tokens (mean and max absolute difference, in the policy's dtype). HF runs first: vLLM's CPU
build lowers the process's torch thread count when it starts (``torch_threads`` says what each had).
Everything but the JSON goes to stderr (vLLM logs to stdout).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch


def measure(engine, prompts: list[str], params, repeats: int) -> tuple[dict[str, float], list]:
    engine.generate(prompts[:2], params)  # warm-up: first-call allocation and kernel selection
    best = float("inf")
    tokens = 0
    out: list = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = engine.generate(prompts, params)
        dt = time.perf_counter() - t0
        tokens = sum(len(s.token_ids) for g in out for s in g)
        best = min(best, dt)
    stats = {
        "seconds": round(best, 4),
        "tokens": tokens,
        "tokens_per_s": round(tokens / best, 1),
        "torch_threads": torch.get_num_threads(),
    }
    return stats, out


@torch.no_grad()
def logprob_agreement(policy, prompts: list[str], out, temperature: float) -> dict[str, float]:
    """|engine logprob - log_softmax(logits / T)| over every generated token, trainer's forward pass."""
    model, tok = policy.model, policy.tokenizer
    device = next(model.parameters()).device
    diffs = []
    for prompt, samples in zip(prompts, out, strict=True):
        prompt_ids = tok.encode(prompt, add_special_tokens=True)
        for s in samples:
            ids = torch.tensor([prompt_ids + s.token_ids], device=device)
            logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float() / temperature
            want = torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt_ids) :, None])[:, 0]
            diffs.append((torch.tensor(s.logprobs, device=device) - want).abs().cpu())
    d = torch.cat(diffs)
    return {"mean_abs_diff": float(d.mean()), "max_abs_diff": float(d.max()), "tokens": d.numel()}


def bench_vllm(model_dir, prompts, params, repeats) -> tuple[dict[str, object] | None, str | None]:
    try:
        import vllm
        from vllm.platforms import current_platform
    except ImportError:
        return (
            None,
            "vllm is not installed (GPU: pip install 'swarmnode[vllm]'; CPU: scripts/setup_vllm_cpu.sh)",
        )
    from swarmnode.engines import make_engine
    from swarmnode.policy import load_policy

    on_cpu = bool(current_platform.is_cpu())
    if not on_cpu and not torch.cuda.is_available():
        return None, "this vLLM build needs a CUDA GPU and none is visible"
    policy = load_policy(model_dir, device="cpu" if on_cpu else "cuda")
    # The tiny model's context is 128 positions; a larger model keeps its own limit.
    options = {"max_model_len": 128} if policy.model.config.max_position_embeddings <= 128 else {}
    t0 = time.perf_counter()
    engine = make_engine("vllm", policy, **options)
    load_s = time.perf_counter() - t0
    try:
        stats, out = measure(engine, prompts, params, repeats)
    finally:
        engine.close()
    result: dict[str, object] = {
        **stats,
        "device": "cpu" if on_cpu else "cuda",
        "version": vllm.__version__,
        "load_seconds": round(load_s, 1),
        "dtype": str(next(policy.model.parameters()).dtype).removeprefix("torch."),
        "logprobs_vs_trainer": logprob_agreement(policy, prompts, out, params.temperature),
    }
    return result, None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", type=Path, default=None, help="model dir (default: build the tiny one)")
    ap.add_argument("--no-vllm", action="store_true", help="measure the HF engine only")
    args = ap.parse_args()

    # One JSON object on stdout: keep a handle on it, and send everything else (vLLM logs) to stderr.
    json_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    from swarmnode.engines import SamplingParams, make_engine
    from swarmnode.policy import load_policy
    from swarmnode.tasks import get_family

    model_dir = args.model
    if model_dir is None:
        from swarmnode.tinymodel import build_vllm_tiny_policy

        model_dir = build_vllm_tiny_policy(
            Path(tempfile.gettempdir()) / "swarmnode-tiny-vllm-add", family="add"
        )
    family = get_family("add")
    prompts = [family.problem(0, i).prompt for i in range(args.prompts)]
    params = SamplingParams(n=args.n, max_new_tokens=args.max_new_tokens, temperature=1.0, seed=0)
    result: dict[str, object] = {
        "model": str(model_dir),
        "prompts": args.prompts,
        "n": args.n,
        "max_new_tokens": args.max_new_tokens,
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
    }
    policy = load_policy(model_dir, device="cuda" if torch.cuda.is_available() else "cpu")
    hf = make_engine("hf", policy)
    try:
        result["hf"], _ = measure(hf, prompts, params, args.repeats)
    finally:
        hf.close()
    del policy
    if args.no_vllm:
        result["vllm"], result["vllm_reason"] = None, "--no-vllm"
    else:
        result["vllm"], reason = bench_vllm(model_dir, prompts, params, args.repeats)
        if reason is not None:
            result["vllm_reason"] = reason
    json_out.write(json.dumps(result) + "\n")
    json_out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
