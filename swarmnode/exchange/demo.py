"""DeMo fast components within a cohort: our top-k DCT momentum components out, peers' in.

The trainer steps ``DemoExchange.optimizer`` like any optimizer, in its worker thread. Each step
computes our components (momentum, DCT, top-k, error feedback), hands them to the event loop to
publish as one or more messages under the gossip limit (tensors packed greedily; a tensor too large
for one message goes as chunk ranges, each decodable alone; a newer step supersedes an unsent
older one), and applies the aggregate of our own and each
peer's newest components that arrived since our previous step (the inbox is emptied every step, so
whatever is in it is fresh, whatever the peer's step counter says: with wall-clock rounds counters
drift apart without bound). ``max_lag`` (off by default) also drops components whose step number is
further than that from ours. ``window_s`` > 0 waits up to that long until one peer's step has
arrived in full (every tensor, every chunk range: a real-size step is ~15 messages); the default never
waits, because a fresh peer message is rarely worth the step it would cost. Any wait is counted in
``blocked_s``, and the peers used by the last step are ``demo_peers_last_step``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from swarmnode.compression.components import decode_components, encode_components
from swarmnode.exchange.base import BaseExchange, Host, Traffic, receive_loop
from swarmnode.exchange.fanin import choose, seed_of
from swarmnode.protocol import DemoComponents, ProtocolError, TensorComponents, codec, limits, topics

log = logging.getLogger(__name__)

# name -> (shape, n_chunks, chunk_numel) of our DeMo transform; peers' components must match it.
# Per peer and step, component dicts kept at most (a split tensor needs one per part).
MAX_PIECE_GROUPS = 256
Spec = Callable[[str], tuple[tuple[int, ...], int, int]]


@dataclass(kw_only=True, slots=True)
class DemoGossipConfig:
    swarm: str = "default"
    value_codec: str = "int8"
    window_s: float = 0.0
    max_lag: int | None = None
    # Publishers per step: with more live cohort members, a rotating choice of this many
    # (``exchange.fanin.choose`` on the step) gossips its components, so a node receives at most
    # this many peers' components a step whatever the cohort's size; the others apply theirs
    # locally only that step. 0: every member publishes every step.
    max_publishers: int = 8

    def __post_init__(self) -> None:
        if self.window_s < 0:
            raise ValueError(f"window_s must be >= 0, got {self.window_s}")
        if self.max_publishers < 0:
            raise ValueError(f"max_publishers must be >= 0 (0: every member), got {self.max_publishers}")


# Room for the record's fields around the payloads: every message stays under the gossip limit.
MESSAGE_BUDGET = limits.MAX_GOSSIP_BYTES - 16 * 1024
_RECORD_OVERHEAD = 256

Piece = tuple[Any, Any, int]  # (idx [rows, k], vals [rows, k], first chunk)


def _tensor_parts(
    name: str, idx: Any, vals: Any, geometry: tuple[tuple[int, ...], int, int], value_codec: str, budget: int
) -> list[TensorComponents]:
    """One record for the tensor, or as many chunk-range parts as it takes to fit ``budget`` each."""
    shape, n_chunks, chunk_numel = geometry
    parts = 1
    while True:
        rows = -(-n_chunks // parts)
        out = []
        for start in range(0, n_chunks, rows):
            end = min(n_chunks, start + rows)
            payload = encode_components(
                idx[start:end], vals[start:end], chunk_numel=chunk_numel, value_codec=value_codec
            )
            out.append(
                TensorComponents(
                    name=name,
                    shape=tuple(shape),
                    n_chunks=n_chunks,
                    k=int(idx.shape[-1]),
                    chunk_numel=chunk_numel,
                    value_codec=value_codec,  # type: ignore[arg-type]
                    payload=bytes(payload),
                    chunk_start=start if parts > 1 else 0,
                    part_chunks=end - start if parts > 1 else 0,
                )
            )
        if all(len(t.payload) + _RECORD_OVERHEAD <= budget for t in out) or rows == 1:
            return out
        biggest = max(len(t.payload) for t in out)
        parts = max(parts + 1, -(-parts * biggest // int(budget * 0.9)))


def encode_demo(
    author: str,
    cohort: str,
    step: int,
    components: dict[str, Any],
    spec: Spec,
    value_codec: str,
    budget: int = MESSAGE_BUDGET,
) -> list[bytes]:
    """This step's components as messages under ``budget`` bytes each, every one decodable alone:
    tensors packed greedily, a tensor too large for one message split into chunk ranges."""
    records: list[TensorComponents] = []
    for name in sorted(components):
        idx, vals = components[name]
        records += _tensor_parts(name, idx, vals, spec(name), value_codec, budget)
    batches: list[list[TensorComponents]] = []
    size = 0
    for rec in records:
        est = len(rec.payload) + _RECORD_OVERHEAD + len(rec.name)
        if not batches or size + est > budget or len(batches[-1]) >= limits.MAX_TENSORS_PER_MESSAGE:
            batches.append([])
            size = 0
        batches[-1].append(rec)
        size += est
    return [
        codec.encode(DemoComponents(author=author, cohort=cohort, step=step, lr=0.0, tensors=batch))
        for batch in batches
    ]


def decode_demo(record: DemoComponents, spec: Spec) -> list[tuple[str, Piece]]:
    """(tensor name, (idx, vals, first chunk)) for each record in the message."""
    out: list[tuple[str, Piece]] = []
    for t in record.tensors:
        try:
            shape, n_chunks, chunk_numel = spec(t.name)
        except KeyError:
            raise ProtocolError(f"DeMo components: unknown tensor {t.name!r}") from None
        if tuple(t.shape) != tuple(shape) or t.n_chunks != n_chunks or t.chunk_numel != chunk_numel:
            raise ProtocolError(f"DeMo components: tensor {t.name!r} chunking differs from ours")
        idx, vals = decode_components(
            t.payload, n_chunks=t.rows, k=t.k, chunk_numel=chunk_numel, value_codec=t.value_codec
        )
        out.append((t.name, (idx, vals, int(t.chunk_start))))
    return out


class GossipingDeMo:
    """The DeMo optimizer with the exchange in the middle of ``step``; the trainer's optimizer.

    It steps even when this node's batch had no signal (``step_without_signal``): its peers' components
    still apply, and its momentum still goes out."""

    step_without_signal = True

    def __init__(self, demo: Any, exchange: DemoExchange) -> None:
        self.demo = demo
        self._exchange = exchange

    def step(self, closure: Any = None) -> None:
        self._exchange._step(self.demo)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.demo.zero_grad(set_to_none=set_to_none)

    def __getattr__(self, name: str) -> Any:  # param_groups, state_dict, ... of the wrapped optimizer
        return getattr(self.demo, name)


class DemoExchange(BaseExchange):
    name = "demo"

    def __init__(
        self,
        config: DemoGossipConfig,
        *,
        host: Host,
        cohort: str,
        demo: Any,
        spec: Spec,
        members: Callable[[], list[str]] = list,
    ) -> None:
        self.config = config
        self.members = members  # the live cohort peers (``Membership.cohort_peers``)
        self.sat_out = 0  # steps we were not among the publishers
        self.host = host
        self.me = str(host.peer_id)
        self.cohort = cohort
        self.spec = spec
        self.optimizer = GossipingDeMo(demo, self)
        self.topic = topics.cohort_topic(config.swarm, topics.DEMO, cohort)
        self.traffic = Traffic()
        self.step_no = 0
        self.blocked_s = 0.0
        self.used = 0
        self.last_used = 0
        self.send_failures = 0
        self.last_messages = 0  # messages and bytes of the last step sent
        self.last_bytes = 0
        self.last_send_error = ""
        self.failures_in_row = 0
        self._inbox: dict[str, tuple[int, Any]] = {}
        self._cond = threading.Condition()
        self._out: asyncio.Queue[tuple[int, Any]] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- event loop side --------------------------------------------------------------------------

    def start(self, tg: asyncio.TaskGroup) -> None:
        self._loop = asyncio.get_running_loop()
        self._out = asyncio.Queue(maxsize=4)
        tg.create_task(receive_loop(self.host, self.topic, self.me, self._handle, self.traffic))
        tg.create_task(self._publisher())

    def _handle(self, origin: str, data: bytes) -> None:
        record = codec.decode(data)
        if not isinstance(record, DemoComponents):
            raise ValueError(f"expected DeMo components, got {type(record).__name__}")
        if record.author != origin or record.cohort != self.cohort:
            raise ValueError("DeMo components from another author or cohort")
        self.receive(origin, int(record.step), decode_demo(record, self.spec))

    def receive(self, peer: str, step: int, pieces: list[tuple[str, Any]]) -> None:
        """Pieces of a peer's step: a newer step replaces what it sent before, parts of the same step
        add up (each part of a split tensor is a contribution over its own chunk range)."""
        with self._cond:
            old = self._inbox.get(peer)
            if old is not None and step < old[0]:
                return
            groups: list[dict[str, Any]] = old[1] if old is not None and old[0] == step else []
            for name, piece in pieces:
                target = next((g for g in groups if name not in g), None)
                if target is None:
                    if len(groups) >= MAX_PIECE_GROUPS:
                        continue
                    target = {}
                    groups.append(target)
                target[name] = piece
            self._inbox[peer] = (step, groups)
            self._cond.notify_all()

    async def _publisher(self) -> None:
        assert self._out is not None
        while True:
            step, components = await self._out.get()
            try:
                messages = await asyncio.to_thread(
                    encode_demo, self.me, self.cohort, step, components, self.spec, self.config.value_codec
                )
                for data in messages:
                    await self.host.publish(self.topic, data)
                    self.traffic.bytes_sent += len(data)
                self.last_messages = len(messages)
                self.last_bytes = sum(len(m) for m in messages)
                self.failures_in_row = 0
            except Exception as exc:  # e.g. over the gossip limit: counted and shown in every metrics row
                self.send_failures += 1
                self.failures_in_row += 1
                self.last_send_error = str(exc)[:200]
                log.warning("DeMo components for step %d not sent: %s", step, exc)

    def _publish_threadsafe(self, step: int, components: Any) -> None:
        loop, out = self._loop, self._out
        if loop is None or out is None:
            return  # not started (training alone): components stay local

        def put() -> None:  # on the event loop, where the membership table lives
            if not self.publishes(step):
                self.sat_out += 1
                return
            if out.full():
                out.get_nowait()  # a newer step supersedes an unsent older one
                self.traffic.dropped += 1
            out.put_nowait((step, components))

        loop.call_soon_threadsafe(put)

    # -- trainer thread side ----------------------------------------------------------------------

    def _take(self) -> tuple[int, list[Any]]:
        """(peers, per peer the list of component dicts it sent) since our previous step: grouped by
        peer, so a peer that sends a tensor many times in a step still casts one vote."""
        lag = self.config.max_lag
        fresh = [g for s, g in self._inbox.values() if lag is None or abs(s - self.step_no) <= lag]
        self._inbox.clear()
        return len(fresh), fresh

    def _complete(self, names: list[str]) -> bool:
        """Some peer's step has arrived in full: every one of our tensors, all its chunks (a real-size
        step is many messages; the first alone holds a few tensors)."""
        for _, groups in self._inbox.values():
            rows: dict[str, int] = {}
            for g in groups:
                for name, (idx, _, _) in g.items():
                    rows[name] = rows.get(name, 0) + int(idx.shape[0])
            if all(rows.get(n, 0) >= self.spec(n)[1] for n in names):
                return True
        return False

    def publishes(self, step: int) -> bool:
        """Whether we are among step ``step``'s publishers (``max_publishers``)."""
        d = self.config.max_publishers
        if not d:
            return True
        view = set(self.members()) | {self.me}
        return len(view) <= d or self.me in choose(
            seed_of(self.config.swarm, self.cohort, "demo", step), d, view
        )

    def _step(self, demo: Any) -> None:
        own = demo.compute_components()
        self._publish_threadsafe(self.step_no, own)
        t0 = time.monotonic()
        names = list(own)
        with self._cond:
            if self.config.window_s > 0:
                # Until one peer's whole step is here (or the window ends: then whatever arrived).
                self._cond.wait_for(lambda: self._complete(names), timeout=self.config.window_s)
            n_peers, peers = self._take()
        self.blocked_s += time.monotonic() - t0
        self.used += n_peers
        self.last_used = n_peers
        demo.apply_components(peers)
        self.step_no += 1

    def statistics(self) -> dict[str, Any]:
        failing = self.failures_in_row >= 3
        return {
            "demo_health": f"not sent {self.failures_in_row} steps in a row: {self.last_send_error}"
            if failing
            else "ok",
            "demo_peers_used": self.used,
            "demo_peers_last_step": self.last_used,
            "demo_send_failures": self.send_failures,
            "demo_bytes_per_step": self.last_bytes,
            "demo_messages_per_step": self.last_messages,
            "demo_last_send_error": self.last_send_error,
            "demo_blocked_s": round(self.blocked_s, 4),
            "demo_sat_out_steps": self.sat_out,
            **self.traffic.as_dict("demo"),
        }
