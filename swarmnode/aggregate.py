"""Robust aggregation of peers' contributions (DiLoCo pseudo-gradients, DeMo components).

A single bad peer must not be able to move the swarm: contributions with non-finite values or the
wrong names/shapes are dropped (and counted by reason), and each survivor's global L2 norm is clipped
to the median norm before the weighted mean (Templar's rule), so one 1000× outlier contributes at
most as much as a typical peer. Sums run in the caller's order; callers sort by author so every node
produces bit-identical results.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

__all__ = [
    "AggregateReport",
    "aggregate_components",
    "replica_spread",
    "robust_aggregate",
    "robust_mean",
    "trimmed_mean",
]

Contribution = tuple[Mapping[str, torch.Tensor], float]


@dataclass(kw_only=True, slots=True)
class AggregateReport:
    """What ``robust_aggregate`` did: the mean plus why anything was left out."""

    mean: dict[str, torch.Tensor]
    used: int = 0
    dropped: Counter[str] = field(default_factory=Counter)  # reason -> count
    clip_norm: float = 0.0
    clipped: int = 0
    norms: list[float] = field(default_factory=list)  # of the used contributions, before clipping


def _reference(contributions: Sequence[Contribution]) -> dict[str, tuple[int, ...]] | None:
    """Names and shapes most contributors agree on (ties: first seen), so one malformed peer cannot
    make everyone else look mismatched."""
    votes: Counter[tuple[tuple[str, tuple[int, ...]], ...]] = Counter()
    for tensors, _ in contributions:
        try:
            key = tuple(sorted((n, tuple(t.shape)) for n, t in tensors.items()))
        except AttributeError:
            continue
        votes[key] += 1
    if not votes:
        return None
    return dict(votes.most_common(1)[0][0])


def _screen(
    contributions: Sequence[Contribution],
    dropped: Counter[str],
    expected: Mapping[str, Sequence[int]] | None = None,
) -> list[Contribution]:
    ref = (
        {n: tuple(int(d) for d in s) for n, s in expected.items()}
        if expected is not None
        else _reference(contributions)
    )
    kept: list[Contribution] = []
    for tensors, weight in contributions:
        if not isinstance(weight, int | float) or not math.isfinite(weight) or weight <= 0:
            dropped["bad_weight"] += 1
            continue
        if not all(isinstance(t, torch.Tensor) for t in tensors.values()):
            dropped["not_tensor"] += 1
            continue
        if ref is None or {n: tuple(t.shape) for n, t in tensors.items()} != ref:
            dropped["mismatched"] += 1
            continue
        if not all(bool(torch.isfinite(t).all()) for t in tensors.values()):
            dropped["non_finite"] += 1
            continue
        kept.append((tensors, float(weight)))
    return kept


def _global_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    total = 0.0
    for name in sorted(tensors):
        total += float(tensors[name].detach().to(torch.float64).pow(2).sum())
    return math.sqrt(total)


def robust_aggregate(
    contributions: Sequence[Contribution], *, expected: Mapping[str, Sequence[int]] | None = None
) -> AggregateReport:
    """Drop bad contributions, clip each to the median global norm, weighted mean (fp32).

    ``expected`` ({name: shape}, e.g. ``DiLoCo.shapes()``) defines a matching contribution; without
    it the names/shapes most contributors share win, which a colluding majority could pick, so
    callers that know their model should pass it. Raises ``ValueError`` when nothing valid is left
    (the caller skips the round).
    """
    dropped: Counter[str] = Counter()
    kept = _screen(contributions, dropped, expected)
    if not kept:
        raise ValueError(f"no valid contributions to aggregate (dropped: {dict(dropped)})")
    norms = [_global_norm(t) for t, _ in kept]
    clip = float(torch.tensor(norms, dtype=torch.float64).median())
    # torch's median takes the lower middle for even counts: with two peers the smaller norm wins,
    # which is the conservative choice when one of two may be hostile.
    total_w = sum(w for _, w in kept)
    names = sorted(kept[0][0])
    mean = {n: torch.zeros(kept[0][0][n].shape, dtype=torch.float32) for n in names}
    clipped = 0
    for (tensors, w), norm in zip(kept, norms, strict=True):
        scale = 1.0
        if norm > clip > 0:
            scale = clip / norm
            clipped += 1
        coef = w / total_w * scale
        for n in names:
            mean[n].add_(tensors[n].detach().to(device="cpu", dtype=torch.float32), alpha=coef)
    return AggregateReport(
        mean=mean, used=len(kept), dropped=dropped, clip_norm=clip, clipped=clipped, norms=norms
    )


def robust_mean(
    contributions: Sequence[Contribution], *, expected: Mapping[str, Sequence[int]] | None = None
) -> dict[str, torch.Tensor]:
    """The median-norm-clipped weighted mean; see ``robust_aggregate`` for the reasons/counters."""
    return robust_aggregate(contributions, expected=expected).mean


def trimmed_mean(contributions: Sequence[Contribution], *, trim: float = 0.1) -> dict[str, torch.Tensor]:
    """Coordinate-wise trimmed mean (unweighted): drop the ``trim`` fraction of the largest and the
    smallest values in each coordinate. Tolerates up to ``trim`` of peers being arbitrary."""
    if not 0.0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim}")
    kept = _screen(contributions, Counter())
    if not kept:
        raise ValueError("no valid contributions to aggregate")
    k = int(len(kept) * trim)
    out: dict[str, torch.Tensor] = {}
    for n in sorted(kept[0][0]):
        stack = torch.stack([t[n].detach().to(device="cpu", dtype=torch.float32) for t, _ in kept])
        values, _ = stack.sort(dim=0)
        out[n] = values[k : len(kept) - k].mean(dim=0)
    return out


def aggregate_components(
    own: Mapping[str, tuple[torch.Tensor, ...]],
    peers: Sequence[Mapping[str, tuple[torch.Tensor, ...]]],
    *,
    n_chunks: Mapping[str, int],
    chunk_numel: Mapping[str, int],
) -> dict[str, torch.Tensor]:
    """DeMo aggregation to dense ``[n_chunks, chunk_numel]`` coefficients per tensor.

    An entry is ``(idx, vals)`` over all chunks, or ``(idx, vals, start)`` over chunks
    ``[start, start + len(idx))`` (one part of a tensor sent in several messages): ``idx``/``vals``
    are ``[rows, k]`` (top-k coefficient positions within each chunk and their values). Each
    coefficient is averaged over the contributors that selected it, not over all of them, so a
    component only one peer found is not diluted to noise. Entries with the wrong shape, chunk range
    or out-of-range indices, or non-finite values, are skipped for that tensor.
    """
    out: dict[str, torch.Tensor] = {}
    for name in own:
        nc, cn = int(n_chunks[name]), int(chunk_numel[name])
        total = torch.zeros(nc, cn, dtype=torch.float32)
        count = torch.zeros(nc, cn, dtype=torch.float32)
        for comp in [own, *peers]:
            if name not in comp:
                continue
            entry = comp[name]
            idx, vals = entry[0], entry[1]
            start = int(entry[2]) if len(entry) > 2 else 0
            if idx.shape != vals.shape or idx.dim() != 2 or start < 0 or start + idx.shape[0] > nc:
                continue
            if len(entry) == 2 and idx.shape[0] != nc:
                continue
            idx = idx.to(torch.int64).cpu()
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= cn):
                continue
            v = vals.detach().to(dtype=torch.float32, device="cpu")
            if not bool(torch.isfinite(v).all()):
                continue
            rows = slice(start, start + idx.shape[0])
            total[rows].scatter_add_(1, idx, v)
            count[rows].scatter_add_(1, idx, torch.ones_like(v))
        out[name] = torch.where(count > 0, total / count.clamp_min(1.0), total)
    return out


def replica_spread(deltas: Sequence[Mapping[str, torch.Tensor]]) -> float:
    """Mean L2 distance of each Δ from the mean Δ (0.0 for a single replica). With a shared anchor
    θ_i = anchor − Δ_i, so this is exactly the spread of the replicas before a merge."""
    if len(deltas) < 2:
        return 0.0
    sq = [0.0] * len(deltas)
    for name in deltas[0]:
        stack = torch.stack([torch.as_tensor(d[name], dtype=torch.float64) for d in deltas])
        diff = stack - stack.mean(dim=0, keepdim=True)
        for i in range(len(deltas)):
            sq[i] += float(diff[i].pow(2).sum())
    return sum(v**0.5 for v in sq) / len(sq)
