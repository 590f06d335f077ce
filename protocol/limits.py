"""Size limits for every message kind, checked before anything is allocated.

Each constant says why it has the value it has. The codec checks `len(data)` against the limit of
the kind before unpacking, and unpacks with msgpack's own per-object limits set from here, so a
hostile peer cannot make a node allocate more than a small multiple of the bytes it sent.
"""

KIB = 1024
MIB = 1024 * KIB

# py-libp2p drops gossip frames over 1 MiB silently (and per-peer queues hold only 32 packets), so
# gossip stays at half of that; anything larger travels as a manifest plus a pull over a stream.
MAX_GOSSIP_BYTES = 512 * KIB

# Presence is gossiped every few seconds by every node: it must stay tiny.
MAX_PRESENCE_BYTES = 8 * KIB
# Manifests only name a blob (hash, size, codec); a few hundred bytes in practice.
MAX_MANIFEST_BYTES = 4 * KIB
MAX_BLOB_REQUEST_BYTES = 1 * KIB

# Blob streams carried 10-100 MB at 48-90 MB/s on loopback; 4 MiB chunks keep a request/response
# round trip small against that throughput while bounding what one response can make us buffer.
MAX_BLOB_CHUNK_BYTES = 4 * MIB
# Room for the response's envelope (hash, offsets, error text) around one chunk.
MAX_BLOB_RESPONSE_BYTES = MAX_BLOB_CHUNK_BYTES + 4 * KIB
# A whole blob (a pseudo-gradient or a checkpoint) may be large, but not unbounded: 64 GiB covers
# a bf16 32B-parameter model and rejects absurd sizes before anyone starts pulling.
MAX_BLOB_TOTAL_BYTES = 64 * 1024 * MIB

# The largest message of any kind; decode() without an expected kind checks against this first.
MAX_MESSAGE_BYTES = MAX_BLOB_RESPONSE_BYTES

# Rollouts: G=8 is the SAPO default, 64 leaves room for larger groups without letting one group
# dominate a batch. 4096 tokens and 16 KiB of text bound a completion far above the verifiable
# tasks we train on (short arithmetic/logic answers with some reasoning).
MAX_COMPLETIONS_PER_GROUP = 64
MAX_TOKENS_PER_COMPLETION = 4096
MAX_TEXT_BYTES = 16 * KIB
MAX_PROMPT_FAMILY_LEN = 64
# A batch is bounded by MAX_GOSSIP_BYTES anyway; this caps the number of small groups.
MAX_GROUPS_PER_BATCH = 256
# Token ids are vocabulary indices; 2**31 is far above any real vocabulary and fits int32.
MAX_TOKEN_ID = 2**31 - 1

# DeMo: a 0.5B transformer has ~300 parameter tensors; 4096 leaves room for larger models.
MAX_TENSORS_PER_MESSAGE = 4096
MAX_TENSOR_NAME_LEN = 256
MAX_TENSOR_DIMS = 8
MAX_TENSOR_DIM = 2**31 - 1
# Chunks are 64x64 by default; 65536 allows 256x256 chunks and no more.
MAX_CHUNK_NUMEL = 65536

# Identity strings. Peer ids are ~52 base58 chars; multiaddrs rarely exceed 100 bytes.
MAX_PEER_ID_LEN = 128
MAX_ADDRS = 16
MAX_ADDR_LEN = 256
MAX_HARDWARE_LEN = 64
MAX_CODEC_LEN = 32
MAX_ERROR_LEN = 1 * KIB
MAX_STEP_S = 86400.0  # a presence's step time: a day a step is the slowest a peer may say it is

# Signed 64-bit range: what msgpack carries and what every peer implementation can represent.
MAX_INT = 2**63 - 1
MIN_INT = -(2**63)

# msgpack unpacker limits: the longest str, array and map any record may contain. They bound what a
# declared length can make the unpacker allocate; the codec enforces the per-field limits after.
UNPACK_MAX_STR_LEN = MAX_TEXT_BYTES
UNPACK_MAX_ARRAY_LEN = max(MAX_TOKENS_PER_COMPLETION, MAX_TENSORS_PER_MESSAGE)
# Records have at most a dozen fields; extra room lets newer minor versions add fields we ignore.
UNPACK_MAX_MAP_LEN = 64
