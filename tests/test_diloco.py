"""DiLoCo outer optimiser: matches torch.optim.SGD, replicas converge to identical anchors."""

from __future__ import annotations

import pytest
import torch

from swarmnode.optim.diloco import DiLoCo


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))


def _perturb(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def test_momentum_zero_lr_one_gives_anchor_minus_delta() -> None:
    m = _model()
    outer = DiLoCo(m.named_parameters(), lr=1.0, momentum=0.0)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    delta = {n: torch.full_like(p, 0.5) for n, p in m.named_parameters()}
    outer.outer_step(delta)
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.detach(), before[n] - 0.5)


@pytest.mark.parametrize("nesterov", [True, False])
def test_matches_torch_sgd_on_same_deltas(nesterov: bool) -> None:
    m = _model()
    ref = torch.nn.Parameter(torch.cat([p.detach().flatten() for p in m.parameters()]).clone())
    sgd = torch.optim.SGD([ref], lr=0.7, momentum=0.9, nesterov=nesterov)
    outer = DiLoCo(m.named_parameters(), lr=0.7, momentum=0.9, nesterov=nesterov)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        deltas = {n: torch.randn(p.shape, generator=g) for n, p in m.named_parameters()}
        outer.outer_step(deltas)
        ref.grad = torch.cat([d.flatten() for d in deltas.values()])
        sgd.step()
        got = torch.cat([p.detach().flatten() for p in m.parameters()])
        torch.testing.assert_close(got, ref.detach(), rtol=1e-6, atol=1e-6)


def test_two_replicas_averaging_deltas_end_identical() -> None:
    a, b = _model(), _model()
    oa, ob = DiLoCo(a.named_parameters()), DiLoCo(b.named_parameters())
    assert oa.anchor_hash() == ob.anchor_hash()
    for rnd in range(3):
        _perturb(a, 100 + rnd)
        _perturb(b, 200 + rnd)
        da, db = oa.pseudo_gradient(), ob.pseudo_gradient()
        avg = {n: (da[n] + db[n]) / 2 for n in da}
        oa.outer_step(avg)
        ob.outer_step(avg)
        dist = sum(
            float((pa - pb).detach().abs().sum())
            for pa, pb in zip(a.parameters(), b.parameters(), strict=True)
        )
        assert dist == 0.0
        assert oa.anchor_hash() == ob.anchor_hash()
    assert oa.outer_steps == 3


def test_pseudo_gradient_is_anchor_minus_local() -> None:
    m = _model()
    outer = DiLoCo(m.named_parameters())
    anchor = {n: p.detach().clone() for n, p in m.named_parameters()}
    _perturb(m, 7)
    delta = outer.pseudo_gradient()
    for n, p in m.named_parameters():
        torch.testing.assert_close(delta[n], anchor[n] - p.detach())


def test_state_dict_round_trip_lets_a_joiner_catch_up() -> None:
    a, b = _model(0), _model(5)
    oa, ob = DiLoCo(a.named_parameters()), DiLoCo(b.named_parameters())
    _perturb(a, 3)
    oa.outer_step(oa.pseudo_gradient())
    state = oa.state_dict()
    assert all(isinstance(v, torch.Tensor | int | float | bool) for v in state.values())
    ob.load_state_dict(state)
    assert ob.anchor_hash() == oa.anchor_hash()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    # same momentum too: one more identical step keeps them equal
    delta = {n: torch.ones_like(p) for n, p in a.named_parameters()}
    oa.outer_step(delta)
    ob.outer_step(delta)
    assert ob.anchor_hash() == oa.anchor_hash()


def test_hash_changes_with_weights() -> None:
    m = _model()
    outer = DiLoCo(m.named_parameters())
    h0 = outer.anchor_hash()
    outer.outer_step({n: torch.full_like(p, 1e-3) for n, p in m.named_parameters()})
    assert outer.anchor_hash() != h0


def test_validation_errors_name_the_problem() -> None:
    m = _model()
    outer = DiLoCo(m.named_parameters())
    good = {n: torch.zeros_like(p) for n, p in m.named_parameters()}
    with pytest.raises(ValueError, match="missing"):
        outer.outer_step({k: v for k, v in list(good.items())[1:]})
    bad_shape = dict(good)
    first = next(iter(bad_shape))
    bad_shape[first] = torch.zeros(7)
    with pytest.raises(ValueError, match="shape"):
        outer.outer_step(bad_shape)
    nan = dict(good)
    nan[first] = torch.full_like(good[first], float("nan"))
    with pytest.raises(ValueError, match="non-finite"):
        outer.outer_step(nan)
    with pytest.raises(ValueError, match="lr"):
        DiLoCo(m.named_parameters(), lr=0.0)
    with pytest.raises(ValueError, match="momentum"):
        DiLoCo(m.named_parameters(), momentum=1.0)


def test_bf16_params_keep_fp32_anchor() -> None:
    m = _model().to(torch.bfloat16)
    outer = DiLoCo(m.named_parameters())
    assert all(t.dtype == torch.float32 for t in outer.anchor.values())
    outer.outer_step({n: torch.zeros(p.shape) for n, p in m.named_parameters()})
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())


def test_load_state_from_a_peer_is_checked_and_keeps_own_hyperparams() -> None:
    a, b = _model(0), _model(5)
    oa = DiLoCo(a.named_parameters(), lr=0.7)
    ob = DiLoCo(b.named_parameters(), lr=0.5)
    before = ob.anchor_hash()
    bad = oa.state_dict()
    first = next(k for k in bad if k.startswith("anchor."))
    bad[first] = torch.full_like(bad[first], float("inf"))
    with pytest.raises(ValueError, match="non-finite"):
        ob.load_state_dict(bad)
    assert ob.anchor_hash() == before  # nothing changed on a rejected state
    hostile = oa.state_dict()
    hostile["lr"] = 1e9
    ob.load_state_dict(hostile)
    assert ob.lr == 0.5
    with pytest.raises(ValueError, match="lr"):
        ob.load_state_dict({**hostile, "lr": -1.0}, load_hyperparams=True)
    assert ob.shapes() == {n: tuple(p.shape) for n, p in b.named_parameters()}


def test_outer_step_carries_progress_made_after_publishing() -> None:
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 3)
    outer = DiLoCo(m.named_parameters(), lr=0.7, momentum=0.9)
    anchor0 = {n: t.clone() for n, t in outer.anchor.items()}
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # inner steps of the round
    published = outer.pseudo_gradient()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # inner steps while the round collects
    after_publish = {n: p.detach().clone() for n, p in m.named_parameters()}
    avg = {n: torch.randn_like(t) * 0.05 for n, t in published.items()}
    carried = outer.outer_step(avg, published=published)
    sq = 0.0
    for n, p in m.named_parameters():
        progress = after_publish[n] - (anchor0[n] - published[n])
        sq += float(progress.pow(2).sum())
        # first Nesterov step: buf = Δ, update = Δ + 0.9·Δ
        expected_anchor = anchor0[n] - 0.7 * 1.9 * avg[n]
        torch.testing.assert_close(outer.anchor[n], expected_anchor)
        torch.testing.assert_close(p.detach(), expected_anchor + progress)
    assert carried == pytest.approx(sq**0.5, rel=1e-5)
    assert carried > 0


def test_a_spilled_anchor_and_snapshot_give_the_same_rounds(tmp_path) -> None:
    # Real sizes keep the fp32 anchor in a memory-mapped file and the publish-time snapshot on disk.
    def rounds(spill: object) -> tuple[list[torch.Tensor], list[torch.Tensor], str]:
        m = _model(0).to(torch.bfloat16)
        outer = DiLoCo(m.named_parameters(), lr=0.7, momentum=0.9, spill_dir=spill)  # type: ignore[arg-type]
        for r in range(3):
            _perturb(m, r)
            delta = dict(outer.iter_pseudo_gradient())
            published = outer.local_snapshot()
            _perturb(m, 10 + r)  # inner steps while the round collects
            outer.outer_step_streaming(iter(sorted(delta.items())), published_local=published)
        anchor = [outer.anchor[n].clone() for n in sorted(outer.anchor)]
        return anchor, [p.detach().clone() for _, p in sorted(m.named_parameters())], ""

    a_mem, p_mem, _ = rounds(None)
    a_file, p_file, _ = rounds(tmp_path / "spill")
    assert (tmp_path / "spill" / "anchor.f32").stat().st_size == 4 * sum(t.numel() for t in a_mem)
    assert (tmp_path / "spill" / "published.safetensors").is_file()
    for x, y in zip(a_mem + p_mem, a_file + p_file, strict=True):
        assert torch.equal(x, y)
    assert not all(torch.equal(x, y) for x, y in zip(a_mem, [t.float() for t in p_mem], strict=True))
