"""DeMo: decoupled momentum with DCT top-k components (after bloc97/DeMo).

Per parameter, each step:

1. momentum ``delta <- beta * delta + lr * grad``. beta = 0.999 (the reference default): DeMo's momentum
   is not a smoothed gradient but an accumulator of everything not yet sent, so it must decay slowly
   or the error feedback forgets the mass it is holding back.
2. chunked DCT-II of delta (64x64 chunks for matrices, 64 for vectors), keep the top-k (32) coefficients
   per chunk by magnitude: the "fast components" gossiped to the cohort.
3. error feedback: subtract what was sent from delta. The DCT is orthonormal, so subtracting the
   inverse transform of the sent coefficients equals subtracting them in the transform domain.
4. combine own + peers' components by a **sign vote**: every contributor's components (a peer's
   coefficients clipped to ``COEFF_CLIP`` x our own largest in that tensor, a coefficient it sent
   several times counted once) are inverse-transformed into its own update ``Q_i``; each element
   moves by ``-lr * sign(sum_i sign(Q_i))``, a tie going to our own sign; optional decoupled weight
   decay. With no peers this is exactly ``p <- p - lr * sign(Q_own)``.

Why a vote and not the reference's average over the peers that selected each coefficient: there, a
coefficient only one peer selected is that peer's alone, so one peer pushing one large DC coefficient
moved every element of a tensor its way. In the vote each distinct peer has one vote per element, so
one peer's influence is bounded by 1/(peers+1) of the sign vote, whatever values or how many messages
it sends: f Byzantine peers out of n contributors flip an element only where the honest votes are
within 2f of a tie (signSGD with majority vote, Bernstein et al. 2019). The cost is one inverse DCT
per contributor and tensor instead of one per tensor. Pass peers grouped (one list of component
dicts per peer, ``PeerComponents``): a flat list counts each dict as a voter.

The lr scales a sign update (every element moves by exactly lr each step), comparable to Adam's
effective step size. 2e-3 is the constructor default (toy problems, few steps); for RL on the tiny
local model, which takes thousands of steps, ``swarmnode train`` uses 5e-4 (2e-3 collapsed the policy
there). With no peers DeMo is signSGD on the top-k part of an error-fed momentum, which trains on its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

Components = dict[str, tuple[torch.Tensor, torch.Tensor]]


# Values per band when compute_components / apply_components transform a large tensor: 2 M, 8 MB of
# fp32 per copy. Kept under glibc's largest mmap threshold (32 MB), so band buffers are reused from
# the heap instead of mapped and page-faulted afresh each time: at 16 M values (64 MB) a 0.5 B model's
# step spent half its CPU time in the kernel zeroing pages, and the embedding's compute + apply took
# 19.4 s instead of 6.7 s (one core, one peer).
BAND_NUMEL = 1 << 21


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
        self.last_voters = 0  # distinct peers whose components entered the last step's vote
        self.peer_tensors_skipped = 0  # a peer's tensor with nothing usable (malformed, non-finite)

    def _delta(self, p: torch.Tensor) -> torch.Tensor:
        state = self.state[p]
        if "delta" not in state:
            # The momentum (with its error feedback) in the parameter's dtype, as the reference DeMo
            # keeps it: fp32 for fp32 models; for a bf16 0.5 B model 1 GB instead of 2 GB, which is
            # what lets three such nodes share a 24 GB machine. The arithmetic runs in fp32.
            state["delta"] = torch.zeros_like(p)
        return state["delta"]

    @torch.no_grad()
    def compute_components(self) -> Components:
        """After backward: momentum update, DCT, top-k, error feedback. Returns what to gossip."""
        from swarmnode.compression.dct import (
            forward_band,
            inverse_band,
            row_bands,
            scatter_chunks,
            topk_chunks,
        )

        group = self.param_groups[0]
        out: Components = {}
        energies, weights = [], []
        for name in self.names:
            p = self._by_name[name]
            state = self._delta(p)
            t = self.transforms[name]
            k = min(self.k, t.chunk_numel)
            # Band by band (one band for all but the largest tensors): the fp32 temporaries of a
            # 136 M-value embedding would otherwise be several GB at once.
            rows = state.reshape(state.shape[0] if state.dim() >= 2 else 1, -1)
            grad = None if p.grad is None else p.grad.reshape(rows.shape)
            idx_parts, val_parts, kept, total_e = [], [], 0.0, 0.0
            for b0, b1 in row_bands(t, BAND_NUMEL):
                r0, r1 = b0 * t._tr, min(rows.shape[0], b1 * t._tr)
                delta = rows[r0:r1].float()  # fp32 working copy of this band
                if grad is not None:
                    delta.mul_(group["beta"]).add_(grad[r0:r1].float(), alpha=group["lr"])
                coeffs = forward_band(t, delta, b1 - b0)
                idx, vals = topk_chunks(coeffs, k)
                sent = scatter_chunks(idx, vals, coeffs.shape[0], t.chunk_numel)
                delta.sub_(inverse_band(t, sent, b1 - b0, r1 - r0))
                rows[r0:r1].copy_(delta)
                e = float(coeffs.double().square().sum())
                total_e += e
                kept += float(vals.double().square().sum())
                idx_parts.append(idx)
                val_parts.append(vals)
                del delta, coeffs, sent
            idx = idx_parts[0] if len(idx_parts) == 1 else torch.cat(idx_parts)
            vals = val_parts[0] if len(val_parts) == 1 else torch.cat(val_parts)
            out[name] = (idx, vals)
            energies.append(kept / total_e if total_e > 0 else 1.0)
            weights.append(total_e)
        total = sum(weights)
        # Energy captured across the model, weighted by each tensor's momentum energy.
        self.last_energy_ratio = (
            sum(e * w for e, w in zip(energies, weights, strict=True)) / total if total > 0 else float("nan")
        )
        self._own = out
        return out

    @torch.no_grad()
    def apply_components(self, peers: Sequence[Any]) -> None:
        """Take the sign step on the vote of own (from compute_components) + peers' components.

        Each element of ``peers`` is one peer: a component dict, or the list of dicts it sent this
        step (parts of split tensors, repeats); entries that do not fit our transform are skipped
        (``swarmnode.aggregate.peer_coefficients``)."""
        from swarmnode.aggregate import coefficient_clip, peer_coefficients
        from swarmnode.compression.dct import inverse_band, row_bands

        if self._own is None:
            raise RuntimeError("apply_components: call compute_components() first in this step")
        group = self.param_groups[0]
        lr, wd = group["lr"], group["weight_decay"]
        voters: set[int] = set()
        for name in self.names:
            p = self._by_name[name]
            t = self.transforms[name]
            idx, vals = self._own[name]
            bound = coefficient_clip(vals.detach().float())
            entries: list[list[Any]] = []  # per peer, its valid entries for this tensor
            for i, peer in enumerate(peers):
                parts = [peer] if isinstance(peer, dict) else list(peer)
                mine = _valid_entries(parts, name, t.n_chunks, t.chunk_numel)
                if not mine:
                    if any(isinstance(d, dict) and name in d for d in parts):
                        self.peer_tensors_skipped += 1
                    continue
                entries.append(mine)
                voters.add(i)
            if wd:
                p.mul_(1 - lr * wd)
            prows = p.view(p.shape[0] if p.dim() >= 2 else 1, -1)
            nc = t._cols // t._tc  # chunks per tile row
            # Band by band, as in compute_components: dense fp32 coefficients of a 136 M-value
            # embedding would otherwise take several GB per voter.
            for b0, b1 in row_bands(t, BAND_NUMEL):
                c0, c1 = b0 * nc, b1 * nc
                r0, r1 = b0 * t._tr, min(prows.shape[0], b1 * t._tr)
                own = scatter_dense(idx[c0:c1], vals[c0:c1], c1 - c0, t.chunk_numel)
                own_sign = torch.sign(inverse_band(t, own, b1 - b0, r1 - r0))
                votes = own_sign.clone()
                for mine in entries:
                    band = _band_entries(mine, c0, c1)
                    got = peer_coefficients(band, "t", n_chunks=c1 - c0, chunk_numel=t.chunk_numel)
                    if got is None:
                        continue
                    coeffs = got[0] if bound == float("inf") else got[0].clamp(-bound, bound)
                    votes.add_(torch.sign(inverse_band(t, coeffs, b1 - b0, r1 - r0)))
                update = torch.where(votes != 0, torch.sign(votes), own_sign)
                prows[r0:r1].add_(update.to(device=p.device, dtype=p.dtype), alpha=-lr)
                del own, own_sign, votes, update
        self.last_voters = len(voters)
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


def _valid_entries(parts: Sequence[Any], name: str, n_chunks: int, chunk_numel: int) -> list[Any]:
    """A peer's entries for tensor ``name`` that fit our transform, as (int64 idx, fp32 vals, first
    chunk); malformed ones (shape, chunk range, index range, non-finite values) are dropped whole."""
    out = []
    for comp in parts:
        entry = comp.get(name) if isinstance(comp, dict) else None
        if entry is None or len(entry) < 2:
            continue
        idx, vals = entry[0], entry[1]
        if not isinstance(idx, torch.Tensor) or not isinstance(vals, torch.Tensor):
            continue
        start = int(entry[2]) if len(entry) > 2 else 0
        if idx.shape != vals.shape or idx.dim() != 2 or start < 0 or start + idx.shape[0] > n_chunks:
            continue
        if len(entry) == 2 and idx.shape[0] != n_chunks:
            continue
        idx = idx.to(torch.int64).cpu()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= chunk_numel):
            continue
        v = vals.detach().to(dtype=torch.float32, device="cpu")
        if not bool(torch.isfinite(v).all()):
            continue
        out.append((idx, v, start))
    return out


def _band_entries(entries: list[Any], c0: int, c1: int) -> list[dict[str, Any]]:
    """The parts of ``entries`` inside chunks [c0, c1), renumbered from c0, in
    ``peer_coefficients``' input form (one single-entry dict per part)."""
    out = []
    for idx, vals, start in entries:
        a, b = max(c0, start), min(c1, start + idx.shape[0])
        if a < b:
            out.append({"t": (idx[a - start : b - start], vals[a - start : b - start], a - c0)})
    return out


def scatter_dense(idx: torch.Tensor, vals: torch.Tensor, n_chunks: int, chunk_numel: int) -> torch.Tensor:
    """Our own top-k components as dense ``[n_chunks, chunk_numel]`` fp32 coefficients."""
    out = torch.zeros(n_chunks, chunk_numel, dtype=torch.float32)
    return out.scatter_(1, idx.to(torch.int64).cpu(), vals.detach().to(torch.float32).cpu())
