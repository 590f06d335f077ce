"""Rollout engine interface: sampling parameters, samples, and the engine factory.

Engines are synchronous (generation is heavy torch work); async callers wrap ``generate`` in
``asyncio.to_thread`` so gossip keeps flowing meanwhile.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass(kw_only=True, slots=True)
class SamplingParams:
    n: int = 1
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.n <= 1024:
            raise ValueError(f"n must be in [1, 1024], got {self.n}")
        if not 1 <= self.max_new_tokens <= 65536:
            raise ValueError(f"max_new_tokens must be in [1, 65536], got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be None or in [0, 2**63), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(slots=True)
class Sample:
    """One completion: generated token ids (including the final EOS when one was produced), the text
    (special tokens removed), and the logprob of each token id under the sampling distribution."""

    token_ids: list[int]
    text: str
    logprobs: list[float] = field(default_factory=list)


@runtime_checkable
class RolloutEngine(Protocol):
    name: str

    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[Sample]]:
        """``params.n`` samples for each prompt, in prompt order."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None: ...

    def close(self) -> None: ...


def make_engine(kind: str, policy: Any, **options: Any) -> RolloutEngine:
    """``"hf"``: transformers ``generate`` (CPU or GPU); ``"vllm"``: vLLM in-process (GPU, extra)."""
    if kind == "hf":
        from swarmnode.engines.hf import HFEngine

        return HFEngine(policy, **options)
    if kind == "vllm":
        from swarmnode.engines.vllm import VLLMEngine

        return VLLMEngine(policy, **options)
    raise ValueError(f"engine kind must be 'hf' or 'vllm', got {kind!r}")
