"""Typed records for every message that crosses the network.

Records are plain frozen dataclasses; their field metadata declares the wire constraints (ranges,
lengths, patterns) that `swarmnode.protocol.codec` enforces on both encode and decode, so the
constraints live next to the fields they describe. Cross-field rules live in `_problems()`.

Top-level messages carry `version` (the protocol version they were written with). Records that only
appear nested inside a message (TaskRef, Completion, RolloutGroup, TensorComponents) take the
version of the message around them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from swarmnode.protocol import limits

# (major, minor): a node rejects messages of another major version; minor versions only add fields,
# which older nodes ignore.
PROTOCOL_VERSION: tuple[int, int] = (1, 1)  # 1.1: Presence.step_s

HASH_RE = re.compile(r"[0-9a-f]{64}")  # sha256, lowercase hex
OPT_HASH_RE = re.compile(r"(?:[0-9a-f]{64})?")  # "" before the first round
FINGERPRINT_RE = re.compile(r"[0-9a-f]{8,128}")
SWARM_RE = re.compile(r"[a-z0-9-]{1,64}")
# libp2p peer ids are base58btc (Qm..., 12D3Koo...); keep it permissive but printable.
PEER_ID_RE = re.compile(rf"[1-9A-HJ-NP-Za-km-z]{{1,{limits.MAX_PEER_ID_LEN}}}")
FAMILY_RE = re.compile(rf"[a-z0-9_.-]{{1,{limits.MAX_PROMPT_FAMILY_LEN}}}")
CODEC_RE = re.compile(rf"[a-z0-9_.+-]{{1,{limits.MAX_CODEC_LEN}}}")


def rules(**constraints: Any) -> dict[str, Any]:
    """Wire constraints for a dataclass field's metadata, enforced by the codec.

    Keys: min, max (numbers), min_len, max_len (str in UTF-8 bytes, bytes, lists), pattern (str),
    and the same with an `item_` prefix for the items of a list or tuple.
    """
    return constraints


def _version() -> Any:
    return field(default=PROTOCOL_VERSION, metadata={"version": True})


COUNT = {"min": 0, "max": limits.MAX_INT}
ANY_INT = {"min": limits.MIN_INT, "max": limits.MAX_INT}


@dataclass(frozen=True, kw_only=True, slots=True)
class Presence:
    """Who a node is and where it stands; gossiped periodically on the presence topic."""

    KIND: ClassVar[str] = "presence"
    MAX_BYTES: ClassVar[int] = limits.MAX_PRESENCE_BYTES

    peer_id: str = field(metadata=rules(pattern=PEER_ID_RE))
    addrs: list[str] = field(metadata=rules(max_len=limits.MAX_ADDRS, item_max_len=limits.MAX_ADDR_LEN))
    swarm: str = field(metadata=rules(pattern=SWARM_RE))
    cohort: str = field(metadata=rules(pattern=FINGERPRINT_RE))
    engine: Literal["hf", "vllm"]
    hardware: str = field(metadata=rules(max_len=limits.MAX_HARDWARE_LEN))
    step: int = field(metadata=rules(**COUNT))
    round: int = field(metadata=rules(**COUNT))
    samples: int = field(metadata=rules(**COUNT))
    anchor_hash: str = field(metadata=rules(pattern=OPT_HASH_RE))
    # "leaving": the node is shutting down; peers stop expecting its round contributions now instead
    # of after the peer timeout. "observing": a joiner that loaded the cohort's state merges the round
    # in flight without a contribution of its own; that round does not wait for it.
    status: Literal["active", "leaving", "observing"] = "active"
    # (1.1) its recent seconds per training step (0: not measured): a step round's collection waits
    # for the cohort's slowest step, and a fresh joiner has none of its own to go by.
    step_s: float = field(default=0.0, metadata=rules(min=0.0, max=limits.MAX_STEP_S))
    version: tuple[int, int] = _version()

    def _problems(self) -> Iterator[str]:
        for i, addr in enumerate(self.addrs):
            if not addr.startswith("/"):
                yield f"addrs[{i}]: expected a multiaddr starting with '/', got {addr[:40]!r}"


@dataclass(frozen=True, kw_only=True, slots=True)
class TaskRef:
    """Names a problem instead of carrying it: the receiver regenerates question and answer."""

    KIND: ClassVar[str] = "task_ref"
    MAX_BYTES: ClassVar[int] = limits.MAX_MANIFEST_BYTES

    family: str = field(metadata=rules(pattern=FAMILY_RE))
    seed: int = field(metadata=rules(**ANY_INT))
    index: int = field(metadata=rules(**COUNT))


@dataclass(frozen=True, kw_only=True, slots=True)
class Completion:
    """One sampled answer. `reward` is the sender's score, advisory only: receivers re-score."""

    KIND: ClassVar[str] = "completion"
    MAX_BYTES: ClassVar[int] = limits.MAX_GOSSIP_BYTES

    text: str = field(metadata=rules(max_len=limits.MAX_TEXT_BYTES))
    token_ids: list[int] = field(
        metadata=rules(max_len=limits.MAX_TOKENS_PER_COMPLETION, item_min=0, item_max=limits.MAX_TOKEN_ID)
    )
    logprobs: list[float] = field(metadata=rules(max_len=limits.MAX_TOKENS_PER_COMPLETION))
    reward: float = field(metadata=rules())

    def _problems(self) -> Iterator[str]:
        if self.logprobs and len(self.logprobs) != len(self.token_ids):
            yield (
                f"logprobs: expected {len(self.token_ids)} values (one per token) or none, "
                f"got {len(self.logprobs)}"
            )


@dataclass(frozen=True, kw_only=True, slots=True)
class RolloutGroup:
    """All completions of one prompt (a GRPO group)."""

    KIND: ClassVar[str] = "rollout_group"
    MAX_BYTES: ClassVar[int] = limits.MAX_GOSSIP_BYTES

    task: TaskRef
    completions: list[Completion] = field(metadata=rules(min_len=1, max_len=limits.MAX_COMPLETIONS_PER_GROUP))


@dataclass(frozen=True, kw_only=True, slots=True)
class RolloutBatch:
    """Rollouts shared with the swarm (SAPO). Never carries answers: only task references."""

    KIND: ClassVar[str] = "rollout_batch"
    MAX_BYTES: ClassVar[int] = limits.MAX_GOSSIP_BYTES

    author: str = field(metadata=rules(pattern=PEER_ID_RE))
    cohort: str = field(metadata=rules(pattern=FINGERPRINT_RE))
    policy_step: int = field(metadata=rules(**COUNT))
    created_at: float = field(metadata=rules(min=0.0))
    groups: list[RolloutGroup] = field(metadata=rules(max_len=limits.MAX_GROUPS_PER_BATCH))
    version: tuple[int, int] = _version()


@dataclass(frozen=True, kw_only=True, slots=True)
class TensorComponents:
    """Top-k DCT components of one parameter's momentum, coded by swarmnode.compression.components."""

    KIND: ClassVar[str] = "tensor_components"
    MAX_BYTES: ClassVar[int] = limits.MAX_GOSSIP_BYTES

    name: str = field(metadata=rules(min_len=1, max_len=limits.MAX_TENSOR_NAME_LEN))
    shape: tuple[int, ...] = field(
        metadata=rules(min_len=1, max_len=limits.MAX_TENSOR_DIMS, item_min=1, item_max=limits.MAX_TENSOR_DIM)
    )
    n_chunks: int = field(metadata=rules(min=1, max=limits.MAX_INT))
    k: int = field(metadata=rules(min=1, max=limits.MAX_CHUNK_NUMEL))
    chunk_numel: int = field(metadata=rules(min=1, max=limits.MAX_CHUNK_NUMEL))
    value_codec: Literal["int8", "sign"]
    payload: bytes = field(metadata=rules(max_len=limits.MAX_GOSSIP_BYTES))
    # A tensor too large for one message travels as parts: chunks [chunk_start, chunk_start +
    # part_chunks) of its n_chunks (part_chunks 0: all of them), each part decodable on its own.
    chunk_start: int = field(default=0, metadata=rules(**COUNT))
    part_chunks: int = field(default=0, metadata=rules(**COUNT))

    @property
    def rows(self) -> int:
        """How many chunks this record's payload covers."""
        return self.part_chunks or self.n_chunks

    def _problems(self) -> Iterator[str]:
        if self.k > self.chunk_numel:
            yield f"k: expected at most chunk_numel={self.chunk_numel}, got {self.k}"
        if self.chunk_start + self.rows > self.n_chunks:
            yield (
                f"chunk_start: chunks [{self.chunk_start}, {self.chunk_start + self.rows}) "
                f"exceed the tensor's {self.n_chunks}"
            )
        numel = math.prod(self.shape)
        if self.n_chunks * self.chunk_numel < numel:
            yield (
                f"n_chunks: {self.n_chunks} chunks of {self.chunk_numel} cannot cover "
                f"shape {self.shape} ({numel} elements)"
            )


@dataclass(frozen=True, kw_only=True, slots=True)
class DemoComponents:
    """One inner step's DeMo components from one cohort member."""

    KIND: ClassVar[str] = "demo"
    MAX_BYTES: ClassVar[int] = limits.MAX_GOSSIP_BYTES

    author: str = field(metadata=rules(pattern=PEER_ID_RE))
    cohort: str = field(metadata=rules(pattern=FINGERPRINT_RE))
    step: int = field(metadata=rules(**COUNT))
    lr: float = field(metadata=rules(min=0.0))
    tensors: list[TensorComponents] = field(metadata=rules(max_len=limits.MAX_TENSORS_PER_MESSAGE))
    version: tuple[int, int] = _version()

    def _problems(self) -> Iterator[str]:
        seen: set[str] = set()
        for i, t in enumerate(self.tensors):
            if t.name in seen:
                yield f"tensors[{i}].name: duplicate tensor {t.name!r}"
            seen.add(t.name)


@dataclass(frozen=True, kw_only=True, slots=True)
class RoundManifest:
    """Announces a DiLoCo pseudo-gradient blob for one round; peers pull it by content hash."""

    KIND: ClassVar[str] = "round_manifest"
    MAX_BYTES: ClassVar[int] = limits.MAX_MANIFEST_BYTES

    round: int = field(metadata=rules(**COUNT))
    author: str = field(metadata=rules(pattern=PEER_ID_RE))
    cohort: str = field(metadata=rules(pattern=FINGERPRINT_RE))
    weight: float = field(metadata=rules(min=0.0))  # samples processed this round: the averaging weight
    content_hash: str = field(metadata=rules(pattern=HASH_RE))
    size: int = field(metadata=rules(min=0, max=limits.MAX_BLOB_TOTAL_BYTES))
    codec: str = field(metadata=rules(pattern=CODEC_RE))
    anchor_hash: str = field(metadata=rules(pattern=OPT_HASH_RE))
    version: tuple[int, int] = _version()


@dataclass(frozen=True, kw_only=True, slots=True)
class StateManifest:
    """Announces a checkpoint blob a joiner can pull to catch up with the cohort."""

    KIND: ClassVar[str] = "state_manifest"
    MAX_BYTES: ClassVar[int] = limits.MAX_MANIFEST_BYTES

    cohort: str = field(metadata=rules(pattern=FINGERPRINT_RE))
    round: int = field(metadata=rules(**COUNT))
    step: int = field(metadata=rules(**COUNT))
    content_hash: str = field(metadata=rules(pattern=HASH_RE))
    size: int = field(metadata=rules(min=0, max=limits.MAX_BLOB_TOTAL_BYTES))
    anchor_hash: str = field(metadata=rules(pattern=OPT_HASH_RE))
    version: tuple[int, int] = _version()


@dataclass(frozen=True, kw_only=True, slots=True)
class BlobRequest:
    """Asks a provider for `length` bytes of a blob from `offset`, over BLOB_PROTOCOL."""

    KIND: ClassVar[str] = "blob_request"
    MAX_BYTES: ClassVar[int] = limits.MAX_BLOB_REQUEST_BYTES

    content_hash: str = field(metadata=rules(pattern=HASH_RE))
    offset: int = field(metadata=rules(min=0, max=limits.MAX_BLOB_TOTAL_BYTES))
    length: int = field(metadata=rules(min=1, max=limits.MAX_BLOB_CHUNK_BYTES))
    version: tuple[int, int] = _version()


@dataclass(frozen=True, kw_only=True, slots=True)
class BlobResponse:
    """One chunk of a blob, or `error` (non-empty, with no data) when it cannot be served."""

    KIND: ClassVar[str] = "blob_response"
    MAX_BYTES: ClassVar[int] = limits.MAX_BLOB_RESPONSE_BYTES

    content_hash: str = field(metadata=rules(pattern=HASH_RE))
    offset: int = field(metadata=rules(min=0, max=limits.MAX_BLOB_TOTAL_BYTES))
    total_size: int = field(metadata=rules(min=0, max=limits.MAX_BLOB_TOTAL_BYTES))
    data: bytes = field(metadata=rules(max_len=limits.MAX_BLOB_CHUNK_BYTES))
    error: str = field(default="", metadata=rules(max_len=limits.MAX_ERROR_LEN))
    version: tuple[int, int] = _version()

    def _problems(self) -> Iterator[str]:
        if self.error and self.data:
            yield "data: must be empty when error is set"
        if not self.error and self.offset + len(self.data) > self.total_size:
            yield (
                f"data: offset {self.offset} + {len(self.data)} bytes runs past total_size {self.total_size}"
            )


MESSAGE_TYPES: tuple[type, ...] = (
    Presence,
    RolloutBatch,
    DemoComponents,
    RoundManifest,
    StateManifest,
    BlobRequest,
    BlobResponse,
)
RECORD_TYPES: tuple[type, ...] = (*MESSAGE_TYPES, TaskRef, Completion, RolloutGroup, TensorComponents)
RECORDS_BY_KIND: dict[str, Any] = {cls.KIND: cls for cls in RECORD_TYPES}  # type: ignore[attr-defined]
