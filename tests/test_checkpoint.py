"""Checkpoints: atomic save, torn/corrupt fallback, pruning, exact resume of a deterministic toy run."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch

from swarmnode.checkpoint import CheckpointManager, optimizer_from_tensors, optimizer_to_tensors
from swarmnode.metrics import MetricsWriter, read_metrics
from swarmnode.replay import ReplayBuffer, ReplayConfig


def test_save_load_roundtrip_and_prune(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=2)
    for step in (1, 2, 3):
        mgr.save(step, {"w": torch.full((2, 3), float(step))}, {"seed": 7})
    step, tensors, state = mgr.load_latest()
    assert step == 3
    assert state["seed"] == 7
    assert torch.equal(tensors["w"], torch.full((2, 3), 3.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002", "step-00000003"]


def test_torn_and_corrupt_checkpoints_fall_back(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=3)
    mgr.save(1, {"w": torch.ones(4)}, {})
    mgr.save(2, {"w": torch.full((4,), 2.0)}, {})
    # A crash mid-save leaves a temp dir behind: it must never be loaded.
    torn = tmp_path / ".tmp-00000009-123"
    torn.mkdir()
    (torn / "tensors.safetensors").write_bytes(b"garbage")
    # A corrupt newest checkpoint (bit rot after rename) falls back to the previous one.
    path = tmp_path / "step-00000002" / "tensors.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    step, tensors, _ = mgr.load_latest()
    assert step == 1
    assert torch.equal(tensors["w"], torch.ones(4))
    # A checkpoint without a manifest (torn directory) is skipped too.
    (tmp_path / "step-00000005").mkdir()
    assert mgr.load_latest()[0] == 1


def test_empty_directory_loads_nothing(tmp_path):
    assert CheckpointManager(tmp_path / "ckpt").load_latest() is None


def _toy(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))


def _train(model, opt, steps: range, seed: int) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(seed * 1000 + step)  # per-step seeding: resume needs no RNG state
        x = torch.randn(16, 4, generator=g)
        loss = ((model(x) - x.sum(1, keepdim=True)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_resume_is_identical_to_uninterrupted_run(tmp_path):
    model_a, opt_a = _toy(0)
    _train(model_a, opt_a, range(10), seed=3)

    model_b, opt_b = _toy(0)
    _train(model_b, opt_b, range(4), seed=3)
    opt_tensors, opt_meta = optimizer_to_tensors(opt_b)
    tensors = {f"model.{k}": v for k, v in model_b.state_dict().items()} | opt_tensors
    CheckpointManager(tmp_path).save(4, tensors, {"optimizer": opt_meta, "seed": 3})
    del model_b, opt_b

    model_c, opt_c = _toy(99)  # different init: everything must come from the checkpoint
    step, tensors, state = CheckpointManager(tmp_path).load_latest()
    model_c.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    optimizer_from_tensors(opt_c, tensors, state["optimizer"])
    _train(model_c, opt_c, range(step, 10), seed=state["seed"])
    for pa, pc in zip(model_a.parameters(), model_c.parameters(), strict=True):
        assert torch.equal(pa, pc)


def test_metrics_jsonl(tmp_path):
    path = tmp_path / "m.jsonl"
    with MetricsWriter(path) as m:
        m.write({"step": 1, "loss": 0.5, "kl": float("nan")})
        m.write({"step": 2, "loss": 0.25})
    rows = read_metrics(path)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["kl"] is None


class _G:
    def __init__(self, source: str, i: int) -> None:
        self.source, self.i = source, i


def test_replay_staleness_bounds_and_sampling():
    buf = ReplayBuffer(ReplayConfig(per_author=3, staleness_steps=2))
    buf.add([_G("a", i) for i in range(5)], step=0)  # only the last 3 kept
    buf.add([_G("b", 0)], step=3)
    assert buf.statistics()["size"] == 4
    assert buf.statistics()["evicted"] == 2
    out = buf.sample(10, now_step=4, rng=random.Random(0))  # a's groups are 4 steps old: stale
    assert [(g.source, g.i) for g in out] == [("b", 0)]
    assert buf.statistics()["stale"] == 3
    assert len(buf) == 0


def test_replay_keeps_only_groups_with_a_learning_signal():
    @dataclass
    class Scored:
        source: str
        rewards: list[float]

    buf = ReplayBuffer()
    buf.add([Scored("a", [1.0, 1.0]), Scored("a", [0.0, 0.0]), Scored("a", [0.0, 0.5])], step=0)
    assert buf.statistics()["uninformative"] == 2
    assert [g.rewards for g in buf.sample(5, now_step=0, rng=random.Random(0))] == [[0.0, 0.5]]
    keep_all = ReplayBuffer(ReplayConfig(informative_only=False))
    keep_all.add([Scored("a", [1.0, 1.0])], step=0)
    assert len(keep_all) == 1


@dataclass
class _Scored:
    source: str
    rewards: list[float]


def test_replay_takes_the_best_solutions_to_the_hardest_problems_first():
    buf = ReplayBuffer(ReplayConfig(staleness_steps=8))
    buf.add([_Scored("a", [0.0, 0.5]), _Scored("a", [1.0, 0.9])], step=0)  # an easy problem, solved
    buf.add([_Scored("b", [0.0, 1.0]), _Scored("b", [0.2, 0.4])], step=1)  # b solved a hard one
    out = buf.sample(3, now_step=1, rng=random.Random(0))
    assert [g.rewards for g in out] == [[0.0, 1.0], [1.0, 0.9], [0.0, 0.5]]
    assert [g.rewards for g in buf.sample(3, now_step=1, rng=random.Random(0))] == [[0.2, 0.4]]


def test_replay_fresh_takes_newest_first_and_authors_take_turns():
    buf = ReplayBuffer(ReplayConfig(staleness_steps=8, prefer="fresh"))
    buf.add([_Scored("a", [0.0, 1.0])], step=0)
    buf.add([_Scored("a", [0.0, 0.1]), _Scored("a", [0.0, 0.2])], step=2)
    buf.add([_Scored("b", [0.0, 0.3]), _Scored("b", [0.0, 0.4])], step=2)
    out = buf.sample(4, now_step=2, rng=random.Random(1))
    # step-2 arrivals first, each author's newest before its older one, authors alternating
    assert {g.source for g in out[:2]} == {"a", "b"}
    assert [g.rewards[1] for g in out if g.source == "a"] == [0.2, 0.1]
    assert [g.rewards[1] for g in out if g.source == "b"] == [0.4, 0.3]
    assert len(buf) == 1
    with pytest.raises(ValueError, match="prefer"):
        ReplayConfig(prefer="random")  # type: ignore[arg-type]


def test_checkpoint_tensors_are_written_one_at_a_time_in_the_safetensors_format(tmp_path) -> None:
    from safetensors.torch import load_file

    from swarmnode.checkpoint import write_safetensors

    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tensors = {
        "w.bf16": torch.randn(5, 3).to(torch.bfloat16),
        "w.t": base.t(),  # not contiguous
        "w.view": base[1],  # shares storage with base
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "empty": torch.zeros(0, 7),
        "mask": torch.tensor([True, False, True]),
        "rng": torch.get_rng_state(),
    }
    write_safetensors(tmp_path / "t.safetensors", tensors)
    back = load_file(str(tmp_path / "t.safetensors"))
    assert sorted(back) == sorted(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype
        assert torch.equal(back[name], t)
    with pytest.raises(ValueError, match="complex"):
        write_safetensors(tmp_path / "c.safetensors", {"z": torch.zeros(2, dtype=torch.complex64)})
