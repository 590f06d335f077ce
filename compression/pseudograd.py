"""DiLoCo pseudo-gradient codecs: what a node serves as its round contribution.

``int8`` (dense): every tensor quantised by ``quant.quantize_int8`` with one fp32 scale per 256
values (a per-tensor scale lost most small entries of embedding deltas; 256 costs 1.6 % overhead).
Layout: ``b"SNPG" | version u8 | header length u32 | msgpack header | payloads``, the header being
``{"codec": "int8", "t": [[name, shape, payload length], ...]}`` in sorted name order and the payloads
following back to back. A receiver decodes one tensor at a time straight out of the blob
(``iter_decode_delta``): a 0.5 B-parameter merge never holds a contributor's Δ as a dict of fp32
tensors, and never copies the blob.

The author averages the *decoded* values of its own blob, like every receiver, so replicas that
merged the same contributions land on bit-identical anchors. No pickle: a peer's bytes can only
become finite fp32 tensors of the shapes the header states, checked before anything is allocated.

``sparse`` (``compression.sparsedelta``): top-k per 4096-value tile with 2-bit values, ~0.018 B/param;
header ``{"codec": "sparse", "tile": 64, "k": 56, "domain": "wht", "t": [...]}``, the same entries. Its
payloads are far smaller than the tensors they decode to, so a receiver must state the shapes it
expects (``shapes=``): the header must name exactly those tensors and shapes, checked before anything
is allocated. The codec is in the header, so a receiver decodes either codec whatever its own.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import msgpack
import torch
from swarmnode.compression import quant, sparsedelta
from swarmnode.compression.sparsedelta import ErrorFeedback, SparseParams
from swarmnode.protocol.errors import ProtocolError
from torch import Tensor

__all__ = [
    "CHOICES",
    "CODECS",
    "QUANT_BLOCK",
    "band_ranges",
    "decode_delta",
    "delta_codec",
    "delta_sq_norms",
    "encode_delta",
    "encoded_size",
    "iter_decode_bands",
    "iter_decode_delta",
    "max_encoded_size",
    "resolve_codec",
    "write_delta",
]

QUANT_BLOCK = 256
CODECS = ("int8", "sparse")  # what a header may name
# What a node may choose to send (config ``diloco.delta_codec``): "sparse" is the sparse codec in its
# default (Walsh-Hadamard) domain, "sparse-dct" the same wire codec with ``domain: "dct"``.
CHOICES = ("int8", "sparse", "sparse-dct")
_MAGIC = b"SNPG"
_VERSION = 2
_PREFIX = struct.Struct("<4sBI")
_MAX_HEADER = 16 << 20
_MAX_TENSORS = 1 << 16
_MAX_NAME = 256
_MAX_DIMS = 8


def resolve_codec(choice: str, params: SparseParams | None = None) -> tuple[str, SparseParams | None]:
    """(wire codec, sparse params) of a codec choice (one of ``CHOICES``)."""
    if choice not in CHOICES:
        raise ValueError(f"codec: expected one of {CHOICES}, got {choice!r}")
    if choice == "int8":
        return "int8", params
    return "sparse", params or SparseParams(
        domain="dct" if choice == "sparse-dct" else sparsedelta.DEFAULT_DOMAIN
    )


def encoded_size(
    shapes: Mapping[str, tuple[int, ...]], codec: str = "int8", params: SparseParams | None = None
) -> int:
    """Upper bound of ``encode_delta``'s output for tensors of these shapes (caps derive from it)."""
    codec, params = resolve_codec(codec, params)
    total = _PREFIX.size + 64
    for name, shape in shapes.items():
        if codec == "int8":
            body = quant.quantized_size(math.prod(shape), QUANT_BLOCK)
        else:
            body = sparsedelta.payload_bounds(tuple(shape), params or SparseParams())[1]
        total += body + len(name) * 4 + 24 + 9 * len(shape)
    return total


def max_encoded_size(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """The largest Δ blob of these shapes in any codec a receiver accepts (dense int8): the cap of a
    node that merges contributions whatever codec their authors chose."""
    return encoded_size(shapes, "int8")


def _items(delta: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]]) -> Iterator[tuple[str, Tensor]]:
    if isinstance(delta, Mapping):
        return ((n, delta[n]) for n in sorted(delta))
    return iter(delta)


def encode_delta(
    delta: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]],
    codec: str = "int8",
    *,
    params: SparseParams | None = None,
    feedback: ErrorFeedback | None = None,
) -> bytes:
    """A mapping, or (name, Δ) pairs in sorted name order (e.g. ``DiLoCo.iter_pseudo_gradient``, so
    the fp32 Δ of a large model exists one tensor at a time).

    ``sparse`` (and ``sparse-dct``) take ``params`` (default ``SparseParams()``, with
    ``domain="dct"`` for ``sparse-dct``) and an optional ``feedback``: each tensor is coded as Δ + e and e becomes
    what the blob left out (``sparsedelta.ErrorFeedback``)."""
    payloads: list[bytes] = []
    head = _encode(delta, codec, params, feedback, payloads.append)
    return b"".join([head, *payloads])


def write_delta(
    delta: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]],
    path: str | os.PathLike[str],
    codec: str = "int8",
    *,
    params: SparseParams | None = None,
    feedback: ErrorFeedback | None = None,
) -> tuple[int, str]:
    """``encode_delta`` into the file at ``path``, never holding the blob in memory (0.5 GB at int8 for
    a 0.5 B model); returns (size, sha256 hex). Payloads go to a scratch file beside it first (the
    header, which leads, lists their lengths)."""
    path = Path(path)
    scratch = path.with_name(path.name + ".payloads")
    try:
        with open(scratch, "wb") as out:
            head = _encode(delta, codec, params, feedback, out.write)
        digest = hashlib.sha256(head)
        size = len(head)
        with open(path, "wb") as out, open(scratch, "rb") as src:
            out.write(head)
            while chunk := src.read(_COPY_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                size += len(chunk)
    finally:
        scratch.unlink(missing_ok=True)
    return size, digest.hexdigest()


_COPY_CHUNK = 4 << 20


def _encode(
    delta: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]],
    codec: str,
    params: SparseParams | None,
    feedback: ErrorFeedback | None,
    emit: Callable[[bytes], object],
) -> bytes:
    """Encode every tensor, handing each payload to ``emit`` in order; returns prefix + header."""
    if codec == "int8" and (params is not None or feedback is not None):
        raise ValueError("params and feedback apply to the sparse codec only")
    codec, resolved = resolve_codec(codec, params)
    p = resolved or SparseParams()
    entries: list[list[object]] = []
    last = ""
    for name, t in _items(delta):
        if entries and name <= last:
            raise ValueError(f"delta names must be unique and sorted, got {name!r} after {last!r}")
        last = name
        if codec == "int8":
            payload = quant.quantize_int8(t, block=QUANT_BLOCK)
        else:
            sent = feedback.add(name, t) if feedback is not None else t
            payload, decoded = sparsedelta.encode_tensor(sent, p)
            if feedback is not None:
                feedback.keep(name, sent, decoded)
            del decoded
        entries.append([name, list(t.shape), len(payload)])
        emit(payload)
    head: dict[str, object] = {"codec": codec, "t": entries}
    if codec == "sparse":
        head.update(tile=p.tile, k=p.k, domain=p.domain)
    header = msgpack.packb(head, use_bin_type=True)
    return _PREFIX.pack(_MAGIC, _VERSION, len(header)) + header


def delta_codec(data: bytes, max_bytes: int = _MAX_HEADER + _PREFIX.size) -> str:
    """The codec a blob's header names ("int8" or "sparse"); ``ProtocolError`` when it is not a Δ blob.
    Reads the prefix and the header only."""
    return _parse_header(data, max_bytes)[0]


_Entry = tuple[str, tuple[int, ...], int, int]


def _parse_header(data: bytes, max_bytes: int) -> tuple[str, SparseParams | None, list[Any], int]:
    """(codec, sparse params, raw entries, header end): the prefix and the msgpack header, bounded."""
    if len(data) > max_bytes:
        raise ProtocolError(f"pseudo-gradient blob: {len(data)} bytes, over the limit of {max_bytes}")
    if len(data) < _PREFIX.size:
        raise ProtocolError("pseudo-gradient blob: shorter than its prefix")
    magic, version, hlen = _PREFIX.unpack_from(data)
    if magic != _MAGIC or version != _VERSION:
        raise ProtocolError(f"pseudo-gradient blob: bad magic/version {magic!r}/{version}")
    if hlen > min(_MAX_HEADER, len(data) - _PREFIX.size):
        raise ProtocolError(f"pseudo-gradient blob: header of {hlen} bytes does not fit")
    obj = quant.unpack_bounded(
        data[_PREFIX.size : _PREFIX.size + hlen],
        "pseudo-gradient header",
        max_str_len=_MAX_NAME * 4,
        max_array_len=_MAX_TENSORS,
        max_map_len=8,
    )
    if not isinstance(obj, dict) or obj.get("codec") not in CODECS or not isinstance(obj.get("t"), list):
        raise ProtocolError(f"pseudo-gradient header: expected {{'codec': one of {CODECS}, 't': [...]}}")
    codec = str(obj["codec"])
    params = None
    want_keys = {"codec", "t"} | ({"tile", "k", "domain"} if codec == "sparse" else set())
    if set(obj) != want_keys:
        raise ProtocolError(f"pseudo-gradient header: {codec} header has keys {sorted(map(str, obj))}")
    if codec == "sparse":
        sparsedelta.check_params(obj["tile"], obj["k"], obj["domain"], error=ProtocolError)
        params = SparseParams(tile=obj["tile"], k=obj["k"], domain=obj["domain"])
    return codec, params, obj["t"], _PREFIX.size + hlen


def _header(
    data: bytes, max_bytes: int, shapes: Mapping[str, tuple[int, ...]] | None
) -> tuple[str, SparseParams | None, list[_Entry]]:
    """(codec, sparse params, [(name, shape, payload offset, payload length)]), checked against the
    blob's real size and, when given, against the shapes the receiver expects (required for sparse:
    its payloads do not bound the tensors they decode to)."""
    codec, params, items, offset = _parse_header(data, max_bytes)
    if codec == "sparse" and shapes is None:
        raise ProtocolError("pseudo-gradient blob: a sparse Δ is decoded only against expected shapes")
    if shapes is not None and len(items) != len(shapes):
        raise ProtocolError(
            f"pseudo-gradient header: {len(items)} tensors do not match our model's {len(shapes)}"
        )
    out: list[_Entry] = []
    last = ""
    for item in items:
        if not (isinstance(item, list) and len(item) == 3):
            raise ProtocolError("pseudo-gradient header: each entry must be [name, shape, length]")
        name, shape, length = item
        if not isinstance(name, str) or not 1 <= len(name) <= _MAX_NAME or (out and name <= last):
            raise ProtocolError(f"pseudo-gradient header: bad, duplicate or unsorted name {name!r:.80}")
        last = name
        if (
            not isinstance(shape, list)
            or len(shape) > _MAX_DIMS
            or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**40 for s in shape)
        ):
            raise ProtocolError(f"pseudo-gradient header: tensor {name!r} has a bad shape")
        if shapes is not None:
            if name not in shapes:
                raise ProtocolError(f"pseudo-gradient header: tensor {name!r:.80} does not match our model")
            if tuple(shape) != tuple(shapes[name]):
                raise ProtocolError(
                    f"pseudo-gradient header: tensor {name!r}{shape} does not match our model's {list(shapes[name])}"
                )
        numel = math.prod(shape)
        if not isinstance(length, int) or isinstance(length, bool):
            raise ProtocolError(f"pseudo-gradient header: tensor {name!r}: length {length!r:.40}")
        if codec == "int8":
            if length != quant.quantized_size(numel, QUANT_BLOCK):
                raise ProtocolError(
                    f"pseudo-gradient header: tensor {name!r}: {length!r} bytes for {numel} values"
                )
        else:
            assert params is not None
            lo, hi = sparsedelta.payload_bounds(tuple(shape), params)
            if not lo <= length <= hi:
                raise ProtocolError(
                    f"pseudo-gradient header: tensor {name!r}: {length} bytes, {numel} sparse values need {lo}..{hi}"
                )
        out.append((name, tuple(shape), offset, length))
        offset += length
        if offset > len(data):
            raise ProtocolError(
                f"pseudo-gradient blob: tensor {name!r} ends at {offset}, the blob has {len(data)} bytes"
            )
    if offset != len(data):
        raise ProtocolError(f"pseudo-gradient blob: payloads end at {offset}, the blob has {len(data)} bytes")
    return codec, params, out


def iter_decode_delta(
    data: bytes, max_bytes: int, *, shapes: Mapping[str, tuple[int, ...]] | None = None
) -> Iterator[tuple[str, Tensor]]:
    """(name, fp32 Δ) one tensor at a time, sorted by name, whatever codec the header names. The
    header is checked in full (against ``shapes``, when given; sparse blobs need them) before the
    first tensor is yielded; a payload that is malformed or not finite raises ``ProtocolError`` when
    it is reached (a merge validates every blob once, on arrival, before averaging any)."""
    codec, params, entries = _header(data, max_bytes, shapes)
    view = memoryview(data)
    for name, shape, offset, length in entries:
        try:
            if codec == "int8":
                t = quant.dequantize_int8(
                    cast(bytes, view[offset : offset + length]), shape=shape, max_bytes=length
                )
            else:
                assert params is not None
                t = sparsedelta.decode_tensor(view[offset : offset + length], shape, params, "sparse")
        except ProtocolError as exc:
            raise ProtocolError(f"pseudo-gradient blob: tensor {name!r}: {exc}") from None
        if not bool(torch.isfinite(t).all()):
            raise ProtocolError(f"pseudo-gradient blob: tensor {name!r} is not finite")
        yield name, t


# Values per band of ``iter_decode_bands``: 8 MB of fp32 per contributor, under glibc's largest mmap
# threshold, so band buffers are reused rather than page-faulted afresh (see ``optim.demo.BAND_NUMEL``).
BAND_NUMEL = 1 << 21


def iter_decode_bands(
    data: bytes,
    max_bytes: int,
    *,
    shapes: Mapping[str, tuple[int, ...]],
    band: int = BAND_NUMEL,
) -> Iterator[tuple[str, int, int, Tensor]]:
    """(name, lo, hi, values lo:hi of the flattened fp32 Δ), tensor by tensor in sorted name order,
    each tensor cut into ``band_ranges(numel, band)`` whatever the blob's codec: a merge zips the bands
    of every contributor. int8 payloads decode one band at a time (never a whole 0.5 GB fp32
    embedding per contributor); sparse payloads decode a tensor at a time and yield views of it.
    Checks are those of ``iter_decode_delta``."""
    codec, params, entries = _header(data, max_bytes, shapes)
    view = memoryview(data)
    for name, shape, offset, length in entries:
        ranges = band_ranges(math.prod(shape), band)
        payload = cast(bytes, view[offset : offset + length])
        try:
            if codec == "int8":
                for lo, hi in ranges:
                    t = quant.dequantize_int8_range(payload, shape=shape, max_bytes=length, lo=lo, hi=hi)
                    if not bool(torch.isfinite(t).all()):
                        raise ProtocolError("not finite")
                    yield name, lo, hi, t
                continue
            assert params is not None
            whole = sparsedelta.decode_tensor(payload, shape, params, "sparse").reshape(-1)
            if not bool(torch.isfinite(whole).all()):
                raise ProtocolError("not finite")
        except ProtocolError as exc:
            raise ProtocolError(f"pseudo-gradient blob: tensor {name!r}: {exc}") from None
        for lo, hi in ranges:
            yield name, lo, hi, whole[lo:hi]
        del whole


def band_ranges(numel: int, band: int = BAND_NUMEL) -> list[tuple[int, int]]:
    """[(lo, hi)] covering 0..numel in bands of ``band`` values; an empty tensor has one empty band."""
    if band < 1:
        raise ValueError(f"band must be >= 1, got {band}")
    return [(lo, min(numel, lo + band)) for lo in range(0, numel, band)] or [(0, 0)]


def delta_sq_norms(
    data: bytes, max_bytes: int, *, shapes: Mapping[str, tuple[int, ...]] | None = None
) -> list[tuple[str, tuple[int, ...], float]]:
    """[(name, shape, ‖Δ‖²)] straight from the codes and scales, without decoding to fp32 (int8: codes
    and block scales; sparse: levels and magnitude bits, see ``sparsedelta.tensor_sq_norm``): checks
    everything ``iter_decode_delta`` checks (a blob that passes decodes to finite tensors of these
    shapes). The sums run in float64 in a fixed order, so every node computes the same norm for the
    same blob."""
    codec, params, entries = _header(data, max_bytes, shapes)
    view = memoryview(data)
    out = []
    for name, shape, offset, length in entries:
        try:
            if codec == "int8":
                sq = quant.int8_sq_norm(
                    cast(bytes, view[offset : offset + length]), shape=shape, max_bytes=length
                )
            else:
                assert params is not None
                sq = sparsedelta.tensor_sq_norm(view[offset : offset + length], shape, params, "sparse")
        except ProtocolError as exc:
            raise ProtocolError(f"pseudo-gradient blob: tensor {name!r}: {exc}") from None
        out.append((name, shape, sq))
    return out


def decode_delta(
    data: bytes, max_bytes: int, *, shapes: Mapping[str, tuple[int, ...]] | None = None
) -> dict[str, Tensor]:
    """Inverse of ``encode_delta``; any malformed or non-finite blob is a ``ProtocolError``."""
    return dict(iter_decode_delta(data, max_bytes, shapes=shapes))
