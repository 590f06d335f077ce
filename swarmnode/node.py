"""The swarm node: one asyncio task group, the step loop, and nothing else.

The node drives a ``Learner`` (collect, train, evaluate: heavy torch work, run in worker threads so
gossip keeps flowing) and a list of exchanges through the ``Exchange`` protocol
(``swarmnode.exchange.base``); it knows no channel, codec or topic. Every long-lived task (each
exchange's subscriptions and publishers, the presence heartbeat) lives in the node's task group: a
transport that dies ends its subscriptions, which raises out of the group and stops the node with a
clear error; cancelling the group is the shutdown.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from swarmnode.exchange.base import Exchange
from swarmnode.membership import Membership

log = logging.getLogger(__name__)


@dataclass(kw_only=True, slots=True)
class LoopConfig:
    steps: int = 0  # 0: run until stopped
    duration_s: float = 0.0  # 0: no wall-clock limit
    eval_every: int = 5
    checkpoint_every: int = 0  # steps between checkpoints (0: none from the loop)
    metrics_path: Path | None = None

    def __post_init__(self) -> None:
        if self.steps < 0 or not self.duration_s >= 0:
            raise ValueError(f"steps and duration_s must be >= 0, got {self.steps}, {self.duration_s}")
        if self.eval_every < 1:
            raise ValueError(f"eval_every must be >= 1, got {self.eval_every}")


class Learner(Protocol):
    """Local RL: see ``swarmnode.learner.Learner``."""

    fingerprint: str

    def collect_local(self, step: int) -> list[Any]: ...
    def train_step(self, local: list[Any], external: list[Any]) -> dict[str, float]: ...
    def evaluate(self) -> float: ...


class Node:
    """One swarm participant. ``await node.run()`` returns when the step/time budget is spent or
    ``stop()`` was called."""

    def __init__(
        self,
        config: LoopConfig,
        *,
        learner: Learner,
        membership: Membership,
        exchanges: Sequence[Exchange],
        step: int = 0,
        clock: Callable[[], float] = time.monotonic,
        on_step: Callable[[dict[str, Any]], None] | None = None,
        host_statistics: Callable[[], dict[str, Any]] | None = None,
        checkpoint: Callable[[int], None] | None = None,
    ) -> None:
        self.host_statistics = host_statistics
        self.checkpoint = checkpoint
        self.config = config
        self.learner = learner
        self.membership = membership
        self.exchanges = list(exchanges)
        self.step = step
        self.clock = clock
        self.on_step = on_step
        self.last_reward = float("nan")
        self.last_eval = float("nan")
        self._stop = asyncio.Event()
        self._metrics_file: Any = None

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def exchange(self, name: str) -> Any:
        for ex in self.exchanges:
            if ex.name == name:
                return ex
        return None

    async def run(self) -> Node:
        if self.config.metrics_path is not None:
            self.config.metrics_path.parent.mkdir(parents=True, exist_ok=True)
            self._metrics_file = self.config.metrics_path.open("a", encoding="utf-8")
        try:
            async with asyncio.TaskGroup() as tg:
                self.membership.start(tg)
                for ex in self.exchanges:
                    ex.start(tg)
                start = self.clock()
                await self._train_loop(start)
                for ex in self.exchanges:
                    await ex.finish(self.stopped)
                if not self.stopped:  # the state every replica ends on (after the last merge)
                    self._record({"final": 1.0}, step_seconds=0.0, elapsed=self.clock() - start)
                await self.membership.leave()
                raise _Done  # cancels every background task of the group
        except* _Done:
            pass
        finally:
            if self._metrics_file is not None:
                self._metrics_file.close()
        return self

    async def _train_loop(self, start: float) -> None:
        c = self.config
        while not self._stop.is_set():
            for ex in self.exchanges:
                self.step = max(self.step, await ex.before_step(self.step))
            if c.steps and self.step >= c.steps:
                break
            if c.duration_s and self.clock() - start >= c.duration_s:
                break
            t0 = self.clock()
            metrics = await self._inner_step()
            if self.step % c.eval_every == 0 or (c.steps and self.step == c.steps):
                self.last_eval = await asyncio.to_thread(self.learner.evaluate)
            self._record(metrics, step_seconds=self.clock() - t0, elapsed=self.clock() - start)
            if self.checkpoint is not None and c.checkpoint_every and self.step % c.checkpoint_every == 0:
                await asyncio.to_thread(self.checkpoint, self.step)  # off the event loop

    async def _inner_step(self) -> dict[str, float]:
        step = self.step
        local = await asyncio.to_thread(self.learner.collect_local, step)
        external: list[Any] = []
        for ex in self.exchanges:
            external += await ex.on_collected(step, local)
        metrics = await asyncio.to_thread(self.learner.train_step, local, external)
        self.step = step + 1
        self.last_reward = float(metrics.get("reward", float("nan")))
        for ex in self.exchanges:
            await ex.after_step(self.step, len(local) + len(external))
        return metrics

    def statistics(self) -> dict[str, Any]:
        row: dict[str, Any] = {"step": self.step, "reward": self.last_reward, "eval_acc": self.last_eval}
        row.update(self.membership.statistics())
        if self.host_statistics is not None:
            host = self.host_statistics()
            # pseudo-gradient and state blobs our peers pulled from us (served by the p2p host)
            row["blob_bytes_served"] = int(host.get("blobs", {}).get("served_bytes", 0))
            # "public <multiaddr>", "behind NAT[, reachable through relay X]" or "unknown"
            row["reachability"] = str(host.get("reachability", "unknown"))
            # our publishes that did not wait for a peer whose outbound queue stopped draining, and
            # the gossip RPCs the library dropped for full queues: a slow or hostile peer shows here
            row["gossip/stalled_skips"] = int(host.get("pacing_stalled_skips", 0))
            row["gossip/outbound_dropped"] = int(sum(host.get("outbound_dropped", {}).values()))
            # connected peers by path (a NATed node reaches others through a relay until a hole punch
            # or a direct dial succeeds), and what we relayed for NATed peers (public nodes)
            relay = host.get("relay", {})
            kinds = relay.get("peers", {})
            row["p2p/direct_peers"] = int(kinds.get("direct", 0)) + int(kinds.get("both", 0))
            row["p2p/relayed_peers"] = int(kinds.get("relayed", 0))
            row["relay/reservations"] = int(relay.get("reservations", 0))
            row["relay/bytes_relayed"] = int(relay.get("bytes_relayed", 0))
        for ex in self.exchanges:
            row.update(ex.statistics())
        sent = sum(v for k, v in row.items() if k.endswith("/bytes_sent"))
        received = sum(v for k, v in row.items() if k.endswith("/bytes_received"))
        blocked = sum(v for k, v in row.items() if k.endswith("blocked_s"))
        row.update(bytes_sent=sent, bytes_received=received, blocked_on_network_s=round(blocked, 4))
        return row

    def _record(self, metrics: dict[str, float], *, step_seconds: float, elapsed: float) -> None:
        row: dict[str, Any] = {
            "time": time.time(),
            "elapsed_s": round(elapsed, 3),
            "step_s": round(step_seconds, 3),
        }
        row.update(self.statistics())
        for key, value in metrics.items():
            row.setdefault(f"train/{key}", value)
        if self._metrics_file is not None:
            # NaN is not JSON; null keeps the file parseable by strict readers.
            clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
            self._metrics_file.write(json.dumps(clean) + "\n")
            self._metrics_file.flush()
        if self.on_step is not None:
            self.on_step(row)


class _Done(Exception):
    """Raised inside the task group once the node is finished: cancels the background tasks."""
