"""Tiny model variant names: what each builds, and what is not one."""

from __future__ import annotations

import pytest

from swarmnode.tinymodel import tiny_variant


def test_variant_names_give_width_layers_and_warm_up() -> None:
    assert tiny_variant("tiny-64") == {"hidden_size": 64}
    assert tiny_variant("tiny-128x3-w100") == {"hidden_size": 128, "num_layers": 3, "warmup_steps": 100}
    assert tiny_variant("tiny") is None
    assert tiny_variant("/models/tiny-64") is None  # a directory, not a variant


def test_an_impossible_variant_is_an_error() -> None:
    with pytest.raises(ValueError, match="hidden_size"):
        tiny_variant("tiny-6")
