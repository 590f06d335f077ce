"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny local policy (character tokenizer + small Qwen2), built once per test session.

    A short warm-up keeps this to a few seconds; the model is a real HF directory, not a trained one.
    """
    from swarmnode.tinymodel import build_tiny_policy

    return build_tiny_policy(tmp_path_factory.mktemp("tiny-policy") / "model", warmup_steps=20)
