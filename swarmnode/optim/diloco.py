"""DiLoCo outer optimiser: an fp32 anchor that replicas leave for H inner steps and return to.

Every replica keeps the same anchor. After its inner steps it publishes the pseudo-gradient
Δ = anchor − local; all replicas average the Δs (in the same order, see ``swarmnode.aggregate``) and
take one outer SGD step with Nesterov momentum on the anchor, then reset their local weights to it.
Because the outer step is a deterministic function of (anchor, momentum, averaged Δ), replicas that
average the same Δs land on bit-identical anchors, which ``anchor_hash`` lets them check.

``encode_pseudo_gradient`` codes Δ for the wire: dense ``int8``, or ``sparse`` (top-k, 2-bit values,
~0.018 B/param) with error feedback: what a sparse blob leaves out of Δ is kept in ``feedback`` (per
parameter, on CPU, in the parameter's dtype) and added to the next round's Δ. That residual is this
replica's own state: ``state_dict`` (checkpoints) holds it as ``residual.<name>``, ``state_tensors``
(what joiners pull) does not, and loading a state without it (a catch-up, a re-sync) clears it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from swarmnode.compression.pseudograd import encode_delta, write_delta
from swarmnode.compression.sparsedelta import ErrorFeedback, SparseParams

__all__ = ["DiLoCo", "hash_anchor"]


def hash_anchor(anchor: Mapping[str, torch.Tensor]) -> str:
    """``DiLoCo.anchor_hash`` of any {name: tensor} (e.g. the anchor inside a joiner's state file,
    checked before it is loaded)."""
    h = hashlib.sha256()
    for name in sorted(anchor):
        t = anchor[name].detach().cpu().to(torch.float32).contiguous()
        h.update(name.encode())
        h.update(b"\0")
        h.update(repr(tuple(t.shape)).encode())
        h.update(b"\0")
        # numpy gives a stable little-endian byte view on every platform we run on; hashed from the
        # view, in slices, so a 2 GB anchor is never copied
        raw = t.reshape(-1).view(torch.uint8).numpy()
        for lo in range(0, raw.size, 1 << 24):
            h.update(raw[lo : lo + (1 << 24)].data)
    return h.hexdigest()


ANCHOR_FILE = "anchor.f32"
MOMENTUM_FILE = "momentum.f32"
SNAPSHOT_FILE = "published.safetensors"


class _FileTensors(Mapping[str, torch.Tensor]):
    """Tensors of a safetensors file, each read when asked for."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self._file = safe_open(str(path), framework="pt")
        self._keys = list(self._file.keys())

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._keys:
            raise KeyError(name)
        return self._file.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class DiLoCo:
    """Outer optimiser over ``named_params`` (lr 0.7, momentum 0.9, Nesterov: the DiLoCo/PRIME values)."""

    def __init__(
        self,
        named_params: Iterable[tuple[str, torch.nn.Parameter]],
        *,
        lr: float = 0.7,
        momentum: float = 0.9,
        nesterov: bool = True,
        spill_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if nesterov and momentum == 0.0:
            # torch.optim.SGD refuses this too: Nesterov without momentum is plain SGD in disguise.
            nesterov = False
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        self.params: dict[str, torch.nn.Parameter] = {}
        for name, p in named_params:
            if name in self.params:
                raise ValueError(f"duplicate parameter name {name!r}")
            self.params[name] = p
        if not self.params:
            raise ValueError("DiLoCo needs at least one parameter")
        # fp32 anchor even for bf16 models: the outer step adds small lr·Δ updates that bf16 would round away.
        # With ``spill_dir`` (CPU models) the anchor and the momentum live in memory-mapped files there and
        # the publish-time snapshot in a file beside them: all are touched once or twice a round, so the
        # kernel may page them out in between instead of holding 2 + 2 + 1 GB of anonymous memory for a
        # 0.5 B model.
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        self.anchor: dict[str, torch.Tensor] = self._new_anchor()
        self.buffers: dict[str, torch.Tensor] = {}
        self.outer_steps = 0
        # what sparse Δ blobs left out, added to the next Δ (kept in each parameter's dtype)
        self.feedback = ErrorFeedback({n: p.dtype for n, p in self.params.items()})

    def _new_anchor(self) -> dict[str, torch.Tensor]:
        on_cpu = all(p.device.type == "cpu" for p in self.params.values())
        if self.spill_dir is None or not on_cpu:
            return {n: p.detach().to(dtype=torch.float32, copy=True) for n, p in self.params.items()}
        out = self._mapped(ANCHOR_FILE)
        for n, view in out.items():
            view.copy_(self.params[n].detach())
        return out

    # -- the round ------------------------------------------------------------------------------

    @torch.no_grad()
    def pseudo_gradient(self) -> dict[str, torch.Tensor]:
        """Δ = anchor − local, fp32, one tensor per parameter (on CPU, ready to encode)."""
        return {
            n: (self.anchor[n] - p.detach().to(dtype=torch.float32)).cpu() for n, p in self.params.items()
        }

    @torch.no_grad()
    def iter_pseudo_gradient(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, Δ) in sorted name order, one fp32 tensor at a time: what the Δ encoder streams
        from, so a 0.5 B-parameter model never materialises its whole fp32 Δ (2 GB)."""
        for n in sorted(self.params):
            yield n, (self.anchor[n] - self.params[n].detach().to(dtype=torch.float32)).cpu()

    @torch.no_grad()
    def encode_pseudo_gradient(self, codec: str = "int8", params: SparseParams | None = None) -> bytes:
        """Δ = anchor − local as a blob (``compression.pseudograd``), streamed one tensor at a time.
        ``sparse`` / ``sparse-dct`` code Δ + e and keep in e what the blob left out (error feedback);
        ``int8`` ignores e (a node switching codecs drops it)."""
        return encode_delta(self.iter_pseudo_gradient(), codec, **self._codec_args(codec, params))

    @torch.no_grad()
    def write_pseudo_gradient(
        self, path: str | os.PathLike[str], codec: str = "int8", params: SparseParams | None = None
    ) -> tuple[int, str]:
        """``encode_pseudo_gradient`` into a file (``pseudograd.write_delta``): (size, sha256)."""
        return write_delta(self.iter_pseudo_gradient(), path, codec, **self._codec_args(codec, params))

    def _codec_args(self, codec: str, params: SparseParams | None) -> dict[str, Any]:
        """The encoder's sparse arguments (params, error feedback); int8 takes none and drops e."""
        if codec != "int8":  # sparse, sparse-dct
            return {"params": params, "feedback": self.feedback}
        self.feedback.clear()
        return {}

    @torch.no_grad()
    def local_snapshot(self) -> Mapping[str, torch.Tensor]:
        """A copy of the live weights in their own dtype (bf16 models: half the fp32 Δ's size): what
        ``outer_step_streaming`` needs to carry over the inner steps taken after a publish. With
        ``spill_dir`` it is written there and read back one tensor at a time."""
        if self.spill_dir is None:
            return {n: p.detach().to("cpu", copy=True) for n, p in self.params.items()}
        from safetensors.torch import save_file

        path = self.spill_dir / SNAPSHOT_FILE
        tmp = path.with_suffix(".tmp")
        save_file({n: p.detach().cpu().contiguous() for n, p in self.params.items()}, str(tmp))
        os.replace(tmp, path)
        return _FileTensors(path)

    @torch.no_grad()
    def outer_step_streaming(
        self,
        avg_delta: Iterable[tuple[str, torch.Tensor]],
        *,
        published_local: Mapping[str, torch.Tensor] | None = None,
    ) -> float:
        """``outer_step`` fed one averaged tensor at a time (every parameter exactly once, any order):
        ``outer_step_bands`` with each tensor as one band."""

        def bands() -> Iterator[tuple[str, int, int, torch.Tensor]]:
            for name, d in avg_delta:
                if name not in self.params:
                    raise ValueError(f"avg_delta: unexpected parameter {name!r}")
                self._check_one(name, d, "avg_delta")
                yield name, 0, d.numel(), d.reshape(-1)

        return self.outer_step_bands(bands(), published_local=published_local)

    @torch.no_grad()
    def outer_step_bands(
        self,
        avg_delta: Iterable[tuple[str, int, int, torch.Tensor]],
        *,
        published_local: Mapping[str, torch.Tensor] | None = None,
    ) -> float:
        """``outer_step`` fed (name, lo, hi, values lo:hi of the flattened averaged Δ): each parameter's
        bands in order, every parameter exactly once, parameters in any order. What a 0.5 B-parameter
        merge streams into: the peak extra memory is a few bands, not a few copies of the embedding.
        The arithmetic is elementwise, so the anchor's bits do not depend on the band size.

        ``published_local`` is ``local_snapshot()`` at publish time; the inner steps since are carried
        over: local ← anchor' + (local − published_local). Each band is checked (name, order, size,
        finite) before it touches the anchor; callers validate every contribution first, so a failure
        here is a bug, and it raises before the offending band changes the anchor. Returns the norm
        of the carried progress.
        """
        done: set[str] = set()
        current, at = "", 0
        sq = 0.0
        fresh = self._ensure_buffers()
        published: torch.Tensor | None = None

        def finish() -> None:
            if current and at != self.params[current].numel():
                raise ValueError(
                    f"avg_delta[{current!r}] covers {at} of {self.params[current].numel()} values"
                )
            done.add(current)

        for name, lo, hi, d in avg_delta:
            if name != current:
                finish()
                if name not in self.params or name in done:
                    raise ValueError(f"avg_delta: unexpected or repeated parameter {name!r}")
                current, at = name, 0
                published = None
                if published_local is not None:
                    published = published_local[name].reshape(-1)
            p = self.params[name]
            if lo != at or not lo <= hi <= p.numel() or d.numel() != hi - lo:
                raise ValueError(f"avg_delta[{name!r}]: band {lo}:{hi} ({d.numel()} values) after {at}")
            at = hi
            d = d.reshape(-1).to(device=self.anchor[name].device, dtype=torch.float32)
            if not bool(torch.isfinite(d).all()):
                raise ValueError(f"avg_delta[{name!r}] has non-finite values; aggregate first")
            flat_p = _flat(p)
            progress = None
            if published is not None:
                progress = flat_p[lo:hi].to(torch.float32) - published[lo:hi].to(p.device, torch.float32)
            anchor = _flat(self.anchor[name])[lo:hi]
            self._step_band(name, lo, hi, d, anchor, name in fresh)
            if progress is None:
                flat_p[lo:hi].copy_(anchor.to(device=p.device, dtype=p.dtype))
            else:
                sq += float(progress.pow(2).sum())
                flat_p[lo:hi].copy_((anchor + progress).to(device=p.device, dtype=p.dtype))
            del progress
        finish()
        missing = sorted(set(self.params) - done)
        if missing:
            raise ValueError(f"avg_delta is missing parameters {missing[:5]}")
        self.outer_steps += 1
        return sq**0.5

    def _ensure_buffers(self) -> set[str]:
        """Momentum for every parameter, allocated (zeroed) where there is none yet; returns the names
        that had none (their first step sets buf = Δ, as ``torch.optim.SGD`` does). With
        ``spill_dir`` all of it lives in a memory-mapped file beside the anchor (2 GB for a 0.5 B
        model, touched once a round)."""
        if self.momentum == 0:
            return set()
        fresh = set(self.params) - set(self.buffers)
        if not fresh:
            return fresh
        on_cpu = all(p.device.type == "cpu" for p in self.params.values())
        if self.spill_dir is not None and on_cpu and not self.buffers:
            self.buffers = self._mapped(MOMENTUM_FILE)
        else:
            for n in fresh:
                self.buffers[n] = torch.zeros_like(self.anchor[n])
        return fresh

    def _mapped(self, filename: str) -> dict[str, torch.Tensor]:
        """Zeroed fp32 views, one per parameter in sorted order, into a new file in ``spill_dir``."""
        assert self.spill_dir is not None
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        path = self.spill_dir / filename
        path.unlink(missing_ok=True)  # a new (sparse) file reads as zeros
        total = sum(p.numel() for p in self.params.values())
        flat = torch.from_file(str(path), shared=True, size=total, dtype=torch.float32)
        out, at = {}, 0
        for n in sorted(self.params):
            p = self.params[n]
            out[n], at = flat[at : at + p.numel()].view(p.shape), at + p.numel()
        return out

    def _step_band(
        self, name: str, lo: int, hi: int, d: torch.Tensor, anchor: torch.Tensor, first: bool
    ) -> None:
        if self.momentum > 0:
            buf = _flat(self.buffers[name])[lo:hi]
            if first:
                buf.copy_(d)
            else:
                buf.mul_(self.momentum).add_(d)
            update = d.add(buf, alpha=self.momentum) if self.nesterov else buf
        else:
            update = d
        anchor.sub_(update, alpha=self.lr)

    @torch.no_grad()
    def outer_step(
        self, avg_delta: Mapping[str, torch.Tensor], *, published: Mapping[str, torch.Tensor] | None = None
    ) -> float:
        """One outer SGD(+Nesterov) step on the anchor with the averaged Δ, then local ← anchor.

        Same arithmetic as ``torch.optim.SGD(momentum=μ, nesterov=True)``: buf = μ·buf + Δ (buf = Δ on
        the first step), update = Δ + μ·buf, anchor −= lr·update.

        ``published`` is this replica's own Δ as it was when the round was published. Inner steps
        taken since then (training overlapped with the round's collection) are carried over:
        local ← anchor' + (local − (anchor − published)). Returns the norm of that carried progress
        (0.0 without ``published``).
        """
        self._check(avg_delta, "avg_delta")
        if published is not None:
            self._check(published, "published")
        progress: dict[str, torch.Tensor] = {}
        for name in self.params:
            d = avg_delta[name]
            if not torch.isfinite(d).all():
                raise ValueError(f"avg_delta[{name!r}] has non-finite values; aggregate first")
        if published is not None:
            # local − (anchor − published) = published − (anchor − local): computed as the difference
            # of two pseudo-gradients so that no progress gives exactly zero (replicas stay bit-equal)
            now = self.pseudo_gradient()
            for name in self.params:
                progress[name] = published[name].to(torch.float32).cpu() - now[name]
        fresh = self._ensure_buffers()
        for name in self.params:
            d = avg_delta[name].to(device=self.anchor[name].device, dtype=torch.float32).reshape(-1)
            self._step_band(name, 0, d.numel(), d, _flat(self.anchor[name]), name in fresh)
        self.outer_steps += 1
        self.reset_local()
        sq = 0.0
        for name, delta in progress.items():
            p = self.params[name]
            p.add_(delta.to(device=p.device, dtype=p.dtype))
            sq += float(delta.pow(2).sum())
        return sq**0.5

    @torch.no_grad()
    def reset_local(self) -> None:
        """Copy the anchor into the live parameters (casting to their dtype/device)."""
        for name, p in self.params.items():
            p.copy_(self.anchor[name].to(device=p.device, dtype=p.dtype))

    def anchor_hash(self) -> str:
        """sha256 over sorted names, shapes and little-endian fp32 anchor bytes: equal across
        processes and machines for equal anchors."""
        return hash_anchor(self.anchor)

    # -- checkpoints and joiners ----------------------------------------------------------------

    def state_dict(self, *, copy: bool = True) -> dict[str, Any]:
        """Tensors and plain scalars only (safetensors/JSON friendly, no pickle needed).

        Keys: ``anchor.<name>``, ``momentum.<name>`` (present once a step was taken),
        ``residual.<name>`` (the sparse codec's error feedback, once it kept any) and scalars
        ``lr``, ``momentum``, ``nesterov``, ``outer_steps``.
        """

        def get(t: torch.Tensor) -> torch.Tensor:
            # copy=False: the live tensors (a checkpoint written before the next outer step needs no copy)
            return t.detach().cpu().clone() if copy else t.detach().cpu()

        out: dict[str, Any] = {f"anchor.{n}": get(t) for n, t in self.anchor.items()}
        out.update({f"momentum.{n}": get(t) for n, t in self.buffers.items()})
        out.update({f"residual.{n}": get(t) for n, t in self.feedback.residual.items()})
        out.update(lr=self.lr, momentum=self.momentum, nesterov=self.nesterov, outer_steps=self.outer_steps)
        return out

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The live anchor and momentum tensors (no copies), keyed like ``state_dict``: what the
        joiner snapshot hashes and serves chunk by chunk. Read-only for callers."""
        out = {f"anchor.{n}": t for n, t in self.anchor.items()}
        out.update({f"momentum.{n}": t for n, t in self.buffers.items()})
        return out

    def scalars(self) -> dict[str, float | int | bool]:
        return {
            "lr": self.lr,
            "momentum": self.momentum,
            "nesterov": self.nesterov,
            "outer_steps": self.outer_steps,
        }

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """{name: shape}: what a valid pseudo-gradient looks like (``robust_mean(expected=...)``)."""
        return {n: tuple(t.shape) for n, t in self.anchor.items()}

    def tensors(self) -> dict[str, torch.Tensor]:
        """Only the tensor part of ``state_dict`` (what a checkpoint's safetensors file holds)."""
        return {k: v for k, v in self.state_dict().items() if isinstance(v, torch.Tensor)}

    @torch.no_grad()
    def load_state_dict(
        self, state: Mapping[str, Any], *, reset_local: bool = True, load_hyperparams: bool = False
    ) -> None:
        """Restore anchor and momentum (e.g. a joiner catching up), then local ← anchor.

        The state may come from a peer, so everything is checked before anything is changed, and
        lr/momentum/nesterov stay this node's own (they are swarm config) unless ``load_hyperparams``.
        The error-feedback residual is restored from ``residual.<name>`` keys (our checkpoint) and
        cleared when there are none (a peer's state: its residual was never ours).
        """
        anchors = {k[len("anchor.") :]: v for k, v in state.items() if k.startswith("anchor.")}
        moms = {k[len("momentum.") :]: v for k, v in state.items() if k.startswith("momentum.")}
        residuals = {k[len("residual.") :]: v for k, v in state.items() if k.startswith("residual.")}
        self._check(anchors, "state anchor")
        unknown = sorted(set(moms) - set(self.params))
        if unknown:
            raise ValueError(f"state has momentum for unknown parameters {unknown[:5]}")
        for n, t in moms.items():
            self._check_one(n, t, "state momentum")
        unknown = sorted(set(residuals) - set(self.params))
        if unknown:
            raise ValueError(f"state has residuals for unknown parameters {unknown[:5]}")
        for n, t in residuals.items():
            self._check_one(n, t, "state residual")
        for kind, group in (("anchor", anchors), ("momentum", moms), ("residual", residuals)):
            for n, t in group.items():
                if not bool(torch.isfinite(t).all()):
                    raise ValueError(f"state {kind}[{n!r}] has non-finite values")
        steps = state.get("outer_steps", self.outer_steps)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"state outer_steps must be an integer >= 0, got {steps!r}")
        if load_hyperparams:
            other = DiLoCo(
                [("_", torch.nn.Parameter(torch.zeros(1)))],
                lr=float(state.get("lr", self.lr)),
                momentum=float(state.get("momentum", self.momentum)),
                nesterov=bool(state.get("nesterov", self.nesterov)),
            )  # reuses the constructor's range checks
            self.lr, self.momentum, self.nesterov = other.lr, other.momentum, other.nesterov
        for name in self.params:
            self.anchor[name].copy_(anchors[name].to(torch.float32))
        # Into the existing buffers where there are some: a 0.5 B model's momentum is 2 GB, and a
        # joiner loading from a memory-mapped state file must not hold it twice.
        if moms and not self.buffers:
            self._ensure_buffers()  # in the spill file, when there is one
        buffers: dict[str, torch.Tensor] = {}
        for n, t in moms.items():
            buf = self.buffers.get(n)
            if buf is not None and buf.shape == t.shape:
                buffers[n] = buf.copy_(t)
            else:
                buffers[n] = t.detach().to(torch.float32, copy=True)
        self.buffers = buffers
        self.feedback.clear()
        for n, t in residuals.items():
            self.feedback.residual[n] = t.detach().to(
                "cpu", self.feedback.dtypes.get(n, torch.float32), copy=True
            )
        self.outer_steps = steps
        if reset_local:
            self.reset_local()

    # -- validation -----------------------------------------------------------------------------

    def _check(self, tensors: Mapping[str, torch.Tensor], what: str) -> None:
        missing = sorted(set(self.params) - set(tensors))
        extra = sorted(set(tensors) - set(self.params))
        if missing or extra:
            raise ValueError(
                f"{what} names do not match the model: missing {missing[:5]}, unexpected {extra[:5]}"
            )
        for name, t in tensors.items():
            self._check_one(name, t, what)

    def _check_one(self, name: str, t: Any, what: str) -> None:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{what}[{name!r}] must be a tensor, got {type(t).__name__}")
        want = tuple(self.anchor[name].shape)
        if tuple(t.shape) != want:
            raise ValueError(f"{what}[{name!r}] has shape {tuple(t.shape)}, expected {want}")


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A flat view of ``t`` (parameters and anchors are contiguous; anything else is a bug here)."""
    if not t.is_contiguous():
        raise ValueError("DiLoCo tensors must be contiguous")
    return t.detach().view(-1)
