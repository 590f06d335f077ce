"""Wire protocol: typed records, msgpack codec, size limits, topic and stream names. Pure, no I/O."""

from swarmnode.protocol import codec, limits, topics
from swarmnode.protocol.codec import decode, encode
from swarmnode.protocol.errors import MessageTooLarge, ProtocolError
from swarmnode.protocol.records import (
    PROTOCOL_VERSION,
    BlobRequest,
    BlobResponse,
    Completion,
    DemoComponents,
    Presence,
    RolloutBatch,
    RolloutGroup,
    RoundManifest,
    StateManifest,
    TaskRef,
    TensorComponents,
)
from swarmnode.protocol.topics import BLOB_PROTOCOL, STATE_PROTOCOL, cohort_topic, topic

__all__ = [
    "BLOB_PROTOCOL",
    "PROTOCOL_VERSION",
    "STATE_PROTOCOL",
    "BlobRequest",
    "BlobResponse",
    "Completion",
    "DemoComponents",
    "MessageTooLarge",
    "Presence",
    "ProtocolError",
    "RolloutBatch",
    "RolloutGroup",
    "RoundManifest",
    "StateManifest",
    "TaskRef",
    "TensorComponents",
    "codec",
    "cohort_topic",
    "decode",
    "encode",
    "limits",
    "topic",
    "topics",
]
