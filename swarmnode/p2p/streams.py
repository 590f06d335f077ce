"""Direct-stream protocols: content-addressed blob pulls and generic request/response.

Anything over ~512 KB travels as a gossiped manifest plus a pull over a direct stream: streams carried
10–100 MB at 48–90 MB/s with flat memory, where gossip frames are capped at 1 MiB.

Framing (never pickle): every frame is `u32 big-endian length + body`. Blob pulls exchange
`swarmnode.protocol` BlobRequest/BlobResponse records, one chunk per request, many requests per stream;
request/response streams carry a msgpack status header and the raw response.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import trio

from swarmnode.protocol import BLOB_PROTOCOL, BlobRequest, BlobResponse, codec
from swarmnode.protocol.errors import ProtocolError

log = logging.getLogger(__name__)

# Headers are tiny maps; anything bigger is garbage or an attack.
MAX_HEADER_BYTES = 4096
# One BlobResponse carries at most this much (the protocol's chunk cap); a 50 MB blob is 13 round trips.
BLOB_CHUNK = 4 << 20
# Bounds the request loop of one blob stream (a 1 GiB blob is 256 chunks).
MAX_REQUESTS_PER_STREAM = 1 << 16
# How long a blob request waits for a blob we are still pulling ourselves at most (``BlobStore``).
MAX_HOLD_S = 600.0
HOLD_POLL_S = 0.05
MAX_EXPECTED = 4096
READ_CHUNK = 1 << 16
_LEN = struct.Struct(">I")


class TransportError(RuntimeError):
    """A request or fetch could not be completed (peer unreachable, remote error, timeout)."""


async def read_exactly(stream: Any, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.read(min(READ_CHUNK, n - len(buf)))
        if not chunk:
            raise ProtocolError(f"stream ended after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


async def write_frame(stream: Any, payload: bytes) -> None:
    await stream.write(_LEN.pack(len(payload)) + payload)


async def read_frame(stream: Any, max_bytes: int) -> bytes:
    (size,) = _LEN.unpack(await read_exactly(stream, _LEN.size))
    if size > max_bytes:
        raise ProtocolError(f"frame of {size} bytes exceeds the {max_bytes}-byte limit")
    return await read_exactly(stream, size)


async def write_header(stream: Any, header: dict[str, Any]) -> None:
    await write_frame(stream, msgpack.packb(header, use_bin_type=True))


async def read_header(stream: Any) -> dict[str, Any]:
    raw = await read_frame(stream, MAX_HEADER_BYTES)
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:
        raise ProtocolError(f"header is not valid msgpack: {exc}") from exc
    if not isinstance(header, dict):
        raise ProtocolError("header must be a msgpack map")
    return header


@dataclass(slots=True)
class BlobStats:
    provided: int = 0
    bytes_held: int = 0
    served_requests: int = 0
    served_bytes: int = 0
    serve_errors: int = 0
    fetched: int = 0
    fetched_bytes: int = 0
    fetch_failures: int = 0
    provider_failures: int = 0
    held_requests: int = 0  # requests for a blob we were still pulling, answered once it was here

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class BlobView:
    """A blob read on demand from memory its owner keeps (a chunk of live tensors): served without an
    encoded copy. The owner names its digest; if the memory changes, requesters' hash checks fail
    and they move to another provider, so a view can never make a peer accept wrong bytes."""

    size: int
    read: Callable[[int, int], bytes]  # (start, end) -> bytes [start, end)

    def __len__(self) -> int:
        return self.size


class BlobStore:
    """Blobs this node serves, keyed by sha256 hex. Plain dict: `bytes` are immutable and shared.

    A request for a blob we are still pulling ourselves (``expect``) is held until the blob is here
    (at most until the pull's deadline, ``MAX_HOLD_S``): what lets a relay tree (``exchange.fanin``)
    ask its parent at once instead of polling. A blob we neither hold nor pull is refused at once."""

    def __init__(self, stats: BlobStats) -> None:
        self._blobs: dict[str, bytes | BlobView] = {}
        self._expected: dict[str, float] = {}  # digest -> when our own pull of it gives up (monotonic)
        self.stats = stats

    def expect(self, digest: str, until: float) -> None:
        """We are pulling ``digest`` until ``until`` (``time.monotonic``): hold requests for it."""
        self._expected[digest] = until
        while len(self._expected) > MAX_EXPECTED:
            self._expected.pop(next(iter(self._expected)))

    def unexpect(self, digest: str) -> None:
        self._expected.pop(digest, None)

    async def _lookup(self, digest: str) -> bytes | BlobView | None:
        data = self._blobs.get(digest)
        if data is not None:
            return data
        t0 = time.monotonic()
        while True:
            now = time.monotonic()
            until = min(self._expected.get(digest, 0.0), t0 + MAX_HOLD_S)
            if now >= until:
                return None
            await trio.sleep(min(HOLD_POLL_S, until - now))
            data = self._blobs.get(digest)
            if data is not None:
                self.stats.held_requests += 1
                return data

    def provide(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        if digest not in self._blobs:
            self._blobs[digest] = bytes(data)
            self.stats.provided += 1
            self.stats.bytes_held += len(data)
        return digest

    def provide_view(self, digest: str, view: BlobView) -> None:
        if digest not in self._blobs:
            self._blobs[digest] = view
            self.stats.provided += 1

    def remove(self, digest: str) -> None:
        data = self._blobs.pop(digest, None)
        if isinstance(data, bytes):
            self.stats.bytes_held -= len(data)

    async def serve(self, stream: Any) -> None:
        """Answer BlobRequests on one stream until the requester closes it."""
        try:
            for _ in range(MAX_REQUESTS_PER_STREAM):
                raw = await read_frame_or_eof(stream, BlobRequest.MAX_BYTES)
                if raw is None:
                    return
                req = codec.decode(raw, BlobRequest)
                data = await self._lookup(req.content_hash) if req.offset == 0 else None
                await write_frame(stream, codec.encode(self._answer(req, data)))
        except Exception as exc:  # a bad peer must never take the handler down
            self.stats.serve_errors += 1
            log.info("blob request failed: %s", exc)
            await _reset(stream)
        finally:
            await _close(stream)

    def _answer(self, req: BlobRequest, data: bytes | BlobView | None = None) -> BlobResponse:
        data = self._blobs.get(req.content_hash) if data is None else data
        if data is None or req.offset > len(data):
            error = "unknown blob" if data is None else "offset past the end of the blob"
            return BlobResponse(
                content_hash=req.content_hash, offset=req.offset, total_size=0, data=b"", error=error
            )
        end = min(len(data), req.offset + req.length)
        if isinstance(data, BlobView):
            try:
                chunk = data.read(req.offset, end)
            except Exception as exc:  # the owner's memory went away (e.g. replaced by a merge)
                return BlobResponse(
                    content_hash=req.content_hash,
                    offset=req.offset,
                    total_size=0,
                    data=b"",
                    error=f"unavailable: {exc}"[:200],
                )
        else:
            chunk = data[req.offset : end]
        self.stats.served_requests += 1
        self.stats.served_bytes += len(chunk)
        return BlobResponse(
            content_hash=req.content_hash, offset=req.offset, total_size=len(data), data=chunk
        )


async def read_frame_or_eof(stream: Any, max_bytes: int) -> bytes | None:
    first = await stream.read(_LEN.size)
    if not first:
        return None
    prefix = first + await read_exactly(stream, _LEN.size - len(first)) if len(first) < _LEN.size else first
    (size,) = _LEN.unpack(prefix)
    if size > max_bytes:
        raise ProtocolError(f"frame of {size} bytes exceeds the {max_bytes}-byte limit")
    return await read_exactly(stream, size)


class FileSink:
    """Where ``fetch_from`` appends a blob that should not live in memory (a 0.5 GB pseudo-gradient):
    a file, hashed as it is written. ``len``/``extend``/``clear`` like the bytearray it stands in for."""

    def __init__(self, path: Any) -> None:
        self.path = path
        self._file = open(path, "wb")  # noqa: SIM115 (closed by close())
        self._hash = hashlib.sha256()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def extend(self, data: bytes) -> None:
        self._file.write(data)
        self._hash.update(data)
        self._size += len(data)

    def clear(self) -> None:
        self._file.seek(0)
        self._file.truncate()
        self._hash = hashlib.sha256()
        self._size = 0

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def close(self) -> None:
        self._file.close()


async def fetch_from(
    open_stream: Any, digest: str, provider: str, buf: bytearray | FileSink, max_size: int
) -> None:
    """Pull the rest of blob `digest` (from len(buf) on) from one provider into buf, chunk by chunk."""
    stream = await open_stream(provider, BLOB_PROTOCOL)
    try:
        total: int | None = None
        while total is None or len(buf) < total:
            req = BlobRequest(content_hash=digest, offset=len(buf), length=BLOB_CHUNK)
            await write_frame(stream, codec.encode(req))
            resp = codec.decode(await read_frame(stream, BlobResponse.MAX_BYTES), BlobResponse)
            if resp.error:
                raise TransportError(f"provider {provider} refused: {resp.error}")
            if resp.content_hash != digest or resp.offset != req.offset:
                raise ProtocolError(f"provider {provider} answered a different blob or range")
            if resp.total_size > max_size:
                raise TransportError(
                    f"blob {digest[:12]} is {resp.total_size} bytes, over the {max_size}-byte cap"
                )
            if total is not None and resp.total_size != total:
                raise ProtocolError(f"provider {provider} changed the blob size mid-transfer")
            total = resp.total_size
            if not resp.data and len(buf) < total:
                raise ProtocolError(f"provider {provider} sent an empty chunk before the end")
            buf.extend(resp.data)
    finally:
        await _close(stream)


async def _close(stream: Any) -> None:
    with trio.move_on_after(1.0):
        # Closing a broken stream may fail; there is nothing left to do then.
        with contextlib.suppress(Exception):
            await stream.close()


async def _reset(stream: Any) -> None:
    with trio.move_on_after(1.0):
        with contextlib.suppress(Exception):
            await stream.reset()
