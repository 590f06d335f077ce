"""Robust aggregation: outliers clipped, bad contributions dropped with reasons, weights respected."""

from __future__ import annotations

import math

import pytest
import torch

from swarmnode import aggregate
from swarmnode.aggregate import (
    aggregate_components,
    bound_weights,
    clip_scales,
    combine,
    robust_aggregate,
    robust_mean,
    sq_norm,
    trim_count,
    trimmed_mean,
)


def _c(value: float, shape: tuple[int, ...] = (4,)) -> dict[str, torch.Tensor]:
    return {"w": torch.full(shape, value), "b": torch.full((2,), value)}


def test_outlier_with_1000x_norm_is_clipped_to_median() -> None:
    honest = [(_c(1.0), 1.0), (_c(1.0), 1.0), (_c(1.0), 1.0)]
    report = robust_aggregate([*honest, (_c(1000.0), 1.0)])
    assert report.clipped == 1
    # the outlier was scaled to the median norm, i.e. became identical to an honest contribution
    torch.testing.assert_close(report.mean["w"], torch.ones(4))
    assert report.clip_norm == pytest.approx(torch.ones(6).norm().item())


def test_nan_and_mismatched_contributions_dropped_with_reasons() -> None:
    nan = _c(1.0)
    nan["w"][0] = float("nan")
    wrong_shape = _c(5.0, shape=(3,))
    missing = {"w": torch.full((4,), 5.0)}
    report = robust_aggregate(
        [(_c(2.0), 1.0), (nan, 1.0), (wrong_shape, 1.0), (missing, 1.0), (_c(2.0), 0.0)]
    )
    assert report.used == 1
    assert report.dropped == {"non_finite": 1, "mismatched": 2, "bad_weight": 1}
    torch.testing.assert_close(report.mean["w"], torch.full((4,), 2.0))


def test_weights_respected() -> None:
    # equal norms, so clipping does nothing and the weighted mean is exact
    a = {"w": torch.tensor([1.0, 0.0])}
    b = {"w": torch.tensor([0.0, 1.0])}
    mean = robust_mean([(a, 3.0), (b, 1.0)])
    torch.testing.assert_close(mean["w"], torch.tensor([0.75, 0.25]))


def test_same_input_order_gives_identical_bits() -> None:
    g = torch.Generator().manual_seed(0)
    contribs = [({"w": torch.randn(50, generator=g)}, float(i + 1)) for i in range(5)]
    m1, m2 = robust_mean(contribs), robust_mean(list(contribs))
    assert torch.equal(m1["w"], m2["w"])


def test_nothing_valid_raises() -> None:
    with pytest.raises(ValueError, match="no valid"):
        robust_mean([({"w": torch.tensor([float("inf")])}, 1.0)])
    with pytest.raises(ValueError, match="no valid"):
        robust_mean([])


def test_trimmed_mean_ignores_extremes() -> None:
    contribs = [({"w": torch.tensor([v])}, 1.0) for v in (1.0, 2.0, 3.0, 4.0, 1e6)]
    out = trimmed_mean(contribs, trim=0.2)
    torch.testing.assert_close(out["w"], torch.tensor([3.0]))
    with pytest.raises(ValueError, match="trim"):
        trimmed_mean(contribs, trim=0.5)


def test_aggregate_components_averages_over_selectors_only() -> None:
    own = {"w": (torch.tensor([[0, 1], [2, 3]]), torch.tensor([[1.0, 2.0], [3.0, 4.0]]))}
    peer = {"w": (torch.tensor([[1, 2], [2, 0]]), torch.tensor([[4.0, 6.0], [5.0, 7.0]]))}
    garbled = {"w": (torch.tensor([[9, 1], [0, 0]]), torch.tensor([[1.0, 1.0], [1.0, 1.0]]))}
    dense = aggregate_components(own, [peer, garbled], n_chunks={"w": 2}, chunk_numel={"w": 4})
    expected = torch.tensor([[1.0, 3.0, 6.0, 0.0], [7.0, 0.0, 4.0, 4.0]])
    torch.testing.assert_close(dense["w"], expected)


def test_expected_shapes_beat_a_colluding_majority() -> None:
    own = {"w": torch.ones(4)}
    forged = {"x": torch.ones(9)}
    report = robust_aggregate([(own, 1.0), (forged, 1.0), (forged, 1.0)], expected={"w": (4,)})
    assert report.used == 1
    assert report.dropped == {"mismatched": 2}
    torch.testing.assert_close(report.mean["w"], torch.ones(4))


# -- the per-tensor pipeline and what each method tolerates ---------------------------------------


def _honest(
    n: int, numel: int = 4096, noise: float = 0.3, seed: int = 0
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A shared direction g and n honest contributions g + noise (as replicas on one task give)."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(numel, generator=gen)
    return g, [g + noise * torch.randn(numel, generator=gen) for _ in range(n)]


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def _pipeline(
    tensors: list[torch.Tensor], weights: list[float], method: str, ceiling: float | None = None
) -> torch.Tensor:
    """What the DiLoCo exchange does per tensor: norms in a first pass, then bound, clip, combine."""
    scales = clip_scales([math.sqrt(sq_norm(t)) for t in tensors])
    if ceiling is not None:
        weights = bound_weights(weights, ceiling)
    return combine(tensors, weights, scales, method=method)


def test_bound_weights_caps_claims_and_zeroes_nonsense() -> None:
    out = bound_weights([25.0, 1e30, float("nan"), float("inf"), -3.0, 0.0, 40], 100.0)
    assert out == [25.0, 100.0, 0.0, 0.0, 0.0, 0.0, 40.0]
    with pytest.raises(ValueError, match="ceiling"):
        bound_weights([1.0], 0.0)


def test_clip_scales_clip_to_the_lower_median_and_leave_out_non_finite_norms() -> None:
    assert clip_scales([1.0, 2.0, 4.0, 100.0]) == [1.0, 1.0, 0.5, 0.02]
    assert clip_scales([3.0, float("nan"), 6.0]) == [1.0, 0.0, 0.5]
    assert clip_scales([float("inf")]) == [0.0]


def test_trim_counts() -> None:
    assert [trim_count(n, "trimmed") for n in (1, 2, 3, 4, 5, 8, 9, 12)] == [0, 0, 1, 1, 1, 2, 2, 3]
    assert [trim_count(n, "median") for n in (1, 2, 3, 4, 8)] == [0, 0, 1, 1, 3]
    assert trim_count(8, "mean") == 0


@pytest.mark.parametrize("method", ["trimmed", "median"])
def test_one_of_four_sending_a_huge_opposite_direction_does_not_steer_robust_methods(method: str) -> None:
    g, honest = _honest(3)
    attacker = -1000.0 * g
    honest_mean = torch.stack(honest).mean(0)
    out = _pipeline([*honest, attacker], [1.0, 1.0, 1.0, 1.0], method)
    assert _cos(out, honest_mean) > 0.9
    assert float(out.norm()) > 0.8 * float(honest_mean.norm())
    # the median-norm clip alone bounds the norm, but the attacker's clipped share still cancels a
    # third of the honest step in the mean
    mean = _pipeline([*honest, attacker], [1.0, 1.0, 1.0, 1.0], "mean")
    assert float(mean.norm()) < 0.6 * float(honest_mean.norm())


def test_weight_1e30_is_bounded_by_the_ceiling_in_the_mean_and_irrelevant_to_trimming() -> None:
    g, honest = _honest(3)
    attacker = -g
    honest_mean = torch.stack(honest).mean(0)
    unbounded = _pipeline([*honest, attacker], [25.0, 25.0, 25.0, 1e30], "mean")
    assert _cos(unbounded, attacker) > 0.999  # what an unchecked manifest weight did
    bounded = _pipeline([*honest, attacker], [25.0, 25.0, 25.0, 1e30], "mean", ceiling=50.0)
    assert _cos(bounded, honest_mean) > 0.5  # the attacker holds at most 50 / 125 of the weight
    trimmed = _pipeline([*honest, attacker], [25.0, 25.0, 25.0, 1e30], "trimmed")
    assert _cos(trimmed, honest_mean) > 0.9
    # unclipped: every coordinate stays inside the honest values' range, whatever the attacker claims
    trimmed = combine([*honest, attacker * 1e6], [25.0, 25.0, 25.0, 1e30], [1.0] * 4, method="trimmed")
    stack = torch.stack(honest)
    assert bool((trimmed >= stack.min(0).values - 1e-6).all())
    assert bool((trimmed <= stack.max(0).values + 1e-6).all())


def test_two_of_eight_byzantine_contributors_are_tolerated_by_the_trimmed_mean() -> None:
    g, honest = _honest(6, seed=3)
    honest_mean = torch.stack(honest).mean(0)
    gen = torch.Generator().manual_seed(9)
    attackers = [-50.0 * g, 1e4 * torch.randn(g.numel(), generator=gen)]
    for method, k in (("trimmed", 2), ("median", 3)):
        assert trim_count(8, method) == k
        out = _pipeline([*honest, *attackers], [1.0] * 8, method)
        assert _cos(out, honest_mean) > 0.9


def test_combine_leaves_out_non_finite_zero_weight_and_zero_scale_contributions() -> None:
    nan = torch.tensor([float("nan"), 1.0])
    a, b = torch.tensor([1.0, 1.0]), torch.tensor([3.0, 3.0])
    for method in ("mean", "trimmed", "median"):
        out = combine(
            [a, nan, b, torch.tensor([9.0, 9.0])], [1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0], method=method
        )
        torch.testing.assert_close(out, torch.tensor([2.0, 2.0]))
    with pytest.raises(ValueError, match="no valid"):
        combine([nan], [1.0], [1.0])
    with pytest.raises(ValueError, match="shape"):
        combine([a, torch.ones(3)], [1.0, 1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="method"):
        combine([a], [1.0], [1.0], method="krum")


@pytest.mark.parametrize("method", ["mean", "trimmed", "median"])
def test_combine_gives_identical_bits_for_identical_inputs_however_it_slices(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, contribs = _honest(5, numel=10_000, seed=4)
    weights = [1.0, 2.0, 3.0, 4.0, 5.0]
    scales = [1.0, 0.5, 1.0, 0.25, 1.0]
    whole = combine(contribs, weights, scales, method=method)
    again = combine([c.clone() for c in contribs], list(weights), list(scales), method=method)
    monkeypatch.setattr(aggregate, "_SLICE", 333)
    sliced = combine(contribs, weights, scales, method=method)
    assert torch.equal(whole, again)
    assert torch.equal(whole, sliced)


def test_robust_aggregate_reports_capped_weights_and_uses_the_method() -> None:
    g, honest = _honest(3, numel=64)
    contribs = [({"w": t}, 10.0) for t in honest] + [({"w": -100.0 * g}, 1e30)]
    report = robust_aggregate(contribs, method="trimmed", ceiling=20.0, expected={"w": (64,)})
    assert report.capped == 1
    assert report.clipped == 2  # the attacker, and the honest norm above the median
    assert report.method == "trimmed"
    assert _cos(report.mean["w"], torch.stack(honest).mean(0)) > 0.9
    # robust_mean is the same pipeline
    same = robust_mean(contribs, method="trimmed", ceiling=20.0, expected={"w": (64,)})
    assert torch.equal(same["w"], report.mean["w"])


def test_aggregate_components_counts_a_repeating_peer_once_and_clips_its_values() -> None:
    own = {"w": (torch.tensor([[0, 1]]), torch.tensor([[1.0, 2.0]]))}
    push = {"w": (torch.tensor([[1]]), torch.tensor([[1e30]]))}
    honest = {"w": (torch.tensor([[1]]), torch.tensor([[2.0]]))}
    kw = {"n_chunks": {"w": 1}, "chunk_numel": {"w": 4}}
    dense = aggregate_components(own, [honest, [push] * 40], **kw)
    # coefficient 1: (2 + 2 + min(1e30, 4 x our largest 2)) / 3 peers that selected it, not / 42
    torch.testing.assert_close(dense["w"], torch.tensor([[1.0, 4.0, 0.0, 0.0]]))


def test_the_combine_adapters_take_folded_coefficients() -> None:
    """(tensors, coefficients summing to 1), the form a streaming merge passes per tensor."""
    g, honest = _honest(3, numel=256)
    tensors = [*honest, -1000.0 * g]
    coefs = [0.25, 0.25, 0.25, 0.25]
    honest_mean = torch.stack(honest).mean(0)
    for fn in (aggregate.trimmed_combine, aggregate.median_combine):
        out = fn(tensors, coefs)
        assert _cos(out, honest_mean) > 0.9
        assert torch.equal(out, fn([t.clone() for t in tensors], list(coefs)))


def test_norm_outliers_are_over_4x_the_median_with_three_or_more_contributors() -> None:
    from swarmnode.aggregate import norm_outliers

    assert norm_outliers([1.0, 2.0, 3.0, 1000.0]) == [False, False, False, True]
    assert norm_outliers([1.0, 2.0, 8.0]) == [False, False, False]  # exactly 4x the median: kept
    assert norm_outliers([1.0, 2.0, 8.01]) == [False, False, True]
    assert norm_outliers([1.0, 1000.0]) == [False, False]  # two: clipping decides, not exclusion
    assert norm_outliers([1.0, float("nan"), 2.0, 3.0]) == [False, True, False, False]
