"""In-process fakes for the node's middle layer: an in-memory gossip bus, a host over it, fake time,
and a learner whose weights are one small real torch tensor.

Time: ``run(main, clock)`` runs a coroutine on an event loop whose clock is ``clock`` (the same
object the test injects as ``clock=`` into Membership, the exchanges and the Node). That clock only
moves when every task is waiting on a timer and no worker thread is busy, and then it jumps straight
to the next timer (trio's autojump ``MockClock``): a 10 s collection deadline passes in no real
time, and it can never pass while a node is still training. No test sleeps, no test reads the wall
clock.
"""

from __future__ import annotations

import asyncio
import hashlib
import selectors
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")

COHORT_A = "aa" * 8  # cohort fingerprints must match protocol FINGERPRINT_RE
COHORT_B = "bb" * 8
SWARM = "test-swarm"


# -- time -----------------------------------------------------------------------------------------


class FakeClock:
    """Seconds since the test began; ``advance`` moves it by hand, the autojump loop moves it when idle."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start
        self.busy = 0  # worker-thread jobs in flight: while any runs, time stands still

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class _AutojumpSelector(selectors.DefaultSelector):
    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self._clock = clock

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if self._clock.busy or timeout is None or timeout <= 0:
            # A worker thread will wake us (call_soon_threadsafe) or something is ready now.
            return super().select(timeout)
        events = super().select(0)
        if not events:
            self._clock.advance(timeout)  # everyone waits on a timer: jump to the next one
        return events


class _FakeTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self, clock: FakeClock) -> None:
        super().__init__(_AutojumpSelector(clock))
        self._fake_clock = clock

    def time(self) -> float:
        return self._fake_clock.now

    def run_in_executor(self, executor: Any, func: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        fut = super().run_in_executor(executor, func, *args)
        self._fake_clock.busy += 1

        def done(_: Any) -> None:
            self._fake_clock.busy -= 1

        fut.add_done_callback(done)
        return fut


def run(main: Coroutine[Any, Any, T], clock: FakeClock) -> T:
    """Run ``main`` on an event loop whose time is ``clock`` (see the module docstring)."""
    with asyncio.Runner(loop_factory=lambda: _FakeTimeLoop(clock)) as runner:
        return runner.run(main)


async def with_started(
    parts: Iterable[Any], body: Coroutine[Any, Any, None], *, settle_first: bool = False
) -> None:
    """Start each part (``part.start(tg)``: a membership, an exchange) in one task group, await
    ``body``, then cancel everything the parts started."""
    try:
        async with asyncio.TaskGroup() as tg:
            for part in parts:
                part.start(tg)
            if settle_first:
                await settle()  # presence flows first
            else:
                await asyncio.sleep(0)  # let the subscriptions open
            await body
            raise _Stop
    except* _Stop:
        pass


class _Stop(Exception):
    pass


async def settle(seconds: float = 1.0) -> None:
    """Let every message and worker-thread job in flight finish (fake time, so this costs nothing)."""
    await asyncio.sleep(seconds)


# -- the network ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Msg:
    topic: str
    origin: str
    data: bytes


class Bus:
    """In-memory gossip: every subscriber of a topic gets every message, its own included (as
    gossipsub echoes them); blobs and request handlers are per peer."""

    def __init__(self) -> None:
        self.queues: dict[str, list[asyncio.Queue[Msg | None]]] = {}
        self.hosts: dict[str, FakeHost] = {}
        self._subscribed = asyncio.Event()

    async def wait_subscribed(self, *topics: str) -> None:
        """Until every topic has at least one subscriber (so what is published next is heard)."""
        while not all(self.queues.get(t) for t in topics):
            self._subscribed.clear()
            await self._subscribed.wait()


class FakeHost:
    """The ``swarmnode.exchange.base.Host`` surface over a ``Bus``.

    ``dead = True``: the peer still publishes but never answers a fetch or a request (a crashed
    uploader, a peer behind a broken NAT). ``close()``: the transport is gone, every subscription
    of this host ends. ``address``: where its connections come from (``remote_addresses``); by
    default each host on the bus is in a /24 of its own, a test puts Sybil hosts in one."""

    def __init__(self, bus: Bus, peer_id: str, address: str | None = None) -> None:
        self.bus = bus
        self.peer_id = peer_id
        self.address = (
            address if address is not None else f"10.{len(bus.hosts) % 250}.{len(bus.hosts) // 250}.1:4001"
        )
        self.dead = False
        self.blobs: dict[str, bytes] = {}
        self.views: dict[str, tuple[int, Callable[[int, int], bytes]]] = {}
        self.handlers: dict[str, Callable[[str, bytes], Awaitable[bytes]]] = {}
        self.served_bytes = 0
        self.served: dict[str, int] = {}  # content hash -> times served
        self.expected: set[str] = set()
        self.published: list[Msg] = []
        self._mine: list[asyncio.Queue[Msg | None]] = []
        bus.hosts[peer_id] = self

    async def publish(self, topic: str, data: bytes) -> None:
        # Delivery is asynchronous, as over a real network: tasks already scheduled (nodes started
        # together opening their subscriptions) run first, so nodes started at once all hear each
        # other's first presence.
        await asyncio.sleep(0)
        msg = Msg(topic, self.peer_id, bytes(data))
        self.published.append(msg)
        for q in list(self.bus.queues.get(topic, [])):
            q.put_nowait(msg)

    def subscribe(self, topic: str) -> AsyncIterator[Msg]:
        q: asyncio.Queue[Msg | None] = asyncio.Queue()
        self.bus.queues.setdefault(topic, []).append(q)
        self.bus._subscribed.set()
        self._mine.append(q)
        return self._messages(topic, q)

    async def _messages(self, topic: str, q: asyncio.Queue[Msg | None]) -> AsyncIterator[Msg]:
        try:
            while (msg := await q.get()) is not None:
                yield msg
        finally:
            subs = self.bus.queues.get(topic, [])
            if q in subs:
                subs.remove(q)

    def close(self) -> None:
        for q in self._mine:
            q.put_nowait(None)

    def provide_blob(self, data: bytes) -> str:
        h = hashlib.sha256(data).hexdigest()
        self.blobs[h] = bytes(data)
        return h

    def provide_view(self, content_hash: str, size: int, read: Callable[[int, int], bytes]) -> None:
        self.views[content_hash] = (size, read)

    def remove_blob(self, content_hash: str) -> None:
        self.blobs.pop(content_hash, None)
        self.views.pop(content_hash, None)

    def expect_blob(self, content_hash: str, timeout: float) -> None:
        self.expected.add(content_hash)

    def unexpect_blob(self, content_hash: str) -> None:
        self.expected.discard(content_hash)

    async def fetch(
        self,
        content_hash: str,
        providers: list[str],
        *,
        max_size: int,
        timeout: float = 60.0,  # noqa: ASYNC109
    ) -> bytes:
        for p in providers:
            host = self.bus.hosts.get(p)
            if host is None:
                continue
            if host.dead:
                await asyncio.Event().wait()  # never answers; the caller's deadline must end this
            while (  # noqa: ASYNC110 - the real blob server holds a request for a blob its host still pulls
                content_hash in host.expected
                and content_hash not in host.blobs
                and content_hash not in host.views
            ):
                await asyncio.sleep(0.01)
            data = host.blobs.get(content_hash)
            if data is None and content_hash in host.views:
                size, read = host.views[content_hash]
                data = read(0, size)
                if hashlib.sha256(data).hexdigest() != content_hash:
                    continue  # the real host's hash check: try the next provider
            if data is not None:
                if len(data) > max_size:
                    raise ValueError(f"blob {content_hash[:8]} is {len(data)} bytes, over {max_size}")
                host.served_bytes += len(data)
                host.served[content_hash] = host.served.get(content_hash, 0) + 1
                return data
        raise LookupError(f"no provider has blob {content_hash[:8]}")

    async def fetch_file(
        self,
        content_hash: str,
        providers: list[str],
        path: Any,
        *,
        max_size: int,
        timeout: float = 60.0,  # noqa: ASYNC109
    ) -> int:
        data = await self.fetch(content_hash, providers, max_size=max_size, timeout=timeout)
        Path(path).write_bytes(data)  # noqa: ASYNC240 (a test double: small blobs)
        return len(data)

    def set_request_handler(
        self, protocol_id: str, handler: Callable[[str, bytes], Awaitable[bytes]]
    ) -> None:
        self.handlers[protocol_id] = handler

    async def request(self, peer_id: str, protocol_id: str, data: bytes) -> bytes:
        host = self.bus.hosts[peer_id]
        if host.dead:
            await asyncio.Event().wait()
        return await host.handlers[protocol_id](self.peer_id, data)

    def connected_peers(self) -> list[str]:
        return [p for p in self.bus.hosts if p != self.peer_id]

    def remote_addresses(self) -> dict[str, str]:
        return {p: h.address for p, h in self.bus.hosts.items() if p != self.peer_id and h.address}

    def statistics(self) -> dict[str, Any]:
        return {"blobs": {"served_bytes": self.served_bytes}}


# -- a learner ------------------------------------------------------------------------------------


@dataclass
class Problem:
    family: str = "arith"
    seed: int = 7
    index: int = 0


@dataclass
class Sample:
    text: str
    token_ids: list[int]
    logprobs: list[float]


@dataclass
class Group:
    """The trainer's group shape (what ``rollouts.to_rollout_group`` reads)."""

    problem: Problem
    samples: list[Sample]
    rewards: list[float]


def make_group(index: int, rewards: tuple[float, ...] = (1.0, 0.0), family: str = "arith") -> Group:
    samples = [Sample(text=f"answer {r}", token_ids=[1, 2, 3], logprobs=[-0.5] * 3) for r in rewards]
    return Group(problem=Problem(family=family, index=index), samples=samples, rewards=list(rewards))


def verify_batch(batch: Any) -> tuple[list[Any], int]:
    """Stands in for ``verify.verify_external`` (tested on its own): groups of the "forged" task
    family are rejected, the rest accepted as they are."""
    good = [g for g in batch.groups if g.task.family != "forged"]
    return good, len(batch.groups) - len(good)


@dataclass
class TinyLearner:
    """Weights are one real 16-element tensor that drifts by ``drift`` per inner step, so replicas
    diverge between merges by a known amount. ``gate``: a threading event ``train_step`` waits on
    before step ``gate_step`` (a slow node, without sleeping)."""

    drift: float
    fingerprint: str = COHORT_A
    numel: int = 16
    gate: threading.Event | None = None
    gate_step: int = -1
    need_external_at: int = -1  # this step waits until a peer's verified group has arrived
    model: torch.nn.ParameterDict = field(init=False)
    external: list[Any] = field(default_factory=list)
    used_external: int = 0
    steps_trained: int = 0
    _arrived: threading.Condition = field(default_factory=threading.Condition, repr=False)

    def __post_init__(self) -> None:
        self.model = torch.nn.ParameterDict({"w": torch.nn.Parameter(torch.zeros(self.numel))})

    @property
    def w(self) -> torch.Tensor:
        return self.model["w"]

    def collect_local(self, step: int) -> list[Any]:
        return [make_group(2 * step), make_group(2 * step + 1, rewards=(1.0, 1.0))]  # one uninformative

    def train_step(self, local: list[Any], external: list[Any]) -> dict[str, float]:
        if self.gate is not None and self.steps_trained == self.gate_step:
            assert self.gate.wait(30), "gate never opened"
        if self.steps_trained == self.need_external_at:
            with self._arrived:
                assert self._arrived.wait_for(lambda: self.external, 30), "no peer group arrived"
        with torch.no_grad():
            self.w.add_(self.drift)
        self.used_external += len(external)
        self.steps_trained += 1
        return {"reward": 0.5}

    def evaluate(self) -> float:
        return 0.25

    def add_external(self, groups: list[Any], step: int) -> None:
        with self._arrived:
            self.external.extend(groups)
            self._arrived.notify_all()

    def sample_external(self, step: int) -> list[Any]:
        with self._arrived:
            out, self.external = self.external[:2], self.external[2:]
        return out


def eve_presence() -> Any:
    """A valid presence record from "eve": the wrong kind of record on any topic but presence."""
    from swarmnode.protocol import Presence

    return Presence(
        peer_id="eve",
        addrs=[],
        swarm=SWARM,
        cohort=COHORT_A,
        engine="hf",
        hardware="cpu",
        step=0,
        round=0,
        samples=0,
        anchor_hash="",
    )


def make_membership(host: Any, clock: FakeClock, cohort: str, status: Callable[[], Any]) -> Any:
    """The Membership the exchange and node tests run: presence every 0.5 s, 5 s peer timeout."""
    from swarmnode.membership import Membership, MembershipConfig

    return Membership(
        MembershipConfig(swarm=SWARM, presence_interval_s=0.5, peer_timeout_s=5.0),
        host=host,
        cohort=cohort,
        engine="hf",
        hardware="cpu",
        addrs=lambda: [],
        status=status,
        clock=clock,
    )
