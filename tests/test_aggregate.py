"""Robust aggregation: outliers clipped, bad contributions dropped with reasons, weights respected."""

from __future__ import annotations

import pytest
import torch

from swarmnode.aggregate import aggregate_components, robust_aggregate, robust_mean, trimmed_mean


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
