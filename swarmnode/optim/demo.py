"""DeMo: decoupled momentum with DCT top-k components (after bloc97/DeMo).

Per parameter, each step:

1. momentum ``delta <- beta * delta + lr * grad``. beta = 0.999 (the reference default): DeMo's momentum
   is not a smoothed gradient but an accumulator of everything not yet sent, so it must decay slowly
   or the error feedback forgets the mass it is holding back.
2. chunked DCT-II of delta (64x64 chunks for matrices, 64 for vectors), keep the top-k (32) coefficients
   per chunk by magnitude: the "fast components" gossiped to the cohort.
3. error feedback: subtract what was sent from delta. The DCT is orthonormal, so subtracting the
   inverse transform of the sent coefficients equals subtracting them in the transform domain.
4. aggregate own + peers' components, averaging each coefficient over the peers that *selected* it (the
   reference's choice: a coefficient picked by one peer is not diluted by those that did not pick it),
   inverse DCT, and ``p <- p - lr * sign(Q)`` with optional decoupled weight decay.

The lr scales a sign update (every element moves by exactly lr each step), comparable to Adam's
effective step size. 2e-3 is the constructor default (toy problems, few steps); for RL on the tiny
local model, which takes thousands of steps, ``swarmnode train`` uses 5e-4 (2e-3 collapsed the policy
there). With no peers DeMo is signSGD on the top-k part of an error-fed momentum, which trains on its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

Components = dict[str, tuple[torch.Tensor, torch.Tensor]]


class DeMo(torch.optim.Optimizer):
    def __init__(
        self,
        named_params: Iterable[tuple[str, torch.nn.Parameter]],
        *,
        lr: float = 2e-3,
        beta: float = 0.999,
        k: int = 32,
        chunk: int = 64,
        use_dct: bool = True,
        weight_decay: float = 0.0,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"lr: expected > 0, got {lr}")
        if not 0 <= beta < 1:
            raise ValueError(f"beta: expected 0 <= beta < 1, got {beta}")
        if k < 1 or chunk < 1:
            raise ValueError(f"k, chunk: expected >= 1, got {k}, {chunk}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay: expected >= 0, got {weight_decay}")
        from swarmnode.compression.dct import ChunkedDCT  # late: compression imports stay off the CLI path

        named = [(n, p) for n, p in named_params if p.requires_grad]
        if not named:
            raise ValueError("named_params: no trainable parameters")
        self.names = [n for n, _ in named]
        self._by_name = dict(named)
        defaults = {"lr": lr, "beta": beta, "weight_decay": weight_decay}
        super().__init__([p for _, p in named], defaults)
        self.k = k
        self.transforms = {n: ChunkedDCT(tuple(p.shape), chunk=chunk, use_dct=use_dct) for n, p in named}
        self._own: Components | None = None
        self.last_energy_ratio = float("nan")

    def _delta(self, p: torch.Tensor) -> torch.Tensor:
        state = self.state[p]
        if "delta" not in state:
            state["delta"] = torch.zeros_like(p, dtype=torch.float32)
        return state["delta"]

    @torch.no_grad()
    def compute_components(self) -> Components:
        """After backward: momentum update, DCT, top-k, error feedback. Returns what to gossip."""
        from swarmnode.compression.dct import energy_ratio, scatter_chunks, topk_chunks

        group = self.param_groups[0]
        out: Components = {}
        energies, weights = [], []
        for name in self.names:
            p = self._by_name[name]
            delta = self._delta(p)
            if p.grad is not None:
                delta.mul_(group["beta"]).add_(p.grad.float(), alpha=group["lr"])
            t = self.transforms[name]
            coeffs = t.forward(delta)
            idx, vals = topk_chunks(coeffs, min(self.k, t.chunk_numel))
            sent = scatter_chunks(idx, vals, t.n_chunks, t.chunk_numel)
            delta.sub_(t.inverse(sent).reshape(delta.shape))
            out[name] = (idx, vals)
            energies.append(float(energy_ratio(coeffs, idx)))
            weights.append(float(coeffs.pow(2).sum()))
        total = sum(weights)
        # Energy captured across the model, weighted by each tensor's momentum energy.
        self.last_energy_ratio = (
            sum(e * w for e, w in zip(energies, weights, strict=True)) / total if total > 0 else float("nan")
        )
        self._own = out
        return out

    @torch.no_grad()
    def apply_components(self, peers: list[Components]) -> None:
        """Aggregate own (from compute_components) + peers' components and take the sign step.

        Each coefficient is averaged over the contributors that selected it
        (``swarmnode.aggregate.aggregate_components``, which also skips malformed peer entries)."""
        from swarmnode.aggregate import aggregate_components

        if self._own is None:
            raise RuntimeError("apply_components: call compute_components() first in this step")
        group = self.param_groups[0]
        lr, wd = group["lr"], group["weight_decay"]
        dense = aggregate_components(
            self._own,
            peers,
            n_chunks={n: t.n_chunks for n, t in self.transforms.items()},
            chunk_numel={n: t.chunk_numel for n, t in self.transforms.items()},
        )
        for name in self.names:
            p = self._by_name[name]
            q = self.transforms[name].inverse(dense[name]).reshape(p.shape)
            if wd:
                p.mul_(1 - lr * wd)
            p.add_(torch.sign(q).to(p.dtype), alpha=-lr)
        self._own = None

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        """Both halves with no peers: a single node training with DeMo."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.compute_components()
        self.apply_components([])
        return loss
