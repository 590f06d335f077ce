"""One DiLoCo merge, tensor by tensor: what keeps a 0.5 B-parameter outer step within memory.

A contribution is a peer's encoded Δ blob (int8: 0.5 GB at 0.5 B params; its fp32 decode would be
2 GB), its averaging weight and its global L2 norm. Every blob is validated once, on arrival
(``check_delta``: the names and shapes of our model, finite values, the norm in the same pass), so the
merge itself cannot fail half-way. The merge then decodes one tensor from every blob at a time,
combines them and hands the result to ``DiLoCo.outer_step_streaming``: the peak extra memory is a few
copies of the largest tensor, not of the model.

Weights: each peer's claimed weight is capped by ``max_weight`` (what a peer can have trained on in a
round), then each contribution is clipped to the median global norm (Templar's rule, so one 1000×
outlier counts at most as much as a typical peer), then averaged. Contributions are sorted by author
and every step is deterministic, so replicas that merged the same blobs land on bit-identical anchors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from swarmnode.compression.pseudograd import iter_decode_delta
from swarmnode.protocol.errors import ProtocolError

__all__ = ["Combine", "Contribution", "MergeReport", "check_delta", "merge"]

# (decoded tensors of one parameter, their final coefficients summing to 1) -> the averaged tensor
Combine = Callable[[Sequence[torch.Tensor], Sequence[float]], torch.Tensor]


@dataclass(frozen=True, slots=True)
class Contribution:
    blob: bytes
    weight: float
    norm: float


@dataclass(slots=True)
class MergeReport:
    contributors: int = 0
    clipped: int = 0
    clip_norm: float = 0.0
    replica_distance: float = float("nan")  # mean ‖Δ_i − Δ̄‖ over the contributors
    carried: float = float("nan")


def check_delta(blob: bytes, max_bytes: int, shapes: Mapping[str, tuple[int, ...]]) -> float:
    """The blob's global L2 norm, after checking that it decodes to finite tensors of exactly our
    model's names and shapes; ``ProtocolError`` otherwise. Decodes one tensor at a time."""
    want = sorted(shapes)
    seen = 0
    sq = 0.0
    for name, t in iter_decode_delta(blob, max_bytes):
        if seen >= len(want) or name != want[seen] or tuple(t.shape) != tuple(shapes[name]):
            raise ProtocolError(f"pseudo-gradient: {name!r}{list(t.shape)} does not match our model")
        seen += 1
        sq += float(t.to(torch.float64).pow(2).sum())
    if seen != len(want):
        raise ProtocolError(f"pseudo-gradient: {len(want) - seen} of our model's tensors are missing")
    return math.sqrt(sq)


def weighted_sum(tensors: Sequence[torch.Tensor], coefs: Sequence[float]) -> torch.Tensor:
    out = torch.zeros_like(tensors[0], dtype=torch.float32)
    for t, c in zip(tensors, coefs, strict=True):
        out.add_(t.to(torch.float32), alpha=c)
    return out


def coefficients(contribs: Sequence[Contribution], max_weight: float) -> tuple[list[float], int, float]:
    """(per-contribution coefficient, how many were norm-clipped, the clip norm)."""
    weights = [min(max(c.weight, 0.0), max_weight) for c in contribs]
    total = sum(weights) or 1.0
    norms = sorted(c.norm for c in contribs)
    # the lower middle for even counts: with two peers the smaller norm wins, the conservative
    # choice when one of two may be hostile
    clip = norms[(len(norms) - 1) // 2]
    coefs, clipped = [], 0
    for c, w in zip(contribs, weights, strict=True):
        scale = 1.0
        if c.norm > clip > 0:
            scale, clipped = clip / c.norm, clipped + 1
        coefs.append(w / total * scale)
    return coefs, clipped, clip


def merge(
    contribs: Sequence[Contribution],
    diloco: Any,
    *,
    max_bytes: int,
    max_weight: float,
    published_local: Mapping[str, torch.Tensor] | None,
    combine: Combine = weighted_sum,
) -> MergeReport:
    """Average the contributions (sorted by author by the caller) and take the outer step."""
    report = MergeReport(contributors=len(contribs))
    coefs, report.clipped, report.clip_norm = coefficients(contribs, max_weight)
    streams = [iter_decode_delta(c.blob, max_bytes) for c in contribs]
    spread_sq = [0.0] * len(contribs)

    def averaged() -> Iterator[tuple[str, torch.Tensor]]:
        for parts in zip(*streams, strict=True):
            name = parts[0][0]
            tensors = [t for n, t in parts if n == name]
            if len(tensors) != len(parts):  # check_delta ran on every blob: only a bug gets here
                raise RuntimeError(f"contributions disagree on tensor order at {name!r}")
            if len(tensors) > 1:
                mean = weighted_sum(tensors, [1.0 / len(tensors)] * len(tensors))
                for i, t in enumerate(tensors):
                    spread_sq[i] += float((t - mean).pow(2).sum())
                del mean
            yield name, combine(tensors, coefs)

    report.carried = diloco.outer_step_streaming(averaged(), published_local=published_local)
    report.replica_distance = sum(v**0.5 for v in spread_sq) / len(spread_sq) if len(contribs) > 1 else 0.0
    return report
