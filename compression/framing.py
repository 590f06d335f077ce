"""zstd framing with a declared size, so decompression is capped before any work is done.

Frame layout (little-endian):
    magic b"SZ" | version u8 | declared decompressed size u64 | crc32 of the decompressed bytes u32 | zstd
The declared size is checked against the caller's `max_size` before decompressing, and the zstd
stream is read through a reader that never produces more than declared + 1 bytes, so a frame that
lies about its size (a zip bomb) costs at most `max_size` bytes of memory.
"""

from __future__ import annotations

import struct
import zlib

import zstandard
from swarmnode.protocol.errors import ProtocolError

MAGIC = b"SZ"
VERSION = 1
_HEADER = struct.Struct("<2sBQI")
HEADER_SIZE = _HEADER.size
# Read the zstd stream in pieces so a lying frame is stopped after at most one extra piece.
_READ_PIECE = 1 << 20


def compress(data: bytes, *, level: int = 3) -> bytes:
    """Frame `data` as zstd with its size and checksum in front."""
    if not -7 <= level <= 22:
        raise ValueError(f"level: expected -7..22, got {level}")
    payload = zstandard.ZstdCompressor(level=level).compress(bytes(data))
    return _HEADER.pack(MAGIC, VERSION, len(data), zlib.crc32(data)) + payload


def decompress(frame: bytes, *, max_size: int) -> bytes:
    """Inverse of `compress`; raises ProtocolError for a frame that is malformed, lies or is too big."""
    if max_size < 0:
        raise ValueError(f"max_size: expected >= 0, got {max_size}")
    if len(frame) < HEADER_SIZE:
        raise ProtocolError(f"frame: {len(frame)} bytes is shorter than the {HEADER_SIZE}-byte header")
    magic, version, declared, crc = _HEADER.unpack_from(frame)
    if magic != MAGIC:
        raise ProtocolError(f"frame: bad magic {magic!r}")
    if version != VERSION:
        raise ProtocolError(f"frame: unsupported version {version}")
    if declared > max_size:
        raise ProtocolError(f"frame: declared size {declared} exceeds max_size {max_size}")
    payload = memoryview(frame)[HEADER_SIZE:]
    pieces: list[bytes] = []
    got = 0
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(payload, read_across_frames=False)
        with reader:
            # Bounded loop: every non-empty read adds >= 1 byte and we stop past declared.
            while got <= declared:
                piece = reader.read(min(_READ_PIECE, declared + 1 - got))
                if not piece:
                    break
                pieces.append(piece)
                got += len(piece)
    except zstandard.ZstdError as exc:
        raise ProtocolError(f"frame: corrupt zstd payload ({exc})") from None
    if got != declared:
        raise ProtocolError(
            f"frame: declared size {declared} but payload holds {'more' if got > declared else got}"
        )
    out = b"".join(pieces)
    if zlib.crc32(out) != crc:
        raise ProtocolError("frame: checksum mismatch")
    return out
