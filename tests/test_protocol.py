"""Wire protocol: round trips of every record, each validation rule, versions, limits, topics."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from swarmnode.protocol import codec, limits, topics
from swarmnode.protocol import records as r
from swarmnode.protocol.errors import ProtocolError

from swarmnode import protocol

PEER = "12D3KooWGzh4j8BQnJ6Lm5vZcWqU8vF3sR9T7yNpXbHd2eKaYtCx"
HASH = "0123456789abcdef" * 4

# ---- hypothesis strategies, one per record ------------------------------------------------------

peer_ids = st.text(
    alphabet="123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz", min_size=1, max_size=60
)
fingerprints = st.text(alphabet="0123456789abcdef", min_size=8, max_size=64)
hashes = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)
opt_hashes = st.one_of(st.just(""), hashes)
counts = st.integers(min_value=0, max_value=limits.MAX_INT)
finite = st.floats(allow_nan=False, allow_infinity=False)
nonneg = st.floats(min_value=0.0, allow_nan=False, allow_infinity=False)

task_refs = st.builds(
    r.TaskRef,
    family=st.from_regex(r.FAMILY_RE, fullmatch=True),
    seed=st.integers(min_value=limits.MIN_INT, max_value=limits.MAX_INT),
    index=counts,
)


@st.composite
def completions(draw: Any) -> r.Completion:
    ids = draw(st.lists(st.integers(0, limits.MAX_TOKEN_ID), max_size=40))
    logprobs = draw(st.one_of(st.just([]), st.lists(finite, min_size=len(ids), max_size=len(ids))))
    return r.Completion(
        text=draw(st.text(max_size=200)), token_ids=ids, logprobs=logprobs, reward=draw(finite)
    )


groups = st.builds(
    r.RolloutGroup, task=task_refs, completions=st.lists(completions(), min_size=1, max_size=4)
)
batches = st.builds(
    r.RolloutBatch,
    author=peer_ids,
    cohort=fingerprints,
    policy_step=counts,
    created_at=nonneg,
    groups=st.lists(groups, max_size=3),
)


@st.composite
def tensor_components(draw: Any) -> r.TensorComponents:
    shape = tuple(draw(st.lists(st.integers(1, 300), min_size=1, max_size=3)))
    chunk_numel = draw(st.sampled_from([64, 4096]))
    n_chunks = -(-math.prod(shape) // chunk_numel)
    return r.TensorComponents(
        name=draw(st.text(min_size=1, max_size=60)),
        shape=shape,
        n_chunks=n_chunks,
        k=draw(st.integers(1, 64)),
        chunk_numel=chunk_numel,
        value_codec=draw(st.sampled_from(["int8", "sign"])),
        payload=draw(st.binary(max_size=300)),
    )


demos = st.builds(
    r.DemoComponents,
    author=peer_ids,
    cohort=fingerprints,
    step=counts,
    lr=nonneg,
    tensors=st.lists(tensor_components(), max_size=4, unique_by=lambda t: t.name),
)
presences = st.builds(
    r.Presence,
    peer_id=peer_ids,
    addrs=st.lists(st.text(max_size=60).map(lambda s: "/" + s), max_size=4),
    swarm=st.from_regex(r.SWARM_RE, fullmatch=True),
    cohort=fingerprints,
    engine=st.sampled_from(["hf", "vllm"]),
    hardware=st.text(max_size=16),
    step=counts,
    round=counts,
    samples=counts,
    anchor_hash=opt_hashes,
)
round_manifests = st.builds(
    r.RoundManifest,
    round=counts,
    author=peer_ids,
    cohort=fingerprints,
    weight=nonneg,
    content_hash=hashes,
    size=st.integers(0, limits.MAX_BLOB_TOTAL_BYTES),
    codec=st.from_regex(r.CODEC_RE, fullmatch=True),
    anchor_hash=opt_hashes,
)
state_manifests = st.builds(
    r.StateManifest,
    cohort=fingerprints,
    round=counts,
    step=counts,
    content_hash=hashes,
    size=st.integers(0, limits.MAX_BLOB_TOTAL_BYTES),
    anchor_hash=opt_hashes,
)
blob_requests = st.builds(
    r.BlobRequest,
    content_hash=hashes,
    offset=st.integers(0, limits.MAX_BLOB_TOTAL_BYTES),
    length=st.integers(1, limits.MAX_BLOB_CHUNK_BYTES),
)


@st.composite
def blob_responses(draw: Any) -> r.BlobResponse:
    data = draw(st.binary(max_size=500))
    offset = draw(st.integers(0, 10**9))
    return r.BlobResponse(
        content_hash=draw(hashes),
        offset=offset,
        total_size=offset + len(data) + draw(st.integers(0, 10**6)),
        data=data,
    )


ALL_RECORDS = st.one_of(
    presences,
    task_refs,
    completions(),
    groups,
    batches,
    tensor_components(),
    demos,
    round_manifests,
    state_manifests,
    blob_requests,
    blob_responses(),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ALL_RECORDS)
def test_every_record_round_trips(record: Any) -> None:
    data = codec.encode(record)
    assert codec.decode(data) == record
    assert codec.decode(data, type(record)) == record


# ---- fixed valid examples, mutated one field at a time ------------------------------------------


def completion(**kw: Any) -> r.Completion:
    return r.Completion(**{"text": "4", "token_ids": [5, 6], "logprobs": [-0.5, -0.1], "reward": 1.0, **kw})


def batch(**kw: Any) -> r.RolloutBatch:
    group = r.RolloutGroup(task=r.TaskRef(family="add", seed=1, index=2), completions=[completion()])
    return r.RolloutBatch(
        **{
            "author": PEER,
            "cohort": "deadbeef",
            "policy_step": 3,
            "created_at": 1.7e9,
            "groups": [group],
            **kw,
        }
    )


def wire(record: Any) -> dict[str, Any]:
    return msgpack.unpackb(codec.encode(record))


def rejects(obj: Any, match: str, expected: type | None = None) -> None:
    with pytest.raises(ProtocolError, match=match):
        codec.decode(msgpack.packb(obj, use_bin_type=True), expected)


def test_error_names_the_nested_field() -> None:
    w = wire(batch(groups=[batch().groups[0]] * 4))
    w["groups"][3]["task"]["seed"] = "7"
    rejects(w, r"^RolloutBatch\.groups\[3\]\.task\.seed: expected int, got str$")


def test_missing_field_is_named() -> None:
    w = wire(batch())
    del w["groups"][0]["completions"][0]["token_ids"]
    rejects(w, r"RolloutBatch\.groups\[0\]\.completions\[0\]\.token_ids: missing")


def test_unknown_fields_are_ignored() -> None:
    w = wire(batch())
    w["future_field"] = [1, 2, 3]
    w["groups"][0]["task"]["difficulty"] = "hard"
    assert codec.decode(msgpack.packb(w, use_bin_type=True)) == batch()


@pytest.mark.parametrize(
    ("path", "value", "match"),
    [
        (("policy_step",), True, "policy_step: expected int, got bool"),
        (("policy_step",), -1, r"policy_step: -1 out of range"),
        (("policy_step",), 2**64 - 1, "out of range"),
        (("created_at",), float("nan"), "created_at: expected a finite number"),
        (("created_at",), -5.0, "created_at: -5.0 out of range"),
        (("groups", 0, "completions", 0, "reward"), float("inf"), "reward: expected a finite number"),
        (("groups", 0, "completions", 0, "reward"), "1", "reward: expected float, got str"),
        (("groups", 0, "completions", 0, "logprobs", 1), float("-inf"), r"logprobs\[1\]: expected a finite"),
        (("groups", 0, "completions", 0, "logprobs"), [-1.0], "logprobs: expected 2 values"),
        (("groups", 0, "completions", 0, "token_ids", 0), -3, r"token_ids\[0\]: -3 out of range"),
        (("groups", 0, "completions", 0, "token_ids", 0), True, r"token_ids\[0\]: expected int, got bool"),
        (("groups", 0, "completions", 0, "token_ids"), [1] * 4097, "4097 (items|exceeds max_array_len)"),
        (("groups", 0, "completions", 0, "text"), "x" * (16 * 1024 + 1), "16385 exceeds max_str_len"),
        (("groups", 0, "completions", 0, "text"), b"raw", "text: expected str, got bytes"),
        (("groups", 0, "completions"), [], "completions: 0 items, expected 1 to 64"),
        (("groups", 0, "task", "family"), "Add!", "family: 'Add!' does not match"),
        (("groups", 0, "task", "index"), -1, "index: -1 out of range"),
        (("groups", 0, "task"), [1, 2, 3], "task: expected map, got array"),
        (("groups",), {}, "groups: expected array, got map"),
        (("author",), "0OIl", "author: '0OIl' does not match"),
        (("cohort",), "DEADBEEF", "cohort: 'DEADBEEF' does not match"),
    ],
)
def test_batch_field_rules(path: tuple[Any, ...], value: Any, match: str) -> None:
    w = wire(batch())
    target = w
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    rejects(w, match)


def test_completion_group_limit() -> None:
    w = wire(batch())
    w["groups"][0]["completions"] *= limits.MAX_COMPLETIONS_PER_GROUP + 1
    rejects(w, "65 items, expected 1 to 64")


def test_text_limit_counts_utf8_bytes() -> None:
    with pytest.raises(ProtocolError, match="16386 bytes of text, over the limit of 16384"):
        codec.encode(completion(text="é" * 8193))
    c = completion(text="é" * 8192)
    assert codec.decode(codec.encode(c)) == c


def test_empty_token_ids_and_logprobs_allowed() -> None:
    c = completion(token_ids=[], logprobs=[])
    assert codec.decode(codec.encode(c)) == c
    c = completion(logprobs=[])
    assert codec.decode(codec.encode(c)) == c


def test_batch_has_no_answer_field() -> None:
    names = {f.name for f in dataclasses.fields(r.RolloutBatch)} | {
        f.name for f in dataclasses.fields(r.Completion)
    }
    names |= {f.name for f in dataclasses.fields(r.TaskRef)} | {
        f.name for f in dataclasses.fields(r.RolloutGroup)
    }
    assert "answer" not in names


def tensor(**kw: Any) -> r.TensorComponents:
    base = {"name": "w", "shape": (64, 64), "n_chunks": 1, "k": 32, "chunk_numel": 4096}
    return r.TensorComponents(**{**base, "value_codec": "int8", "payload": b"\x01\x02", **kw})


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"k": 5000}, "k: expected at most chunk_numel=4096"),
        ({"n_chunks": 1, "shape": (128, 64)}, "n_chunks: 1 chunks of 4096 cannot cover"),
        ({"shape": ()}, "shape: 0 items"),
        ({"shape": (0, 4)}, r"shape\[0\]: 0 out of range"),
        ({"value_codec": "fp8"}, "value_codec: expected one of int8, sign, got 'fp8'"),
        ({"name": ""}, "name: must not be empty"),
        ({"payload": "not bytes"}, "payload: expected bin, got str"),
    ],
)
def test_tensor_component_rules(kw: dict[str, Any], match: str) -> None:
    demo = r.DemoComponents(author=PEER, cohort="cafe0123", step=1, lr=0.1, tensors=[tensor(**kw)])
    with pytest.raises(ProtocolError, match=match):
        codec.encode(demo)
    w = wire(r.DemoComponents(author=PEER, cohort="cafe0123", step=1, lr=0.1, tensors=[tensor()]))
    w["tensors"][0].update({k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()})
    rejects(w, r"DemoComponents\.tensors\[0\]\." + match)


def test_demo_rejects_duplicate_tensors_and_bad_lr() -> None:
    demo = r.DemoComponents(author=PEER, cohort="cafe0123", step=1, lr=0.1, tensors=[tensor(), tensor()])
    with pytest.raises(ProtocolError, match=r"tensors\[1\]\.name: duplicate tensor 'w'"):
        codec.encode(demo)
    w = wire(dataclasses.replace(demo, tensors=[tensor()]))
    w["lr"] = float("nan")
    rejects(w, "DemoComponents.lr: expected a finite number")


def manifest(**kw: Any) -> r.RoundManifest:
    base = {"round": 3, "author": PEER, "cohort": "cafe0123", "weight": 64.0, "content_hash": HASH}
    return r.RoundManifest(**{**base, "size": 1000, "codec": "int8+zstd", "anchor_hash": "", **kw})


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"content_hash": HASH.upper()}, "content_hash: .* does not match"),
        ({"content_hash": HASH[:-1]}, "content_hash: .* does not match"),
        ({"anchor_hash": "abc"}, "anchor_hash: 'abc' does not match"),
        ({"weight": -1.0}, r"weight: -1\.0 out of range"),
        ({"weight": float("nan")}, "weight: expected a finite number"),
        ({"size": -1}, "size: -1 out of range"),
        ({"codec": "bad codec"}, "codec: 'bad codec' does not match"),
    ],
)
def test_manifest_rules(kw: dict[str, Any], match: str) -> None:
    w = wire(manifest())
    w.update(kw)
    rejects(w, "RoundManifest." + match)


def test_int_accepted_for_float_fields() -> None:
    w = wire(manifest())
    w["weight"] = 64
    decoded = codec.decode(msgpack.packb(w), r.RoundManifest)
    assert decoded.weight == 64.0
    assert type(decoded.weight) is float


def test_presence_rules() -> None:
    p = r.Presence(
        peer_id=PEER,
        addrs=["/ip4/127.0.0.1/tcp/4001"],
        swarm="demo-1",
        cohort="cafe0123",
        engine="hf",
        hardware="cpu",
        step=0,
        round=0,
        samples=0,
        anchor_hash="",
    )
    assert codec.decode(codec.encode(p), r.Presence) == p
    older = wire(p)
    del older["step_s"]  # a 1.0 peer's presence has no step time: it decodes, as not measured
    assert codec.decode(msgpack.packb(older), r.Presence).step_s == 0.0
    for field, value, match in [
        ("engine", "tgi", "engine: expected one of hf, vllm"),
        ("swarm", "Demo", "swarm: 'Demo' does not match"),
        ("addrs", ["ip4/1.2.3.4"], r"addrs\[0\]: expected a multiaddr"),
        ("addrs", ["/x"] * 17, "addrs: 17 items"),
        ("samples", 1.0, "samples: expected int, got float"),
        ("step_s", -1.0, "step_s"),
        ("step_s", 1e9, "step_s"),
    ]:
        w = wire(p)
        w[field] = value
        rejects(w, "Presence." + field if "[" not in match else match)
        rejects(w, match)


def test_blob_response_rules() -> None:
    ok = r.BlobResponse(content_hash=HASH, offset=4, total_size=8, data=b"abcd")
    assert codec.decode(codec.encode(ok), r.BlobResponse) == ok
    err = r.BlobResponse(content_hash=HASH, offset=0, total_size=0, data=b"", error="not found")
    assert codec.decode(codec.encode(err)) == err
    with pytest.raises(ProtocolError, match="runs past total_size 7"):
        codec.encode(dataclasses.replace(ok, total_size=7))
    with pytest.raises(ProtocolError, match="must be empty when error is set"):
        codec.encode(dataclasses.replace(ok, error="oops"))
    w = wire(ok)
    del w["error"]  # optional: defaults to no error
    assert codec.decode(msgpack.packb(w)) == ok
    with pytest.raises(ProtocolError, match="length: 0 out of range"):
        codec.encode(r.BlobRequest(content_hash=HASH, offset=0, length=0))


# ---- envelope: kind, version, sizes -------------------------------------------------------------


def test_other_major_version_rejected_with_spoken_versions() -> None:
    w = wire(manifest())
    w["v"] = [2, 0]
    rejects(w, r"protocol version 2\.0 is not spoken here; this node speaks 1\.x")
    # A version error wins over field errors: a 2.x message may legitimately look different.
    del w["content_hash"]
    rejects(w, "version 2.0 is not spoken")


def test_newer_minor_version_accepted() -> None:
    w = wire(manifest())
    w["v"] = [1, 7]
    w["added_in_1_7"] = "ignored"
    decoded = codec.decode(msgpack.packb(w), r.RoundManifest)
    assert decoded.version == (1, 7)
    assert codec.decode(codec.encode(decoded)) == decoded


@pytest.mark.parametrize("v", [None, [1], [1, 0, 0], ["1", "0"], [True, 0], [-1, 0], "1.0"])
def test_malformed_version_rejected(v: Any) -> None:
    w = wire(manifest())
    if v is None:
        del w["v"]
    else:
        w["v"] = v
    rejects(w, r"RoundManifest\.v: expected \[major, minor\]")


def test_every_message_carries_the_version() -> None:
    for cls in r.MESSAGE_TYPES:
        assert "version" in {f.name for f in dataclasses.fields(cls)}, cls
    assert wire(manifest())["v"] == [1, 1]
    assert protocol.PROTOCOL_VERSION == (1, 1)


def test_kind_checks() -> None:
    data = codec.encode(manifest())
    with pytest.raises(ProtocolError, match="kind: expected 'rollout_batch', got 'round_manifest'"):
        codec.decode(data, r.RolloutBatch)
    w = wire(manifest())
    w["kind"] = "pickle"
    rejects(w, "unknown message kind 'pickle'")
    del w["kind"]
    rejects(w, "unknown message kind nil")


def test_oversized_input_rejected_before_unpacking(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real_unpackb = msgpack.unpackb

    def counting_unpackb(data: bytes, **kw: Any) -> Any:
        calls.append(len(data))
        return real_unpackb(data, **kw)

    monkeypatch.setattr(codec.msgpack, "unpackb", counting_unpackb)
    with pytest.raises(protocol.MessageTooLarge, match="over the limit of 1024"):
        codec.decode(b"\x80" * (limits.MAX_BLOB_REQUEST_BYTES + 1), r.BlobRequest)
    with pytest.raises(ProtocolError, match="over the limit"):
        codec.decode(b"\x80" * (limits.MAX_MESSAGE_BYTES + 1))
    assert calls == []
    # Without an expected kind, the kind's own limit applies once the tag is known.
    w = wire(manifest())
    w["padding"] = b"x" * limits.MAX_MANIFEST_BYTES
    rejects(w, "RoundManifest: .* bytes, over the limit of 4096")


def test_declared_lengths_beyond_caps_do_not_allocate() -> None:
    # Headers claiming 4 GiB arrays/maps/bins/strs with no payload behind them.
    for data in [
        b"\xdd\xff\xff\xff\xff",
        b"\xdf\xff\xff\xff\xff",
        b"\xc6\xff\xff\xff\xff",
        b"\xdb\xff\xff\xff\xff",
    ]:
        with pytest.raises(ProtocolError, match="not a valid msgpack message"):
            codec.decode(data)


def test_container_flood_stopped_during_unpacking() -> None:
    # 512 KiB of empty arrays would expand ~60x in Python; the budget stops it part way.
    flood = b"\x81\xa1x\xdd\x00\x00\x00\x78" + (b"\xdc\x10\x00" + b"\x90" * 4096) * 120
    with pytest.raises(ProtocolError, match="more than one array or map per 8 bytes"):
        codec.decode(flood, r.RolloutBatch)


def test_densest_valid_batch_is_within_container_budget() -> None:
    empty = r.Completion(text="", token_ids=[], logprobs=[], reward=0.0)
    group = r.RolloutGroup(task=r.TaskRef(family="a", seed=0, index=0), completions=[empty] * 64)
    dense = r.RolloutBatch(author="1", cohort="deadbeef", policy_step=0, created_at=0.0, groups=[group] * 40)
    assert codec.decode(codec.encode(dense)) == dense
    demo = r.DemoComponents(
        author="1",
        cohort="deadbeef",
        step=0,
        lr=0.0,
        tensors=[tensor(name=str(i), payload=b"") for i in range(500)],
    )
    assert codec.decode(codec.encode(demo)) == demo


def test_ext_types_and_non_string_keys_rejected() -> None:
    w = wire(manifest())
    packed = msgpack.packb({**w, "x": msgpack.ExtType(1, b"ab")}, use_bin_type=True)
    with pytest.raises(ProtocolError, match="max_ext_len"):
        codec.decode(packed)
    with pytest.raises(ProtocolError, match="map key"):
        codec.decode(msgpack.packb({**w, 7: 1}))


def test_encode_refuses_oversized_and_foreign_values() -> None:
    big = [completion(text="x" * 16_000, token_ids=[], logprobs=[])] * 64
    group = r.RolloutGroup(task=r.TaskRef(family="add", seed=0, index=0), completions=big)
    with pytest.raises(
        protocol.MessageTooLarge, match="over its limit of 524288; split it or send it as a blob"
    ):
        codec.encode(batch(groups=[group]))
    with pytest.raises(
        ProtocolError, match=r"cannot encode: RolloutBatch\.policy_step: expected int, got float"
    ):
        codec.encode(batch(policy_step=3.0))
    with pytest.raises(TypeError, match="not a protocol record"):
        codec.encode({"kind": "presence"})


def test_decode_requires_bytes_and_a_record_type() -> None:
    with pytest.raises(ProtocolError, match="expected bytes, got str"):
        codec.decode("hello")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be a protocol record type"):
        codec.decode(codec.encode(manifest()), dict)
    assert codec.decode(bytearray(codec.encode(manifest()))) == manifest()


# ---- topics -------------------------------------------------------------------------------------


def test_topics() -> None:
    assert protocol.topic("demo-1", topics.ROLLOUTS) == "/swarmnode/demo-1/rollouts/1"
    assert protocol.topic("s", "presence", version="2") == "/swarmnode/s/presence/2"
    assert protocol.cohort_topic("s", topics.DEMO, "cafe0123") == "/swarmnode/s/demo/cafe0123/1"
    assert protocol.BLOB_PROTOCOL == "/swarmnode/blob/1.0.0"
    assert protocol.STATE_PROTOCOL == "/swarmnode/state/1.0.0"


@pytest.mark.parametrize("swarm", ["", "Demo", "a/b", "a" * 65, "dé", "a b"])
def test_invalid_swarm_ids(swarm: str) -> None:
    with pytest.raises(ProtocolError, match=r"swarm id .* is invalid"):
        protocol.topic(swarm, "rollouts")


def test_invalid_topic_parts() -> None:
    with pytest.raises(ProtocolError, match="topic kind"):
        protocol.topic("s", "roll/outs")
    with pytest.raises(ProtocolError, match="topic fingerprint"):
        protocol.cohort_topic("s", "demo", "not-hex")
    with pytest.raises(ProtocolError, match="topic version"):
        protocol.topic("s", "demo", version="1/2")
