"""Inner optimizers: AdamW (torch) and DeMo (``optim.demo``); DiLoCo outer steps live in ``optim.diloco``."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

OPTIMIZERS = ("adamw", "demo")


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    demo_beta: float = 0.999
    demo_k: int = 32
    demo_chunk: int = 64
    demo_use_dct: bool = True

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr: expected > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay: expected >= 0, got {self.weight_decay}")


def build_optimizer(
    name: str, named_params: Iterable[tuple[str, torch.nn.Parameter]], config: Any = None
) -> torch.optim.Optimizer:
    """``config`` is an :class:`OptimConfig` or anything with an ``lr`` (e.g. ``GRPOConfig``).

    The lr is used as given for either optimizer: DeMo's lr is the size of a sign step, so callers
    pick it per optimizer (AdamW ~1e-4..1e-3, DeMo ~1e-3..3e-3 for tiny models).
    """
    cfg = config if isinstance(config, OptimConfig) else OptimConfig(lr=getattr(config, "lr", 1e-4))
    named = [(n, p) for n, p in named_params if p.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW(
            [p for _, p in named], lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
        )
    if name == "demo":
        from swarmnode.optim.demo import DeMo

        return DeMo(
            named,
            lr=cfg.lr,
            beta=cfg.demo_beta,
            k=cfg.demo_k,
            chunk=cfg.demo_chunk,
            use_dct=cfg.demo_use_dct,
            weight_decay=cfg.weight_decay,
        )
    raise ValueError(f"optimizer: expected one of {OPTIMIZERS}, got {name!r}")
