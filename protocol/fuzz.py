"""Deterministic fuzz driver for the decoder: hostile bytes in, only ProtocolError out.

No hypothesis here: the compression benchmark calls `fuzz_decode` to count cases, and the same
seed always yields the same inputs, so a failure found once can be replayed.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import msgpack
from swarmnode.protocol import codec, limits
from swarmnode.protocol.errors import ProtocolError
from swarmnode.protocol.records import (
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

_PEER = "12D3KooWGzh4j8BQnJ6Lm5vZcWqU8vF3sR9T7yNpXbHd2eKaYtCx"
_HASH = "ab" * 32


def sample_records(rng: random.Random) -> list[Any]:
    """One valid record of every kind, with sizes and values drawn from `rng`."""
    completions = [
        Completion(
            text="".join(rng.choice("0123456789 +=é") for _ in range(rng.randrange(0, 40))),
            token_ids=(ids := [rng.randrange(0, 50_000) for _ in range(rng.randrange(0, 20))]),
            logprobs=[-rng.random() * 5 for _ in ids] if rng.random() < 0.7 else [],
            reward=rng.random(),
        )
        for _ in range(rng.randrange(1, 5))
    ]
    group = RolloutGroup(
        task=TaskRef(family="add", seed=rng.randrange(-(2**40), 2**40), index=rng.randrange(1000)),
        completions=completions,
    )
    tensor = TensorComponents(
        name="model.layers.0.mlp.up_proj.weight",
        shape=(64, 128),
        n_chunks=2,
        k=rng.randrange(1, 33),
        chunk_numel=4096,
        value_codec=rng.choice(["int8", "sign"]),
        payload=rng.randbytes(rng.randrange(0, 64)),
    )
    cohort = f"{rng.getrandbits(64):016x}"
    return [
        Presence(
            peer_id=_PEER,
            addrs=["/ip4/127.0.0.1/tcp/4001"],
            swarm="demo",
            cohort=cohort,
            engine=rng.choice(["hf", "vllm"]),
            hardware="cpu",
            step=rng.randrange(100),
            round=rng.randrange(10),
            samples=rng.randrange(10_000),
            anchor_hash=rng.choice(["", _HASH]),
        ),
        RolloutBatch(author=_PEER, cohort=cohort, policy_step=7, created_at=1.7e9, groups=[group]),
        DemoComponents(author=_PEER, cohort=cohort, step=3, lr=1e-4, tensors=[tensor]),
        RoundManifest(
            round=2,
            author=_PEER,
            cohort=cohort,
            weight=128.0,
            content_hash=_HASH,
            size=10_000,
            codec="int8+zstd",
            anchor_hash=_HASH,
        ),
        StateManifest(cohort=cohort, round=2, step=40, content_hash=_HASH, size=99, anchor_hash=""),
        BlobRequest(content_hash=_HASH, offset=0, length=1024),
        BlobResponse(content_hash=_HASH, offset=0, total_size=8, data=rng.randbytes(8)),
        group,
        tensor,
    ]


def _random_obj(rng: random.Random, depth: int = 0) -> Any:
    r = rng.randrange(12 if depth < 3 else 8)
    if r == 0:
        return rng.choice([None, True, False])
    if r == 1:
        return rng.choice([0, -1, 1, 2**63 - 1, -(2**63), 2**64 - 1, rng.randrange(-1000, 1000)])
    if r == 2:
        return rng.choice([0.0, -0.0, float("nan"), float("inf"), float("-inf"), 1e308, rng.random()])
    if r == 3:
        return rng.choice(["", "add", "x" * rng.randrange(300), "é\u2028", "int8", "hf", _HASH, "v"])
    if r in (4, 5):
        return rng.randbytes(rng.randrange(0, 16))
    if r in (6, 7):
        return rng.choice(["kind", "v", "groups", "text", "shape", "data"])
    if r in (8, 9):
        return [_random_obj(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["kind", "v", "task", "seed", "x"]): _random_obj(rng, depth + 1) for _ in range(3)}


def _mutate(rng: random.Random, obj: Any) -> Any:
    """Replace, drop or retype one value somewhere inside a wire map/array tree."""
    if isinstance(obj, dict) and obj and rng.random() < 0.75:
        key = rng.choice(list(obj))
        out = dict(obj)
        r = rng.random()
        if r < 0.15:
            del out[key]
        elif r < 0.5:
            out[key] = _random_obj(rng)
        else:
            out[key] = _mutate(rng, obj[key])
        return out
    if isinstance(obj, list) and obj and rng.random() < 0.75:
        i = rng.randrange(len(obj))
        out_list = list(obj)
        out_list[i] = _mutate(rng, obj[i]) if rng.random() < 0.5 else _random_obj(rng)
        if rng.random() < 0.1:
            out_list = out_list * rng.randrange(2, 40)
        return out_list
    return _random_obj(rng)


def _deep(rng: random.Random) -> bytes:
    depth = rng.choice([10, 100, 1000, 5000, 100_000])
    opener = rng.choice([b"\x91", b"\x81\xa1k", b"\xdc\x00\x01"])
    return opener * depth + b"\xc0"


def fuzz_cases(n_cases: int, seed: int) -> Iterator[bytes]:
    """`n_cases` hostile inputs, the same ones for the same seed."""
    rng = random.Random(seed)
    valid = [codec.encode(r) for r in sample_records(rng)]
    wires = [msgpack.unpackb(v) for v in valid]
    for i in range(n_cases):
        mode = i % 7
        base = rng.choice(valid)
        if mode == 0:
            yield rng.randbytes(rng.randrange(0, 200))
        elif mode == 1:
            yield base[: rng.randrange(0, len(base))]
        elif mode == 2:
            flipped = bytearray(base)
            for _ in range(rng.randrange(1, 9)):
                flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
            yield bytes(flipped)
        elif mode in (3, 4):
            yield msgpack.packb(_mutate(rng, rng.choice(wires)), use_bin_type=rng.random() < 0.9)
        elif mode == 5:
            yield msgpack.packb(_random_obj(rng), use_bin_type=True)
        elif rng.random() < 0.5:
            yield _deep(rng)
        else:
            # Declared lengths far beyond the bytes present, and oversized inputs.
            yield rng.choice(
                [
                    b"\xdd\xff\xff\xff\xff",
                    b"\xdf\xff\xff\xff\xff",
                    b"\xc6\xff\xff\xff\xff",
                    b"\xdb\x7f\xff\xff\xff",
                    b"\x00" * (limits.MAX_MESSAGE_BYTES + 1),
                    b"\xc1",
                    b"\xd4\x00\x00",
                    b"\xd6\xff" + rng.randbytes(4),
                ]
            )


def fuzz_decode(n_cases: int, seed: int) -> tuple[int, int]:
    """Decode `n_cases` hostile inputs; return (cases, unexpected failures).

    An unexpected failure is any exception other than ProtocolError; decoding successfully is
    fine (a mutation can produce another valid message).
    """
    unexpected = 0
    cases = 0
    for data in fuzz_cases(n_cases, seed):
        cases += 1
        try:
            codec.decode(data)
        except ProtocolError:
            pass
        except Exception:  # the point of the driver: count whatever escapes the boundary
            unexpected += 1
    return cases, unexpected
