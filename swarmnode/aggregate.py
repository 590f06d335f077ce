"""Robust aggregation of peers' contributions (DiLoCo pseudo-gradients, DeMo components).

A single bad peer must not be able to move the swarm. Three layers, each a pure function:

1. ``bound_weights``: a contribution's averaging weight is capped at what the peer could have done
   (the caller passes the plausible samples-per-round ceiling); non-finite or non-positive weights
   become 0, i.e. the contribution is left out. A manifest claiming weight 1e30 counts as the ceiling.
2. ``clip_scales``: each contribution's global L2 norm is clipped to the median norm (Templar's
   rule), so a 1000x outlier contributes at most as much as a typical peer. This bounds the *norm*.
3. ``combine``: one tensor over all contributors, by ``method``:

   - ``"mean"``: the weighted mean of the clipped tensors. Tolerates no Byzantine contributor in
     *direction*: f attackers holding a fraction a of the (bounded) weight move the result by up to
     a x the median norm, in any direction they choose. With honest weights w and ceiling c, one
     attacker's share is at most c / (c + sum(w)).
   - ``"trimmed"`` (coordinate-wise trimmed mean): in every coordinate the ``k`` largest and ``k``
     smallest values are dropped (``k = floor(trim * n)``, at least 1 once there are 3 contributors
     and ``trim > 0``, at most ``(n - 1) // 2``), and the rest averaged with their weights. With at
     most ``k`` Byzantine contributors every coordinate of the result lies between the smallest and
     the largest honest value, whatever the attackers send and whatever weight they claim:
     tolerates f <= k, i.e. f < trim * n (default trim 0.25: 1 of 4, 2 of 8).
   - ``"median"``: the trimmed mean with ``k = (n - 1) // 2`` (the middle one or two values).
     Tolerates f <= (n - 1) // 2, i.e. any minority (1 of 3, 1 of 4, 3 of 8).

   Tolerance counts *contributors*: Sybil identities that each send a Δ count as several, so the
   caller should aggregate one contribution per host it can tell apart (``swarmnode.trust``).

DiLoCo at 0.5 B parameters cannot hold several full fp32 Δ dicts at once, so the per-tensor form is
the primary interface: a first pass sums ``sq_norm`` per contribution and tensor into global norms,
then ``clip_scales`` and ``bound_weights``, then ``combine`` tensor by tensor. ``robust_aggregate``
is that same pipeline over whole dicts. Every function is deterministic: the same inputs in the same
order give the same bits (sums run in the input order; sorts are stable; no reduction depends on the
thread count), so replicas that merged the same contributions land on equal anchors. Callers sort
contributions by author.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

__all__ = [
    "METHODS",
    "AggregateReport",
    "aggregate_components",
    "bound_weights",
    "clip_scales",
    "combine",
    "global_norm",
    "median_combine",
    "norm_outliers",
    "peer_coefficients",
    "replica_spread",
    "robust_aggregate",
    "robust_mean",
    "sq_norm",
    "trim_count",
    "trimmed_combine",
    "trimmed_mean",
]

Contribution = tuple[Mapping[str, torch.Tensor], float]
METHODS = ("mean", "trimmed", "median")
DEFAULT_TRIM = 0.25
# combine() sorts coordinates in slices of this many elements: with 8 contributors a slice holds
# 8 x 2**20 values (+ their sort indices), ~100 MB, instead of the whole 136 M-element embedding.
_SLICE = 1 << 20


# -- the per-tensor pipeline ----------------------------------------------------------------------


def sq_norm(t: torch.Tensor) -> float:
    """Squared L2 norm of one tensor in float64 (sum these per contribution for ``global_norm``)."""
    return float(t.detach().to(torch.float64).pow(2).sum())


def global_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    """L2 norm over every tensor of one contribution, summed in name order (deterministic)."""
    total = 0.0
    for name in sorted(tensors):
        total += sq_norm(tensors[name])
    return math.sqrt(total)


def bound_weights(weights: Sequence[float], ceiling: float) -> list[float]:
    """Each weight capped at ``ceiling`` (what a peer could have processed in a round); weights that
    are not finite numbers > 0 become 0.0 (``combine`` leaves those contributions out)."""
    if not (isinstance(ceiling, int | float) and ceiling > 0):
        raise ValueError(f"ceiling must be > 0, got {ceiling!r}")
    out = []
    for w in weights:
        ok = isinstance(w, int | float) and not isinstance(w, bool) and math.isfinite(w) and w > 0
        out.append(min(float(w), float(ceiling)) if ok else 0.0)
    return out


# A contribution whose global norm is over this many times the median one is no plausible round of
# training (clipping would still let its direction in at the median norm): it is left out.
NORM_OUTLIER_OVER_MEDIAN = 4.0


def norm_outliers(norms: Sequence[float], over: float = NORM_OUTLIER_OVER_MEDIAN) -> list[bool]:
    """Per contribution, whether its norm is over ``over`` x the median (the lower middle) of the
    finite norms; only with 3 or more of them (with two, neither can be told to be the outlier, and
    clipping to the smaller norm is the conservative choice). Non-finite norms are outliers."""
    count, median = _finite_median(norms)
    if count < 3:
        return [not _finite_norm(n) for n in norms]
    return [not _finite_norm(n) or float(n) > over * median for n in norms]


def _finite_norm(n: float) -> bool:
    return math.isfinite(n) and n >= 0


def _finite_median(norms: Sequence[float]) -> tuple[int, float]:
    """(how many norms are finite and >= 0, their median: the lower middle for an even count)."""
    finite = sorted(float(n) for n in norms if _finite_norm(n))
    return len(finite), (finite[(len(finite) - 1) // 2] if finite else 0.0)


def clip_scales(norms: Sequence[float]) -> list[float]:
    """Per contribution, the factor that clips its global norm to the median norm (1.0 at or below
    it). The median is over the finite norms, the lower middle for an even count: with two peers the
    smaller norm wins, the conservative choice when one of two may be hostile. A non-finite norm
    gets 0.0 (the contribution is left out)."""
    count, clip = _finite_median(norms)
    if not count:
        return [0.0] * len(norms)
    out = []
    for n in norms:
        if not _finite_norm(n):
            out.append(0.0)
        elif n > clip > 0:
            out.append(clip / n)
        else:
            out.append(1.0)
    return out


def trim_count(n: int, method: str, trim: float = DEFAULT_TRIM) -> int:
    """How many values ``combine`` drops at each end of every coordinate for ``n`` contributors."""
    if method == "mean" or n < 3:
        return 0
    if method == "median":
        return (n - 1) // 2
    k = int(n * trim)
    if trim > 0:
        k = max(k, 1)
    return min(k, (n - 1) // 2)


def combine(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    scales: Sequence[float],
    *,
    method: str = "mean",
    trim: float = DEFAULT_TRIM,
) -> torch.Tensor:
    """One tensor aggregated over contributors (fp32, on the CPU); see the module docstring for
    what each ``method`` tolerates.

    ``tensors[i] * scales[i]`` is contributor i's clipped value, ``weights[i]`` its (bounded) weight.
    A contributor with weight or scale 0, or with a non-finite value anywhere in this tensor, is
    left out (counted as absent, not as zeros). Raises ``ValueError`` for mismatched lengths or
    shapes, an unknown method, or when nothing is left.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not 0.0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim}")
    if not len(tensors) == len(weights) == len(scales):
        raise ValueError(f"{len(tensors)} tensors, {len(weights)} weights, {len(scales)} scales")
    shape = tuple(tensors[0].shape) if tensors else ()
    kept: list[tuple[torch.Tensor, float, float]] = []
    for t, w, s in zip(tensors, weights, scales, strict=True):
        if tuple(t.shape) != shape:
            raise ValueError(f"shape {tuple(t.shape)} differs from the first contributor's {shape}")
        if not (math.isfinite(w) and math.isfinite(s) and w > 0 and s > 0):
            continue
        v = t.detach().to(device="cpu", dtype=torch.float32)
        if not bool(torch.isfinite(v).all()):
            continue
        kept.append((v, float(w), float(s)))
    if not kept:
        raise ValueError("no valid contributions to combine")
    if method == "mean":
        total = sum(w for _, w, _ in kept)
        out = torch.zeros(shape, dtype=torch.float32)
        for v, w, s in kept:
            out.add_(v, alpha=w / total * s)
        return out
    k = trim_count(len(kept), method, trim)
    if k == 0:  # nothing to trim (fewer than 3 contributors): the weighted mean, without sorting
        return combine(
            [v for v, _, _ in kept], [w for _, w, _ in kept], [s for _, _, s in kept], method="mean"
        )
    scaled = [(v if s == 1.0 else v * s, w) for v, w, s in kept]
    return _trimmed(scaled, shape, k)


def trimmed_combine(tensors: Sequence[torch.Tensor], coefs: Sequence[float]) -> torch.Tensor:
    """``combine(method="trimmed")`` for a caller that folded weights and clip scales into one
    coefficient per contributor (summing to 1): coordinate-wise, the ``trim_count`` largest and
    smallest values are dropped and the rest averaged with their coefficients. The tolerance is
    the trimmed mean's (f <= k contributors), since the kept values lie in the honest range."""
    return combine(tensors, coefs, [1.0] * len(tensors), method="trimmed")


def median_combine(tensors: Sequence[torch.Tensor], coefs: Sequence[float]) -> torch.Tensor:
    """``combine(method="median")`` over (tensors, coefficients); tolerates any minority."""
    return combine(tensors, coefs, [1.0] * len(tensors), method="median")


def _trimmed(kept: list[tuple[torch.Tensor, float]], shape: tuple[int, ...], k: int) -> torch.Tensor:
    """Coordinate-wise: sort the n values, drop k at each end, weighted mean of the rest. Sliced so
    memory stays n x _SLICE whatever the tensor's size; every operation is elementwise or a stable
    sort, so the bits do not depend on slicing or threads."""
    n = len(kept)
    flat = [v.reshape(-1) for v, _ in kept]
    w = torch.tensor([w for _, w in kept], dtype=torch.float32)
    numel = flat[0].numel()
    out = torch.empty(numel, dtype=torch.float32)
    for lo in range(0, numel, _SLICE):
        hi = min(numel, lo + _SLICE)
        stack = torch.stack([f[lo:hi] for f in flat])  # [n, m]
        values, order = stack.sort(dim=0, stable=True)
        ws = w[order]  # each sorted value's weight
        acc = torch.zeros(hi - lo, dtype=torch.float32)
        den = torch.zeros(hi - lo, dtype=torch.float32)
        for j in range(k, n - k):  # summed in rank order, one elementwise op at a time
            acc.add_(values[j] * ws[j])
            den.add_(ws[j])
        out[lo:hi] = acc / den
    return out.reshape(shape)


# -- whole contributions --------------------------------------------------------------------------


@dataclass(kw_only=True, slots=True)
class AggregateReport:
    """What ``robust_aggregate`` did: the aggregate plus why anything was left out."""

    mean: dict[str, torch.Tensor]
    used: int = 0
    dropped: Counter[str] = field(default_factory=Counter)  # reason -> count
    clip_norm: float = 0.0
    clipped: int = 0
    norms: list[float] = field(default_factory=list)  # of the used contributions, before clipping
    capped: int = 0  # weights over the ceiling
    method: str = "mean"


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
        if bound_weights([weight], 1.0)[0] == 0.0:
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


def robust_aggregate(
    contributions: Sequence[Contribution],
    *,
    expected: Mapping[str, Sequence[int]] | None = None,
    method: str = "mean",
    ceiling: float | None = None,
    trim: float = DEFAULT_TRIM,
) -> AggregateReport:
    """Drop bad contributions, bound the weights (``ceiling``), clip each to the median global norm,
    then ``combine`` every tensor by ``method`` (fp32).

    ``expected`` ({name: shape}, e.g. ``DiLoCo.shapes()``) defines a matching contribution; without
    it the names/shapes most contributors share win, which a colluding majority could pick, so
    callers that know their model should pass it. Raises ``ValueError`` when nothing valid is left
    (the caller skips the round).
    """
    dropped: Counter[str] = Counter()
    kept = _screen(contributions, dropped, expected)
    if not kept:
        raise ValueError(f"no valid contributions to aggregate (dropped: {dict(dropped)})")
    raw = [w for _, w in kept]
    weights = raw if ceiling is None else bound_weights(raw, ceiling)
    norms = [global_norm(t) for t, _ in kept]
    scales = clip_scales(norms)
    names = sorted(kept[0][0])
    out = {n: combine([t[n] for t, _ in kept], weights, scales, method=method, trim=trim) for n in names}
    finite = sorted(norms)
    return AggregateReport(
        mean=out,
        used=len(kept),
        dropped=dropped,
        clip_norm=finite[(len(finite) - 1) // 2],
        clipped=sum(1 for s in scales if s < 1.0),
        norms=norms,
        capped=sum(1 for a, b in zip(raw, weights, strict=True) if b < a),
        method=method,
    )


def robust_mean(
    contributions: Sequence[Contribution],
    *,
    expected: Mapping[str, Sequence[int]] | None = None,
    method: str = "mean",
    ceiling: float | None = None,
) -> dict[str, torch.Tensor]:
    """The robust aggregate alone; see ``robust_aggregate`` for the reasons/counters."""
    return robust_aggregate(contributions, expected=expected, method=method, ceiling=ceiling).mean


def trimmed_mean(contributions: Sequence[Contribution], *, trim: float = 0.1) -> dict[str, torch.Tensor]:
    """Coordinate-wise trimmed mean, unweighted and unclipped: drop the ``trim`` fraction of the
    largest and the smallest values in each coordinate (see ``trim_count``)."""
    if not 0.0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim}")
    kept = _screen(contributions, Counter())
    if not kept:
        raise ValueError("no valid contributions to aggregate")
    ones = [1.0] * len(kept)
    return {
        n: combine([t[n] for t, _ in kept], ones, ones, method="trimmed", trim=trim)
        for n in sorted(kept[0][0])
    }


# -- DeMo components ------------------------------------------------------------------------------

# An entry is (idx, vals) over all chunks or (idx, vals, first chunk) over a chunk range.
Entry = tuple[torch.Tensor, ...]
PeerComponents = Mapping[str, Entry] | Sequence[Mapping[str, Entry]]
# A peer's coefficient is clipped to this many times the largest one of our own in that tensor: a
# peer on the same model and optimizer has coefficients of our order; 1e30 is not one.
COEFF_CLIP = 4.0


def _parts(peer: PeerComponents) -> list[Mapping[str, Entry]]:
    return [peer] if isinstance(peer, Mapping) else list(peer)


def peer_coefficients(
    parts: Sequence[Mapping[str, Entry]], name: str, *, n_chunks: int, chunk_numel: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One peer's dense ``[n_chunks, chunk_numel]`` coefficients of tensor ``name`` and the mask of
    the coefficients it selected, from all of its parts; a coefficient it sent several times
    (repeated or overlapping messages) counts once, as the mean of what it sent. Malformed entries
    (wrong shape or chunk range, indices out of range, non-finite values) are skipped. None when
    nothing usable is left."""
    total = torch.zeros(n_chunks, chunk_numel, dtype=torch.float32)
    count = torch.zeros(n_chunks, chunk_numel, dtype=torch.float32)
    any_used = False
    for comp in parts:
        entry = comp.get(name) if isinstance(comp, Mapping) else None
        if entry is None or len(entry) < 2:
            continue
        idx, vals = entry[0], entry[1]
        if not isinstance(idx, torch.Tensor) or not isinstance(vals, torch.Tensor):
            continue
        start = int(entry[2]) if len(entry) > 2 else 0
        if idx.shape != vals.shape or idx.dim() != 2 or start < 0 or start + idx.shape[0] > n_chunks:
            continue
        if len(entry) == 2 and idx.shape[0] != n_chunks:
            continue
        idx = idx.to(torch.int64).cpu()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= chunk_numel):
            continue
        v = vals.detach().to(dtype=torch.float32, device="cpu")
        if not bool(torch.isfinite(v).all()):
            continue
        rows = slice(start, start + idx.shape[0])
        total[rows].scatter_add_(1, idx, v)
        count[rows].scatter_add_(1, idx, torch.ones_like(v))
        any_used = True
    if not any_used:
        return None
    mask = count > 0
    return torch.where(mask, total / count.clamp_min(1.0), total), mask


def coefficient_clip(own: torch.Tensor | None) -> float:
    """The bound on a peer's coefficient magnitude in one tensor: ``COEFF_CLIP`` x our own largest,
    or no bound (inf) when we selected nothing non-zero there (we have no scale to compare with)."""
    if own is None or own.numel() == 0:
        return math.inf
    top = float(own.abs().max())
    return COEFF_CLIP * top if top > 0 else math.inf


def aggregate_components(
    own: Mapping[str, Entry],
    peers: Sequence[PeerComponents],
    *,
    n_chunks: Mapping[str, int],
    chunk_numel: Mapping[str, int],
) -> dict[str, torch.Tensor]:
    """DeMo aggregation to dense ``[n_chunks, chunk_numel]`` coefficients per tensor.

    An entry is ``(idx, vals)`` over all chunks, or ``(idx, vals, start)`` over chunks
    ``[start, start + len(idx))`` (one part of a tensor sent in several messages): ``idx``/``vals``
    are ``[rows, k]``. Each element of ``peers`` is one peer: a component dict, or the list of its
    parts (its messages of one step), merged by ``peer_coefficients`` so a peer that repeats a
    coefficient counts once. Every peer's values are clipped to ``coefficient_clip`` of ours. Each
    coefficient is averaged over the contributors that selected it, not over all of them, so a
    component only one peer found is not diluted to noise (the reference's rule); the sign step in
    ``DeMo`` bounds each peer's influence by a vote instead.
    """
    out: dict[str, torch.Tensor] = {}
    for name in own:
        nc, cn = int(n_chunks[name]), int(chunk_numel[name])
        mine = peer_coefficients([own], name, n_chunks=nc, chunk_numel=cn)
        bound = coefficient_clip(mine[0][mine[1]] if mine is not None else None)
        total = torch.zeros(nc, cn, dtype=torch.float32)
        count = torch.zeros(nc, cn, dtype=torch.float32)
        if mine is not None:
            total.add_(mine[0])
            count.add_(mine[1].float())
        for peer in peers:
            got = peer_coefficients(_parts(peer), name, n_chunks=nc, chunk_numel=cn)
            if got is None:
                continue
            values, mask = got
            if math.isfinite(bound):
                values = values.clamp(-bound, bound)
            total.add_(values)
            count.add_(mask.float())
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
