"""Dense int8 block quantisation for pseudo-gradients, and a msgpack tensor-dict container.

int8 layout (little-endian): magic b"Q8" | version u8 | block u32 | numel u64 | float32 scale per
block | int8 per element. Scale = max|x| / 127 per block of `block` elements (4096 by default: the
scales then cost 1/1024 byte per element, and one outlier only coarsens its own block).

Tensor dict: msgpack map {"v": 1, "t": [[name, dtype, shape, raw little-endian bytes], ...]}. No
pickle: a peer's bytes can only ever become plain tensors of an allowed dtype.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import msgpack
import numpy as np
import torch
from swarmnode.protocol.errors import ProtocolError
from torch import Tensor

_Q_HEADER = struct.Struct("<2sBIQ")
_Q_MAGIC = b"Q8"
_Q_VERSION = 1
MAX_BLOCK = 1 << 24
_MAX_SCALE = float(np.finfo(np.float32).max) / 128

# dtype name -> (torch dtype, little-endian numpy dtype used for the raw buffer)
_DTYPES: dict[str, tuple[torch.dtype, str]] = {
    "float32": (torch.float32, "<f4"),
    "float64": (torch.float64, "<f8"),
    "float16": (torch.float16, "<f2"),
    "bfloat16": (torch.bfloat16, "<i2"),  # numpy has no bfloat16; ship the raw 16-bit pattern
    "int64": (torch.int64, "<i8"),
    "int32": (torch.int32, "<i4"),
    "int16": (torch.int16, "<i2"),
    "int8": (torch.int8, "i1"),
    "uint8": (torch.uint8, "u1"),
    "bool": (torch.bool, "u1"),
}
_NAMES = {v[0]: k for k, v in _DTYPES.items()}
_MAX_DIMS = 8
_MAX_NAME = 256


def quantized_size(numel: int, block: int) -> int:
    return _Q_HEADER.size + 4 * -(-numel // block) + numel


def quantize_int8(t: Tensor, *, block: int = 4096) -> bytes:
    if not 1 <= block <= MAX_BLOCK:
        raise ValueError(f"block: expected 1..{MAX_BLOCK}, got {block}")
    x = t.detach().to(torch.float32).reshape(-1).cpu()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("t: non-finite entries cannot be quantised")
    numel = x.numel()
    n_blocks = -(-numel // block)
    padded = torch.nn.functional.pad(x, (0, n_blocks * block - numel)).reshape(n_blocks, block)
    scale = padded.abs().amax(dim=1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(padded / safe[:, None]), -127, 127).to(torch.int8).reshape(-1)[:numel]
    header = _Q_HEADER.pack(_Q_MAGIC, _Q_VERSION, block, numel)
    return header + scale.numpy().astype("<f4").tobytes() + q.numpy().tobytes()


def _int8_parts(
    data: bytes, shape: tuple[int, ...] | torch.Size, max_bytes: int
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(scales, int8 codes, block, numel) of a `quantize_int8` payload, every field checked."""
    if len(data) > max_bytes:
        raise ProtocolError(f"int8: {len(data)} bytes exceeds max_bytes {max_bytes}")
    if len(data) < _Q_HEADER.size:
        raise ProtocolError("int8: shorter than the header")
    magic, version, block, numel = _Q_HEADER.unpack_from(data)
    if magic != _Q_MAGIC or version != _Q_VERSION:
        raise ProtocolError(f"int8: bad magic/version {magic!r}/{version}")
    want_numel = math.prod(int(d) for d in shape)
    if numel != want_numel:
        raise ProtocolError(f"int8: holds {numel} elements, shape {tuple(shape)} needs {want_numel}")
    if not 1 <= block <= MAX_BLOCK:
        raise ProtocolError(f"int8: block {block} out of range")
    n_blocks = -(-numel // block)
    if len(data) != quantized_size(numel, block):
        raise ProtocolError(f"int8: size {len(data)} does not match {numel} elements in blocks of {block}")
    scale = np.frombuffer(data, dtype="<f4", count=n_blocks, offset=_Q_HEADER.size).astype(np.float32)
    # 127 * scale must stay finite, or dequantised values would be inf.
    if not (np.isfinite(scale) & (scale >= 0) & (scale <= _MAX_SCALE)).all():
        raise ProtocolError(f"int8: scales must be in [0, {_MAX_SCALE:.3g}]")
    codes = np.frombuffer(data, dtype=np.int8, offset=_Q_HEADER.size + 4 * n_blocks)
    return scale, codes, block, numel


# Blocks summed per slice in int8_sq_norm: bounds its scratch memory whatever the tensor's size.
_NORM_SLICE_BLOCKS = 1 << 12


def int8_sq_norm(data: bytes, *, shape: tuple[int, ...] | torch.Size, max_bytes: int) -> float:
    """‖dequantize_int8(data)‖² from the codes and scales (Σ_b scale_b² · Σ q²), never materialising
    the fp32 tensor; the same checks as ``dequantize_int8``. Deterministic: exact integer sums per
    block, float64 over blocks in order."""
    scale, codes, block, numel = _int8_parts(data, shape, max_bytes)
    total = 0.0
    full = numel // block
    step = _NORM_SLICE_BLOCKS
    for lo in range(0, full, step):
        hi = min(full, lo + step)
        q = codes[lo * block : hi * block].reshape(hi - lo, block).astype(np.int32)
        per_block = np.einsum("ij,ij->i", q, q).astype(np.float64)
        total += float(np.dot(per_block, scale[lo:hi].astype(np.float64) ** 2))
    if full * block < numel:
        q = codes[full * block : numel].astype(np.int64)
        total += float(int(np.dot(q, q))) * float(scale[-1]) ** 2
    return total


def dequantize_int8_range(
    data: bytes, *, shape: tuple[int, ...] | torch.Size, max_bytes: int, lo: int, hi: int
) -> Tensor:
    """Values ``lo:hi`` of the flattened ``dequantize_int8(data)``, fp32, allocating only those (bit-equal
    to the same slice of the whole decode): what a merge decodes band by band (the 136 M-value
    embedding of a 0.5 B model decoded whole needs 3 x 0.5 GB of scratch)."""
    scale, codes, block, numel = _int8_parts(data, shape, max_bytes)
    if not 0 <= lo <= hi <= numel:
        raise ValueError(f"range {lo}:{hi} is outside 0:{numel}")
    out = np.empty(hi - lo, dtype=np.float32)
    at = lo
    while at < hi:  # a partial block, whole blocks, a partial block
        b = at // block
        if at % block == 0 and hi - at >= block:
            n = (hi - at) // block
            out[at - lo : at - lo + n * block] = (
                codes[at : at + n * block].astype(np.float32).reshape(n, block) * scale[b : b + n, None]
            ).reshape(-1)
            at += n * block
        else:
            end = min(hi, (b + 1) * block)
            out[at - lo : end - lo] = codes[at:end].astype(np.float32) * scale[b]
            at = end
    return torch.from_numpy(out)


def dequantize_int8(data: bytes, *, shape: tuple[int, ...] | torch.Size, max_bytes: int) -> Tensor:
    """Inverse of `quantize_int8` into `shape`; ProtocolError for bytes that do not fit exactly."""
    scale, codes, block, numel = _int8_parts(data, shape, max_bytes)
    q = codes.astype(np.float32)
    # Full blocks as a 2-D product, the short tail separately: never allocate past numel, whatever
    # block size the header names.
    full = numel // block * block
    out = np.empty(numel, dtype=np.float32)
    out[:full] = (q[:full].reshape(-1, block) * scale[: full // block, None]).reshape(-1)
    if full < numel:
        out[full:] = q[full:] * scale[-1]
    return torch.from_numpy(out).reshape(tuple(shape))


def encode_tensor_dict(d: dict[str, Tensor]) -> bytes:
    items = []
    for name, t in d.items():
        if not isinstance(name, str) or not 1 <= len(name) <= _MAX_NAME:
            raise ValueError(f"name: expected a 1..{_MAX_NAME} character string, got {name!r}")
        if t.dtype not in _NAMES:
            raise ValueError(f"{name}: dtype {t.dtype} is not serialisable")
        c = t.detach().cpu().contiguous()
        if c.dtype == torch.bfloat16:
            raw = c.view(torch.int16).numpy()
        else:
            raw = c.numpy()
        dtype_name = _NAMES[t.dtype]
        items.append(
            [name, dtype_name, list(c.shape), raw.astype(_DTYPES[dtype_name][1], copy=False).tobytes()]
        )
    return msgpack.packb({"v": 1, "t": items}, use_bin_type=True)


def unpack_bounded(data: bytes, what: str, *, max_str_len: int, max_array_len: int, max_map_len: int) -> Any:
    """msgpack with every container length capped (never more than the input size), so a header
    cannot ask for more memory than the bytes we hold; any failure is a ``ProtocolError``."""
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_bin_len=len(data),
            max_str_len=max_str_len,
            max_array_len=min(max_array_len, len(data)),
            max_map_len=max_map_len,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises many types (ValueError, ExtraData, FormatError, ...)
        raise ProtocolError(f"{what}: not valid msgpack ({type(exc).__name__})") from None


def decode_tensor_dict(data: bytes, *, max_bytes: int) -> dict[str, Tensor]:
    if len(data) > max_bytes:
        raise ProtocolError(f"tensor dict: {len(data)} bytes exceeds max_bytes {max_bytes}")
    obj = unpack_bounded(
        data, "tensor dict", max_str_len=_MAX_NAME * 4, max_array_len=len(data), max_map_len=8
    )
    if not isinstance(obj, dict) or obj.get("v") != 1 or not isinstance(obj.get("t"), list):
        raise ProtocolError("tensor dict: expected {'v': 1, 't': [...]}")
    out: dict[str, Tensor] = {}
    for item in obj["t"]:
        if not (isinstance(item, list) and len(item) == 4):
            raise ProtocolError("tensor dict: each entry must be [name, dtype, shape, bytes]")
        name, dtype_name, shape, raw = item
        if not isinstance(name, str) or not 1 <= len(name) <= _MAX_NAME or name in out:
            raise ProtocolError(f"tensor dict: bad or duplicate name {name!r:.80}")
        if dtype_name not in _DTYPES:
            raise ProtocolError(f"tensor dict: {name}: unknown dtype {dtype_name!r:.40}")
        if (
            not isinstance(shape, list)
            or len(shape) > _MAX_DIMS
            or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**40 for s in shape)
        ):
            raise ProtocolError(f"tensor dict: {name}: bad shape")
        if not isinstance(raw, bytes):
            raise ProtocolError(f"tensor dict: {name}: data must be bytes")
        torch_dtype, np_dtype = _DTYPES[dtype_name]
        itemsize = np.dtype(np_dtype).itemsize
        if len(raw) != math.prod(shape) * itemsize:
            raise ProtocolError(f"tensor dict: {name}: {len(raw)} bytes for shape {shape} of {dtype_name}")
        arr = np.frombuffer(raw, dtype=np_dtype).reshape(shape)
        if dtype_name == "bool":
            if (arr > 1).any():
                raise ProtocolError(f"tensor dict: {name}: bool bytes must be 0 or 1")
            t = torch.from_numpy(arr.astype(np.bool_))
        else:
            t = torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="), copy=True))
            if dtype_name == "bfloat16":
                t = t.view(torch.bfloat16)
        out[name] = t.to(torch_dtype) if t.dtype != torch_dtype else t
    return out
