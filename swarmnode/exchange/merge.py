"""One DiLoCo merge, tensor by tensor: what keeps a 0.5 B-parameter outer step within memory.

A contribution is a peer's encoded Δ blob (int8: 0.5 GB at 0.5 B params, its fp32 decode would be
2 GB; sparse: ~9 MB), its averaging weight and its global L2 norm. The blob's header names its codec,
so one merge takes int8 and sparse contributions alike, whatever this node sends. Every blob is validated once, on arrival
(``check_delta``: the names and shapes of our model, finite values, the norm in the same pass), so the
merge itself cannot fail half-way. The merge then decodes one tensor from every blob at a time,
combines them and hands the result to ``DiLoCo.outer_step_streaming``: the peak extra memory is a few
copies of the largest tensor, not of the model.

Weights: each peer's claimed weight is capped by ``max_weight`` (what a peer can have trained on in a
round), each contribution is clipped to the median global norm (Templar's rule, so one 1000×
outlier counts at most as much as a typical peer), then every coordinate is aggregated by
``aggregate.combine`` (default: the coordinate-wise trimmed mean, which bounds the *direction* one
Byzantine contributor of four can push, not only its norm). Contributions are sorted by author
and every step is deterministic, so replicas that merged the same blobs land on bit-identical anchors.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from swarmnode.aggregate import bound_weights, clip_scales, combine
from swarmnode.compression.pseudograd import delta_sq_norms, iter_decode_delta
from swarmnode.protocol.errors import ProtocolError

__all__ = ["Contribution", "MergeReport", "check_delta", "merge"]


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
    model's names and shapes; ``ProtocolError`` otherwise. Reads the codes and scales only (no fp32
    decode): at 0.5 B parameters this is a fraction of a second, not a full decode. The header is
    checked against ``shapes`` before any payload is read, so a sparse blob can only ever decode
    into tensors of our model's shapes."""
    got = delta_sq_norms(blob, max_bytes, shapes=shapes)
    want = sorted(shapes)
    if [n for n, _, _ in got] != want:
        extra = sorted({n for n, _, _ in got} - set(want))[:3]
        missing = sorted(set(want) - {n for n, _, _ in got})[:3]
        raise ProtocolError(
            f"pseudo-gradient: tensors do not match our model (extra {extra}, missing {missing})"
        )
    for name, shape, _ in got:
        if tuple(shape) != tuple(shapes[name]):
            raise ProtocolError(f"pseudo-gradient: {name!r}{list(shape)} does not match our model")
    return math.sqrt(sum(sq for _, _, sq in got))


def merge(
    contribs: Sequence[Contribution],
    diloco: Any,
    *,
    max_bytes: int,
    max_weight: float,
    published_local: Mapping[str, torch.Tensor] | None,
    method: str = "trimmed",
) -> MergeReport:
    """Average the contributions (sorted by author by the caller) with ``aggregate.combine`` and
    take the outer step; see ``swarmnode.aggregate`` for what each method tolerates."""
    report = MergeReport(contributors=len(contribs))
    weights = bound_weights([c.weight for c in contribs], max_weight)
    scales = clip_scales([c.norm for c in contribs])
    report.clipped = sum(1 for s in scales if s < 1.0)
    shapes = diloco.shapes()
    streams = [iter_decode_delta(c.blob, max_bytes, shapes=shapes) for c in contribs]
    spread_sq = [0.0] * len(contribs)

    def averaged() -> Iterator[tuple[str, torch.Tensor]]:
        for parts in zip(*streams, strict=True):
            name = parts[0][0]
            tensors = [t for n, t in parts if n == name]
            if len(tensors) != len(parts):  # check_delta ran on every blob: only a bug gets here
                raise RuntimeError(f"contributions disagree on tensor order at {name!r}")
            if len(tensors) > 1:
                mean = torch.stack(tensors).mean(dim=0) if tensors[0].numel() < 1 << 22 else _mean(tensors)
                for i, t in enumerate(tensors):
                    spread_sq[i] += float((t - mean).pow(2).sum())
                del mean
            yield name, combine(tensors, weights, scales, method=method)

    report.carried = diloco.outer_step_streaming(averaged(), published_local=published_local)
    report.replica_distance = sum(v**0.5 for v in spread_sq) / len(spread_sq) if len(contribs) > 1 else 0.0
    return report


def _mean(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The unweighted mean without stacking (a stack of 0.5 GB tensors would be n x 0.5 GB more)."""
    out = torch.zeros_like(tensors[0], dtype=torch.float32)
    for t in tensors:
        out.add_(t, alpha=1.0 / len(tensors))
    return out
