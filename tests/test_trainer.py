"""GRPO math on hand-made tensors and a train step on a tiny real torch model with fakes."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from swarmnode.trainer import Group, GRPOConfig, Trainer, clipped_token_loss, group_advantages, k3_kl


def test_advantages_are_group_normalised():
    adv = group_advantages([1.0, 0.0, 0.0, 1.0], eps=0.0)
    assert torch.allclose(adv, torch.tensor([1.0, -1.0, -1.0, 1.0]))
    assert group_advantages([0.5, 0.5, 0.5]) is None  # zero variance: skipped


def test_clip_math_on_hand_made_ratios():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.0, 1.5, 0.5]]))  # ratios 1, 1.5, 0.5
    mask = torch.ones(1, 3)
    # Positive advantage: ratio 1.5 is capped at 1 + 0.28; ratio 0.5 is not (min keeps the lower value).
    loss, st = clipped_token_loss(logp, old, torch.tensor([1.0]), mask, clip_low=0.2, clip_high=0.28)
    assert loss.item() == pytest.approx(-(1.0 + 1.28 + 0.5) / 3)
    assert st["clip_frac"] == pytest.approx(2 / 3)
    # Negative advantage: ratio 0.5 is floored at 0.8 (pessimistic min), 1.5 stays.
    loss, _ = clipped_token_loss(logp, old, torch.tensor([-1.0]), mask, clip_low=0.2, clip_high=0.28)
    assert loss.item() == pytest.approx((1.0 + 1.5 + 0.8) / 3)
    # Masked tokens contribute nothing.
    mask[0, 1:] = 0
    loss, _ = clipped_token_loss(logp, old, torch.tensor([1.0]), mask, clip_low=0.2, clip_high=0.28)
    assert loss.item() == pytest.approx(-1.0)


def test_k3_kl_is_zero_on_identical_policies_and_positive_otherwise():
    a = torch.log(torch.tensor([[0.5, 0.25]]))
    assert k3_kl(a, a, torch.ones(1, 2)) == pytest.approx(0.0)
    assert k3_kl(a, a - 0.3, torch.ones(1, 2)) > 0


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="group_size"):
        GRPOConfig(group_size=1)
    with pytest.raises(ValueError, match="lr"):
        GRPOConfig(lr=0.0)


class CharTokenizer:
    """Bytes as tokens; 0 is padding. Real enough for the trainer's encode/pad path."""

    pad_token_id = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [1 + b for b in text.encode()][:64]


class TinyLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(258, 16)
        self.head = torch.nn.Linear(16, 258)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.head(torch.tanh(self.emb(input_ids))))


@dataclass
class FakeSample:
    text: str
    token_ids: list[int]
    logprobs: list[float]


class FakeEngine:
    name = "fake"

    def __init__(self) -> None:
        self.updates = 0

    def update_weights(self, named_tensors) -> None:
        self.updates += 1
        list(named_tensors)


def _trainer(**kw) -> Trainer:
    policy = SimpleNamespace(model=TinyLM(), tokenizer=CharTokenizer(), fingerprint="f" * 64, path=None)
    opt = torch.optim.AdamW(policy.model.parameters(), lr=3e-2)
    cfg = GRPOConfig(group_size=4, local_groups=1, lr=3e-2, **kw)
    return Trainer(policy, FakeEngine(), opt, cfg)


def _group(texts: list[str], rewards: list[float], source: str = "local", step: int = 0) -> Group:
    tok = CharTokenizer()
    samples = [FakeSample(t, tok.encode(t, False), [-1.0] * len(t)) for t in texts]
    return Group(
        problem=SimpleNamespace(prompt="1+1=", family="add"),
        samples=samples,
        rewards=rewards,
        source=source,
        policy_step=step,
    )


def _seq_logp(tr: Trainer, prompt: str, text: str) -> float:
    rows, _ = tr._rows([_group([text, "x"], [1.0, 0.0])])
    with torch.no_grad():
        lp, mask = tr._batch_logp(rows[:1])
    return float((lp * mask).sum())


def test_train_step_moves_probability_toward_rewarded_text():
    tr = _trainer()
    before_good, before_bad = _seq_logp(tr, "1+1=", "2"), _seq_logp(tr, "1+1=", "7")
    losses = []
    for step in range(8):
        m = tr.train_step([_group(["2", "7", "2", "9"], [1.0, 0.0, 1.0, 0.0], step=step)], [], step=step)
        losses.append(m["loss"])
        assert m["skipped_groups"] == 0
        assert m["tokens_per_s"] > 0
        assert m["kl"] >= 0
    assert _seq_logp(tr, "1+1=", "2") > before_good + 1.0
    assert _seq_logp(tr, "1+1=", "7") < before_bad
    assert tr.engine.updates == 8


def test_zero_variance_group_is_skipped_without_a_step():
    tr = _trainer()
    params = [p.clone() for p in tr.model.parameters()]
    m = tr.train_step([_group(["2", "2", "2", "2"], [1.0] * 4)], [], step=0)
    assert m["skipped_groups"] == 1
    assert tr.engine.updates == 0
    assert all(torch.equal(a, b) for a, b in zip(params, tr.model.parameters(), strict=True))


def test_external_groups_are_retokenised_and_stale_ones_dropped():
    tr = _trainer(staleness_steps=2, ppo_epochs=2)
    ext = _group(["2", "5", "2", "5"], [1.0, 0.0, 1.0, 0.0], source="peerA", step=9)
    ext.samples = [SimpleNamespace(text=s.text) for s in ext.samples]  # text only, as off the wire
    ext.sender_logprobs = [[-0.1], [-5.0], [-0.1], [-5.0]]  # same cohort: truncated IS weights apply
    stale = _group(["3", "4", "3", "4"], [1.0, 0.0, 1.0, 0.0], source="peerB", step=1)
    m = tr.train_step([_group(["2", "2", "2", "2"], [1.0] * 4, step=10)], [ext, stale], step=10)
    assert m["groups_external"] == 1
    assert m["stale_dropped"] == 1
    assert m["skipped_groups"] == 1
    assert m["loss"] != 0.0


@pytest.mark.slow
def test_real_policy_collect_train_evaluate(tiny_policy_dir):
    from swarmnode.engines import make_engine
    from swarmnode.optim import build_optimizer
    from swarmnode.policy import load_policy
    from swarmnode.tasks import heldout_problems

    policy = load_policy(str(tiny_policy_dir))
    engine = make_engine("hf", policy)
    cfg = GRPOConfig(task="add", group_size=4, local_groups=2, max_new_tokens=4, lr=1e-4)
    tr = Trainer(policy, engine, build_optimizer("adamw", policy.model.named_parameters(), cfg), cfg)
    local = tr.collect_local(0)
    assert len(local) == 2
    assert all(len(g.samples) == 4 and all(0.0 <= r <= 1.0 for r in g.rewards) for g in local)
    m = tr.train_step(local, [], step=0)
    # Sampling and training see the same distribution: the KL estimate starts near zero.
    assert m["skipped_groups"] == 2 or abs(m["kl"]) < 1e-3
    acc = tr.evaluate(heldout_problems("add", 8))
    assert 0.0 <= acc <= 1.0
    engine.close()


def test_same_cohort_group_from_the_wire_trains_like_the_local_group(tiny_policy_dir):
    """A peer's group that crossed the network (encode, decode, verify) moves the weights as the same
    group trained locally does: the external path loses nothing and adds nothing."""
    from swarmnode.protocol import codec

    from swarmnode.engines import make_engine
    from swarmnode.exchange.rollouts import encode_batches, to_rollout_group
    from swarmnode.policy import load_policy
    from swarmnode.verify import verify_external

    policy = load_policy(str(tiny_policy_dir))
    engine = make_engine("hf", policy)
    cfg = GRPOConfig(task="reverse", group_size=6, local_groups=4, max_new_tokens=8, lr=1e-2, grad_clip=1e9)
    tr = Trainer(policy, engine, torch.optim.SGD(policy.model.parameters(), lr=1e-2), cfg)
    tok, eos = policy.tokenizer, [policy.tokenizer.eos_token_id]

    def round_trips(s):  # a barely trained model can emit tokens its decoded text does not keep
        return list(s.token_ids) in (tok.encode(s.text, add_special_tokens=False) + e for e in ([], eos))

    groups = [
        g
        for g in tr.collect_local(3)
        if max(g.rewards) > min(g.rewards) and all(round_trips(s) for s in g.samples)
    ]
    assert groups, "no group with a learning signal whose text round-trips"
    wire = encode_batches("peer", policy.fingerprint, 3, [to_rollout_group(g) for g in groups])
    external = []
    for msg in wire:
        got, rejects = verify_external(
            codec.decode(msg), policy.tokenizer, local_fingerprint=policy.fingerprint
        )
        assert not rejects
        external += got
    assert [g.rewards for g in external] == [g.rewards for g in groups]
    assert all(g.sender_logprobs is not None for g in external)  # same cohort: ids and logprobs kept

    start = {k: v.clone() for k, v in policy.model.state_dict().items()}
    tr.train_step(groups, [], step=3)
    after_local = {k: v.clone() for k, v in policy.model.state_dict().items()}
    policy.model.load_state_dict(start)
    tr.train_step([], external, step=3)
    moved = sum(float((after_local[k] - start[k]).norm()) for k in start)
    diff = sum(float((policy.model.state_dict()[k] - after_local[k]).norm()) for k in start)
    assert moved > 0
    assert diff < 1e-3 * moved
    engine.close()


def test_a_gossiping_optimizer_steps_even_without_signal():
    # DeMo's peers may have signal when we have none: their components apply, our momentum goes out.
    tr = _trainer()
    calls = []

    class Gossiping:
        step_without_signal = True

        def zero_grad(self, set_to_none: bool = True) -> None:
            calls.append("zero_grad")

        def step(self) -> None:
            assert all(p.grad is None for p in tr.model.parameters())
            calls.append("step")

    tr.optimizer = Gossiping()  # type: ignore[assignment]
    m = tr.train_step([_group(["2", "2", "2", "2"], [1.0] * 4)], [], step=0)
    assert m["skipped_groups"] == 1
    assert calls == ["zero_grad", "step"]
    assert tr.engine.updates == 1  # whatever the peers moved reaches the rollout engine
