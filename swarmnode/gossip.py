"""Glue between the node loop and the wire: protocol records in and out, trainer groups to rollout
batches and back (through local verification), pseudo-gradients to int8 blobs.

The node only sees ``ProtocolWire``'s methods; in-process tests substitute a fake with the same
shape, so everything protocol-specific lives here.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import safetensors.torch
import torch

from swarmnode.protocol import (
    Completion,
    DemoComponents,
    Presence,
    ProtocolError,
    RolloutBatch,
    RolloutGroup,
    RoundManifest,
    StateManifest,
    TaskRef,
    TensorComponents,
    codec,
    limits,
)

log = logging.getLogger(__name__)

KINDS: dict[type, str] = {
    Presence: "presence",
    RolloutBatch: "rollouts",
    RoundManifest: "manifest",
    DemoComponents: "demo",
    StateManifest: "state",
}

# Verification takes the decoded batch and returns (groups the trainer can use, number rejected).
Verifier = Callable[[RolloutBatch], tuple[list[Any], int]]


def to_rollout_group(group: Any) -> RolloutGroup:
    """A trainer ``Group`` (problem, samples, rewards) as a wire group: a task reference, never the
    answer — receivers regenerate the problem and score it themselves."""
    problem = group.problem
    rewards = list(group.rewards)
    completions = [
        Completion(
            text=s.text,
            token_ids=[int(t) for t in s.token_ids],
            logprobs=[float(x) for x in s.logprobs],
            reward=float(r),
        )
        for s, r in zip(group.samples, rewards, strict=True)
    ]
    task = TaskRef(family=problem.family, seed=int(problem.seed), index=int(problem.index))
    return RolloutGroup(task=task, completions=completions)


def encode_batches(author: str, cohort: str, step: int, groups: Sequence[RolloutGroup]) -> list[bytes]:
    """One message per step when it fits; halves until every message is under the gossip limit."""
    batch = RolloutBatch(
        author=author, cohort=cohort, policy_step=step, created_at=time.time(), groups=list(groups)
    )
    try:
        return [codec.encode(batch)]
    except ProtocolError:
        if len(groups) <= 1:
            log.warning("a single rollout group is over the gossip limit; not shared")
            return []
    mid = len(groups) // 2
    return encode_batches(author, cohort, step, groups[:mid]) + encode_batches(
        author, cohort, step, groups[mid:]
    )


# Elements per int8 scale: one scale per 256 values keeps outliers from flattening a whole tensor
# (a per-tensor scale lost most small entries of embedding deltas) at 1.6 % overhead.
QUANT_BLOCK = 256


def encode_delta(delta: dict[str, torch.Tensor]) -> bytes:
    """Pseudo-gradient as int8 with one fp32 scale per block of 256 values, in a safetensors blob
    (no pickle). Author and receivers all average the dequantised values, so replicas stay equal."""
    out: dict[str, torch.Tensor] = {}
    for name, t in delta.items():
        flat = t.detach().float().cpu().reshape(-1)
        pad = (-flat.numel()) % QUANT_BLOCK
        blocks = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, QUANT_BLOCK)
        scale = blocks.abs().amax(dim=1, keepdim=True).clamp_min(1e-30) / 127.0
        out[f"{name}::q"] = torch.round(blocks / scale).clamp(-127, 127).to(torch.int8)
        out[f"{name}::scale"] = scale.reshape(-1)
        out[f"{name}::shape"] = torch.tensor(list(t.shape), dtype=torch.int64)
    return bytes(safetensors.torch.save(out))


def decode_delta(data: bytes, max_bytes: int) -> dict[str, torch.Tensor]:
    """Inverse of ``encode_delta``; any malformed blob is a ``ProtocolError``."""
    if len(data) > max_bytes:
        raise ProtocolError(f"pseudo-gradient blob: {len(data)} bytes, over the limit of {max_bytes}")
    try:
        raw = safetensors.torch.load(bytes(data))
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise ProtocolError(f"pseudo-gradient blob: not a valid safetensors buffer ({exc})") from None
    out: dict[str, torch.Tensor] = {}
    for key in raw:
        if not key.endswith("::q"):
            continue
        name = key[: -len("::q")]
        q, scale, shape = raw[key], raw.get(f"{name}::scale"), raw.get(f"{name}::shape")
        if (
            scale is None
            or shape is None
            or q.dtype != torch.int8
            or q.dim() != 2
            or q.shape[1] != QUANT_BLOCK
        ):
            raise ProtocolError(f"pseudo-gradient blob: tensor {name!r} is malformed")
        dims = [int(d) for d in shape.tolist()]
        numel = 1
        for d in dims:
            numel *= d
        if scale.numel() != q.shape[0] or min(dims, default=1) < 0 or numel > q.numel():
            raise ProtocolError(f"pseudo-gradient blob: tensor {name!r} has inconsistent sizes")
        deq = (q.float() * scale.float().reshape(-1, 1)).reshape(-1)[:numel].reshape(dims)
        if not torch.isfinite(deq).all():
            raise ProtocolError(f"pseudo-gradient blob: tensor {name!r} is not finite")
        out[name] = deq
    return out


def encode_state(tensors: dict[str, torch.Tensor], scalars: dict[str, float | int | bool]) -> bytes:
    """Catch-up state (DiLoCo anchor + momentum, full precision) as safetensors; scalars in metadata."""
    meta = {k: json.dumps(v) for k, v in scalars.items()}
    return bytes(safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta))


def decode_state(blob: bytes) -> dict[str, Any]:
    try:
        tensors: dict[str, Any] = dict(safetensors.torch.load(bytes(blob)))
        tensors.update(_metadata(blob))
    except ProtocolError:
        raise
    except Exception as exc:  # safetensors/json raise their own types for corrupt input
        raise ProtocolError(f"state blob: not a valid safetensors buffer ({exc})") from None
    return tensors


def _metadata(blob: bytes) -> dict[str, Any]:
    """safetensors keeps ``__metadata__`` in its JSON header: 8-byte little-endian length, then JSON."""
    if len(blob) < 8:
        raise ProtocolError("state blob: truncated header")
    n = int.from_bytes(blob[:8], "little")
    if n > len(blob) - 8 or n > 16 * 1024 * 1024:
        raise ProtocolError("state blob: header length out of range")
    header = json.loads(blob[8 : 8 + n])
    meta = header.get("__metadata__") or {}
    out: dict[str, Any] = {}
    for k, v in meta.items():
        val = json.loads(v)
        if not isinstance(val, int | float | bool):
            raise ProtocolError(f"state blob: metadata {k!r} is not a scalar")
        out[k] = val
    return out


class ProtocolWire:
    """The real wire for ``Node``: records from ``swarmnode.protocol``, deltas via compression."""

    def __init__(
        self,
        *,
        swarm: str,
        addrs: Callable[[], list[str]],
        engine: str,
        hardware: str,
        verifier: Verifier,
        samples: Callable[[], int] = lambda: 0,
        demo_spec: Callable[[str], tuple[tuple[int, ...], int, int]] | None = None,
        value_codec: str = "int8",
    ) -> None:
        # name -> (shape, n_chunks, chunk_numel) of our DeMo transform; peers must match it exactly.
        self.demo_spec = demo_spec
        self.value_codec = value_codec
        self.swarm = swarm
        self.addrs = addrs
        self.engine = engine
        self.hardware = hardware
        self.verifier = verifier
        self.samples = samples

    def presence(self, **f: Any) -> Presence:
        return Presence(
            peer_id=f["peer_id"],
            addrs=list(self.addrs())[: limits.MAX_ADDRS],
            swarm=self.swarm,
            cohort=f["cohort"],
            engine=self.engine,  # type: ignore[arg-type]
            hardware=self.hardware[: limits.MAX_HARDWARE_LEN],
            step=int(f["step"]),
            round=int(f["round"]),
            samples=int(self.samples()),
            anchor_hash=f.get("anchor_hash", ""),
            status=f.get("status", "active"),
        )

    def encode_rollouts(self, *, author: str, cohort: str, step: int, groups: list[Any]) -> list[bytes]:
        return encode_batches(author, cohort, step, [to_rollout_group(g) for g in groups])

    def round_manifest(self, **f: Any) -> RoundManifest:
        return RoundManifest(**f)

    def state_manifest(self, **f: Any) -> StateManifest:
        return StateManifest(**f)

    def encode(self, record: Any) -> bytes:
        return codec.encode(record)

    def decode(self, data: bytes) -> Any:
        return codec.decode(data)

    def kind(self, record: Any) -> str:
        return KINDS.get(type(record), "unknown")

    def encode_delta(self, delta: dict[str, torch.Tensor]) -> bytes:
        return encode_delta(delta)

    def decode_delta(self, data: bytes, max_bytes: int) -> dict[str, torch.Tensor]:
        return decode_delta(data, max_bytes)

    def groups_of(self, batch: RolloutBatch, local_fingerprint: str) -> tuple[list[Any], int]:
        return self.verifier(batch)

    def encode_demo(self, *, author: str, cohort: str, step: int, components: dict[str, Any]) -> bytes:
        from swarmnode.compression.components import encode_components

        if self.demo_spec is None:
            raise ValueError("DeMo gossip needs demo_spec (the optimizer's chunking) on the wire")
        tensors = []
        for name in sorted(components):
            idx, vals = components[name]
            shape, n_chunks, chunk_numel = self.demo_spec(name)
            payload = encode_components(idx, vals, chunk_numel=chunk_numel, value_codec=self.value_codec)
            tensors.append(
                TensorComponents(
                    name=name,
                    shape=tuple(shape),
                    n_chunks=n_chunks,
                    k=int(idx.shape[-1]),
                    chunk_numel=chunk_numel,
                    value_codec=self.value_codec,  # type: ignore[arg-type]
                    payload=bytes(payload),
                )
            )
        lr = 0.0
        return codec.encode(DemoComponents(author=author, cohort=cohort, step=step, lr=lr, tensors=tensors))

    def demo_of(self, record: DemoComponents) -> tuple[int, dict[str, Any]]:
        from swarmnode.compression.components import decode_components

        if self.demo_spec is None:
            raise ProtocolError("DeMo components received but DeMo gossip is off here")
        out: dict[str, Any] = {}
        for t in record.tensors:
            try:
                shape, n_chunks, chunk_numel = self.demo_spec(t.name)
            except KeyError:
                raise ProtocolError(f"DeMo components: unknown tensor {t.name!r}") from None
            if tuple(t.shape) != tuple(shape) or t.n_chunks != n_chunks or t.chunk_numel != chunk_numel:
                raise ProtocolError(f"DeMo components: tensor {t.name!r} chunking differs from ours")
            out[t.name] = decode_components(
                t.payload, n_chunks=n_chunks, k=t.k, chunk_numel=chunk_numel, value_codec=t.value_codec
            )
        return int(record.step), out


class DiLoCoMerger:
    """``swarmnode.optim.diloco.DiLoCo`` as the node's merger; ``on_weights`` pushes the new local
    weights to the rollout engine after a merge or a catch-up."""

    def __init__(self, diloco: Any, on_weights: Callable[[], None] = lambda: None) -> None:
        self.diloco = diloco
        self.on_weights = on_weights

    def pseudo_gradient(self) -> dict[str, torch.Tensor]:
        result: dict[str, torch.Tensor] = self.diloco.pseudo_gradient()
        return result

    def outer_step(
        self, avg_delta: dict[str, torch.Tensor], *, published: dict[str, torch.Tensor] | None = None
    ) -> float:
        carried: float = self.diloco.outer_step(avg_delta, published=published)
        self.on_weights()
        return carried

    def anchor_hash(self) -> str:
        result: str = self.diloco.anchor_hash()
        return result

    def shapes(self) -> dict[str, tuple[int, ...]]:
        result: dict[str, tuple[int, ...]] = self.diloco.shapes()
        return result

    def state_blob(self) -> bytes:
        state = self.diloco.state_dict()
        tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        scalars = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
        return encode_state(tensors, scalars)

    def load_state_blob(self, blob: bytes) -> None:
        self.diloco.load_state_dict(decode_state(blob), reset_local=True)
        self.on_weights()


def replica_spread(deltas: list[dict[str, Any]]) -> float:
    """Mean L2 distance of each Δ from the mean Δ (0.0 for a single replica)."""
    if len(deltas) < 2:
        return 0.0
    sq = [0.0] * len(deltas)
    for name in deltas[0]:
        stack = torch.stack([torch.as_tensor(d[name], dtype=torch.float64) for d in deltas])
        diff = stack - stack.mean(dim=0, keepdim=True)
        for i in range(len(deltas)):
            sq[i] += float(diff[i].pow(2).sum())
    return sum(v**0.5 for v in sq) / len(sq)


class DemoExchange:
    """DeMo's optimizer step with gossip in the middle, as a drop-in optimizer for the trainer.

    The trainer calls ``step()`` in its worker thread. We compute our components (momentum, DCT,
    top-k, error feedback), hand them to the event loop to publish, and apply the aggregate of our
    own and each peer's newest components that arrived since our previous step (the inbox is emptied
    every step, so everything in it is fresh whatever the peer's step counter says: nodes are never in
    lockstep, and with wall-clock rounds their counters drift apart without bound). ``max_lag`` (off by
    default) additionally drops components whose step number is further than that from ours.
    ``window_s`` > 0 additionally waits that long when nothing has arrived yet; the default never
    waits, because a fresh peer message is rarely worth more than the step it would cost. Any wait is
    counted in ``blocked_s``.
    """

    def __init__(
        self,
        demo: Any,
        *,
        publish: Callable[[int, Any], None],
        window_s: float = 0.0,
        max_lag: int | None = None,
    ) -> None:
        self.demo = demo
        self.publish = publish
        self.window_s = window_s
        self.max_lag = max_lag
        self.step_no = 0
        self.blocked_s = 0.0
        self.used = 0
        self._inbox: dict[str, tuple[int, Any]] = {}
        self._cond = threading.Condition()

    def receive(self, peer: str, step: int, components: Any) -> None:
        """Called on the event loop for each decoded peer message (newest per peer wins)."""
        with self._cond:
            old = self._inbox.get(peer)
            if old is None or step >= old[0]:
                self._inbox[peer] = (step, components)
                self._cond.notify_all()

    def _take(self) -> list[Any]:
        lag = self.max_lag
        fresh = [c for s, c in self._inbox.values() if lag is None or abs(s - self.step_no) <= lag]
        self._inbox.clear()
        return fresh

    def step(self, closure: Any = None) -> None:
        own = self.demo.compute_components()
        self.publish(self.step_no, own)
        t0 = time.monotonic()
        with self._cond:
            if not self._inbox and self.window_s > 0:
                self._cond.wait(self.window_s)
            peers = self._take()
        self.blocked_s += time.monotonic() - t0
        self.used += len(peers)
        self.demo.apply_components(peers)
        self.step_no += 1

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.demo.zero_grad(set_to_none=set_to_none)

    def __getattr__(self, name: str) -> Any:  # param_groups, state_dict, ... of the wrapped optimizer
        return getattr(self.demo, name)
