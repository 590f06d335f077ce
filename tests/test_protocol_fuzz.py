"""Hostile input never escapes the decoder as anything but ProtocolError."""

from __future__ import annotations

import contextlib
import random

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from swarmnode.protocol import codec, fuzz, limits
from swarmnode.protocol.errors import ProtocolError


def test_deterministic_fuzz_20k_cases() -> None:
    failures: list[tuple[bytes, BaseException]] = []
    cases = 0
    for data in fuzz.fuzz_cases(20_000, seed=1234):
        cases += 1
        try:
            codec.decode(data)
        except ProtocolError:
            pass
        except Exception as e:
            failures.append((data[:64], e))
    assert cases == 20_000
    assert failures == []


def test_fuzz_driver_counts_and_is_deterministic() -> None:
    assert fuzz.fuzz_decode(700, seed=3) == (700, 0)
    assert list(fuzz.fuzz_cases(50, seed=9)) == list(fuzz.fuzz_cases(50, seed=9))
    assert list(fuzz.fuzz_cases(50, seed=9)) != list(fuzz.fuzz_cases(50, seed=10))


def test_fuzz_cases_cover_every_kind_of_hostile_input() -> None:
    cases = list(fuzz.fuzz_cases(700, seed=0))
    assert any(len(c) > limits.MAX_MESSAGE_BYTES for c in cases)  # oversized
    assert any(c.startswith(b"\x91" * 1000) for c in cases)  # deeply nested
    decoded = 0
    for c in cases:
        try:
            codec.decode(c)
            decoded += 1
        except ProtocolError:
            pass
    # Mostly rejected, but mutations of valid messages sometimes stay valid: both paths exercised.
    assert 0 < decoded < len(cases) // 2


@pytest.mark.parametrize("depth", [10, 2_000, 200_000])
@pytest.mark.parametrize("opener", [b"\x91", b"\x81\xa1k", b"\x81\xa4kind"])
def test_deep_nesting(depth: int, opener: bytes) -> None:
    with pytest.raises(ProtocolError):
        codec.decode(opener * depth + b"\xc0")


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        codec.decode(data)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)


VALID_WIRES = [msgpack.unpackb(codec.encode(rec)) for rec in fuzz.sample_records(random.Random(0))]


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(VALID_WIRES), st.data())
def test_one_field_of_a_valid_message_replaced(wire: dict[str, object], data: st.DataObject) -> None:
    key = data.draw(st.sampled_from(sorted(wire)))
    value = data.draw(msgpack_values)
    packed = msgpack.packb({**wire, key: value}, use_bin_type=True)
    with contextlib.suppress(ProtocolError):
        codec.decode(packed)
