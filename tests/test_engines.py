from __future__ import annotations

import pytest
import torch

from swarmnode.engines import RolloutEngine, SamplingParams, make_engine
from swarmnode.policy import load_policy

PROMPTS = ["12+34=", "rev:abc=", "7+8="]


@pytest.fixture
def policy(tiny_policy_dir):
    return load_policy(tiny_policy_dir)


@pytest.fixture
def engine(policy):
    eng = make_engine("hf", policy)
    yield eng
    eng.close()


def test_sampling_params_validate():
    for bad in ({"n": 0}, {"max_new_tokens": 0}, {"temperature": -1.0}, {"top_p": 0.0}, {"seed": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)
    with pytest.raises(ValueError, match="kind"):
        make_engine("nope", None)


def test_shapes_and_eos_handling(engine, policy):
    assert isinstance(engine, RolloutEngine)
    eos, pad = policy.tokenizer.eos_token_id, policy.tokenizer.pad_token_id
    out = engine.generate(PROMPTS, SamplingParams(n=3, max_new_tokens=6, temperature=1.0, seed=0))
    assert len(out) == len(PROMPTS)
    for samples in out:
        assert len(samples) == 3
        for s in samples:
            assert 1 <= len(s.token_ids) <= 6
            assert len(s.logprobs) == len(s.token_ids)
            assert pad not in s.token_ids
            assert eos not in s.token_ids[:-1]  # nothing after EOS
            assert "<eos>" not in s.text
            assert "<pad>" not in s.text
            assert s.text == policy.tokenizer.decode(s.token_ids, skip_special_tokens=True)
            assert all(lp <= 0.0 for lp in s.logprobs)


def test_same_seed_same_samples(engine):
    params = SamplingParams(n=4, max_new_tokens=6, temperature=1.0, seed=123)
    a = engine.generate(PROMPTS, params)
    b = engine.generate(PROMPTS, params)
    assert [[s.token_ids for s in g] for g in a] == [[s.token_ids for s in g] for g in b]
    c = engine.generate(PROMPTS, SamplingParams(n=4, max_new_tokens=6, temperature=1.5, seed=124))
    assert [[s.token_ids for s in g] for g in a] != [[s.token_ids for s in g] for g in c]


def test_greedy_is_deterministic_without_seed(engine):
    params = SamplingParams(n=1, max_new_tokens=6, temperature=0.0)
    assert [g[0].token_ids for g in engine.generate(PROMPTS, params)] == [
        g[0].token_ids for g in engine.generate(PROMPTS, params)
    ]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_a_forward_pass(engine, policy, temperature):
    tok, model = policy.tokenizer, policy.model
    out = engine.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=5, temperature=temperature, seed=5))
    for prompt, samples in zip(PROMPTS, out, strict=True):
        prompt_ids = tok.encode(prompt, add_special_tokens=True)
        for s in samples:
            ids = torch.tensor([prompt_ids + s.token_ids])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float() / temperature
            want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(s.token_ids)[:, None])[:, 0]
            assert torch.allclose(torch.tensor(s.logprobs), want, atol=1e-4)


def test_update_weights_changes_outputs(engine, policy, tiny_policy_dir):
    params = SamplingParams(n=1, max_new_tokens=6, temperature=0.0)
    before = engine.generate(PROMPTS, params)
    other = load_policy(tiny_policy_dir).model
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.5, alpha=1.0)
    engine.update_weights(other.named_parameters())
    assert torch.equal(policy.model.model.embed_tokens.weight, other.model.embed_tokens.weight)
    after = engine.generate(PROMPTS, params)
    assert [g[0].token_ids for g in before] != [g[0].token_ids for g in after]
    # The engine's own parameters are shared: passing them again is a no-op, not an error.
    engine.update_weights(policy.model.named_parameters())
    with pytest.raises(KeyError, match="no tensor named"):
        engine.update_weights([("nope", torch.zeros(1))])


def test_global_rng_is_left_alone(engine):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    engine.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=3, seed=9))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.gpu
def test_vllm_engine_generates(tiny_policy_dir):
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("vLLM needs a CUDA GPU")
    policy = load_policy(tiny_policy_dir)
    eng = make_engine("vllm", policy, gpu_memory_utilization=0.3)
    try:
        out = eng.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=6, temperature=1.0, seed=0))
        assert [len(g) for g in out] == [2, 2, 2]
        assert all(len(s.logprobs) == len(s.token_ids) for g in out for s in g)
        eng.update_weights(policy.model.named_parameters())
    finally:
        eng.close()


def test_vllm_missing_extra_is_a_clear_error(policy):
    try:
        import vllm  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("vllm is installed here")
    with pytest.raises(ImportError, match=r"pip install 'swarmnode\[vllm\]'"):
        make_engine("vllm", policy)


def test_a_padded_vocabulary_is_never_sampled_and_the_trainer_sees_the_same_distribution(tmp_path):
    # Real models pad their output layer past the tokenizer (Qwen2.5: 151,936 rows for 151,665 tokens); a
    # random model of real size puts nearly all its mass there. Both the sampler and the trainer mask it.
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from swarmnode.tinymodel import build_tokenizer
    from swarmnode.trainer import GRPOConfig, Trainer, _Row

    tok = build_tokenizer()
    cfg = Qwen2Config(
        vocab_size=len(tok) + 4000,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    policy = load_policy(tmp_path)
    eng = make_engine("hf", policy)
    out = eng.generate(PROMPTS, SamplingParams(n=4, max_new_tokens=6, temperature=1.0, seed=1))
    ids = [t for g in out for s in g for t in s.token_ids]
    assert ids
    assert max(ids) < len(tok)
    trainer = Trainer(policy, eng, torch.optim.SGD(policy.model.parameters(), lr=0.0), GRPOConfig())
    s = out[1][0]
    row = _Row(
        prompt_ids=tok.encode(PROMPTS[1], add_special_tokens=True),
        completion_ids=s.token_ids,
        advantage=0.0,
        sample_logp=None,
        sender_logp=None,
    )
    with torch.no_grad():
        logp, _mask = trainer._batch_logp([row])
    assert torch.allclose(logp[0, : len(s.token_ids)], torch.tensor(s.logprobs), atol=1e-4)
    eng.close()
