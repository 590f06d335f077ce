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
# zstd allocates its window from the frame header, not from our declared size: cap it. Levels up to
# 19 use at most 2^23 (8 MiB); zstd shrinks the window to the content size for smaller inputs.
_MAX_WINDOW_LOG = 23
_MAX_LEVEL = 19


def compress(data: bytes, *, level: int = 3) -> bytes:
    """Frame `data` as zstd with its size and checksum in front."""
    if not -7 <= level <= _MAX_LEVEL:
        raise ValueError(f"level: expected -7..{_MAX_LEVEL}, got {level}")
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
        window_log = min(_MAX_WINDOW_LOG, max(10, (declared - 1).bit_length()))
        decompressor = zstandard.ZstdDecompressor(max_window_size=1 << window_log)
        reader = decompressor.stream_reader(payload, read_across_frames=False)
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
