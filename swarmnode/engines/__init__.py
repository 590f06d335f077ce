"""Rollout engines: HF ``generate`` on any device, vLLM on GPU (optional extra)."""

from swarmnode.engines.base import RolloutEngine, Sample, SamplingParams, make_engine

__all__ = ["RolloutEngine", "Sample", "SamplingParams", "make_engine"]
