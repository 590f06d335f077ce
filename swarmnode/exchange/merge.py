"""One DiLoCo merge, tensor by tensor: what keeps a 0.5 B-parameter outer step within memory.

A contribution is a peer's encoded Δ blob (int8: 0.5 GB at 0.5 B params, its fp32 decode would be
2 GB; sparse: ~9 MB), its averaging weight and its global L2 norm. The blob's header names its codec,
so one merge takes int8 and sparse contributions alike, whatever this node sends. Every blob is validated once, on arrival
(``check_delta``: the names and shapes of our model, finite values, the norm in the same pass), so the
merge itself cannot fail half-way. The merge then decodes one band (``pseudograd.BAND_NUMEL`` values)
of one tensor from every blob at a time, combines them and hands the result to
``DiLoCo.outer_step_bands``: the peak extra memory is a few bands per contributor, not copies of the
largest tensor (a sparse blob decodes a tensor at a time). The blobs themselves may be memory-mapped
files (what the exchange pulls them into), so n contributions of 0.5 GB are page cache, not heap.

Weights: each peer's claimed weight is capped by ``max_weight`` (what a peer can have trained on in a
round), a contribution whose norm is over 4× the median is left out (with 3 or more contributors;
it is no plausible round of training), the rest are clipped to their median global norm (Templar's
rule, so a 3× outlier counts at most as much as a typical peer), then every coordinate is aggregated by
``aggregate.combine`` (default: the coordinate-wise trimmed mean, which bounds the *direction* one
Byzantine contributor of four can push, not only its norm). Contributions are sorted by author
and every step is deterministic, so replicas that merged the same blobs land on bit-identical anchors.
"""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from swarmnode.aggregate import bound_weights, clip_scales, combine, norm_outliers
from swarmnode.compression.pseudograd import BAND_NUMEL, delta_sq_norms, iter_decode_bands
from swarmnode.protocol.errors import ProtocolError

__all__ = ["Contribution", "MergeReport", "check_delta", "mapped_blob", "merge"]


def mapped_blob(path: str | os.PathLike[str]) -> bytes:
    """The file at ``path`` as a read-only memory map, and the file unlinked: the mapping keeps its
    pages (page cache the kernel may drop and re-read, not heap) until the last reference to it goes,
    and nothing is left on disk whatever happens to the process. Typed as bytes: it slices, measures
    and exports a buffer like them."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise ValueError(f"{path}: empty blob")
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    os.unlink(path)
    return cast(bytes, mapped)


@dataclass(frozen=True, slots=True)
class Contribution:
    blob: bytes
    weight: float
    norm: float


AGREE_OVER_MEDIAN = 2.0


@dataclass(slots=True)
class MergeReport:
    contributors: int = 0
    clipped: int = 0
    outliers: int = 0  # left out: a norm over NORM_OUTLIER_OVER_MEDIAN x the median (3+ contributors)
    clip_norm: float = 0.0
    replica_distance: float = float("nan")  # mean ‖Δ_i − Δ̄‖ over the contributors
    carried: float = float("nan")
    # contributors (indices) whose Δ agreed with the rest: a norm and a distance from the mean within
    # AGREE_OVER_MEDIAN x the median ones. What ``Membership.note_contributor`` records
    # (peers whose work we verified count towards attesting a state; an outlier's never does).
    agreeing: list[int] = field(default_factory=list)


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
    band: int = BAND_NUMEL,
) -> MergeReport:
    """Average the contributions (sorted by author by the caller) with ``aggregate.combine`` and
    take the outer step; see ``swarmnode.aggregate`` for what each method tolerates."""
    report = MergeReport(contributors=len(contribs))
    weights = bound_weights([c.weight for c in contribs], max_weight)
    # A norm far over the median is left out (scale 0), and the clip norm is the median of the rest.
    outlier = norm_outliers([c.norm for c in contribs])
    report.outliers = sum(outlier)
    scales = clip_scales([math.nan if o else c.norm for c, o in zip(contribs, outlier, strict=True)])
    report.clipped = sum(1 for s in scales if 0.0 < s < 1.0)  # outliers have scale 0
    shapes = diloco.shapes()
    streams = [iter_decode_bands(c.blob, max_bytes, shapes=shapes, band=band) for c in contribs]
    spread_sq = [0.0] * len(contribs)

    def averaged() -> Iterator[tuple[str, int, int, torch.Tensor]]:
        for parts in zip(*streams, strict=True):
            name, lo, hi, _ = parts[0]
            bands = [t for n, a, b, t in parts if (n, a, b) == (name, lo, hi)]
            if len(bands) != len(parts):  # check_delta ran on every blob: only a bug gets here
                raise RuntimeError(f"contributions disagree on band order at {name!r}[{lo}:{hi}]")
            used = [t for t, o in zip(bands, outlier, strict=True) if not o]
            if len(used) > 1:
                mean = _mean(used)
                for i, t in enumerate(bands):
                    spread_sq[i] += float((t - mean).pow(2).sum())
                del mean
            yield name, lo, hi, combine(bands, weights, scales, method=method)

    report.carried = diloco.outer_step_bands(averaged(), published_local=published_local)
    dist = [v**0.5 for v in spread_sq]
    kept = [d for d, o in zip(dist, outlier, strict=True) if not o]
    report.replica_distance = sum(kept) / len(kept) if len(kept) > 1 else 0.0
    median = sorted(kept)[(len(kept) - 1) // 2] if kept else 0.0
    report.agreeing = [
        i
        for i, (d, sc, w) in enumerate(zip(dist, scales, weights, strict=True))
        if sc * AGREE_OVER_MEDIAN >= 1.0 and w > 0 and d <= AGREE_OVER_MEDIAN * median
    ]
    return report


def _mean(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The unweighted mean without stacking (a stack of 0.5 GB tensors would be n x 0.5 GB more)."""
    out = torch.zeros_like(tensors[0], dtype=torch.float32)
    for t in tensors:
        out.add_(t, alpha=1.0 / len(tensors))
    return out
