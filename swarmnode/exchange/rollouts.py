"""SAPO experience sharing: informative local groups out, verified peer groups in.

Out: each step's groups whose completions scored differently (the rest carry no GRPO signal) go as
one ``RolloutBatch`` message, split in halves only if it would pass the gossip limit, in a zstd frame
(``compression.framing``: text, token ids and logprobs shrink severalfold; the frame states its size,
so a receiver never inflates more than the gossip limit).
In: a batch is decoded on the event loop (cheap, bounded by the codec), its author must be the
signer, and it waits in a bounded queue for verification in a worker thread: every problem is
regenerated from its task reference and every completion re-scored locally, so a forged reward earns
nothing. Verified groups go to the learner's replay buffer; each step takes ``external_groups`` of
them on top of (or instead of, per config) its local batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from swarmnode.compression import framing
from swarmnode.exchange.base import BaseExchange, Host, Traffic, receive_loop
from swarmnode.protocol import (
    Completion,
    ProtocolError,
    RolloutBatch,
    RolloutGroup,
    TaskRef,
    codec,
    limits,
    topics,
)
from swarmnode.replay import is_informative

log = logging.getLogger(__name__)

# Verification takes a decoded batch and returns (groups the trainer can use, number rejected).
Verifier = Callable[[RolloutBatch], tuple[list[Any], int]]


def to_rollout_group(group: Any) -> RolloutGroup:
    """A trainer ``Group`` (problem, samples, rewards) as a wire group: a task reference, never the
    answer — receivers regenerate the problem and score it themselves."""
    problem = group.problem
    completions = [
        Completion(
            text=s.text,
            token_ids=[int(t) for t in s.token_ids],
            logprobs=[float(x) for x in s.logprobs],
            reward=float(r),
        )
        for s, r in zip(group.samples, list(group.rewards), strict=True)
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


@dataclass(kw_only=True, slots=True)
class RolloutsConfig:
    swarm: str = "default"
    share: bool = True  # publish informative local groups and take verified peer groups
    queue: int = 64  # decoded batches waiting for verification; more are dropped (counted)


class RolloutExchange(BaseExchange):
    name = "rollouts"

    def __init__(
        self,
        config: RolloutsConfig,
        *,
        host: Host,
        cohort: str,
        verify: Verifier,
        add_external: Callable[[list[Any], int], None],
        sample_external: Callable[[int], list[Any]],
    ) -> None:
        self.config = config
        self.host = host
        self.me = str(host.peer_id)
        self.cohort = cohort
        self.verify = verify
        self.add_external = add_external
        self.sample_external = sample_external
        self.topic = topics.topic(config.swarm, topics.ROLLOUTS)
        self.traffic = Traffic()
        self.step = 0
        self.external_groups = 0
        self.rejected_groups = 0
        self._queue: asyncio.Queue[RolloutBatch] = asyncio.Queue(maxsize=config.queue)

    def start(self, tg: asyncio.TaskGroup) -> None:
        if not self.config.share:
            return
        tg.create_task(receive_loop(self.host, self.topic, self.me, self._handle, self.traffic))
        tg.create_task(self._verifier())

    def _handle(self, origin: str, data: bytes) -> None:
        batch = codec.decode(framing.decompress(data, max_size=limits.MAX_GOSSIP_BYTES))
        if not isinstance(batch, RolloutBatch):
            raise ValueError(f"expected a rollout batch, got {type(batch).__name__}")
        if batch.author != origin:
            raise ValueError("rollout batch author does not match the signer")
        try:
            self._queue.put_nowait(batch)
        except asyncio.QueueFull:
            self.traffic.dropped += 1

    async def _verifier(self) -> None:
        # One batch at a time, in a worker thread: verification tokenizes, which must not share a
        # tokenizer with a concurrent call, and must not stall gossip on the event loop.
        while True:
            batch = await self._queue.get()
            try:
                groups, rejected = await asyncio.to_thread(self.verify, batch)
            except Exception:  # a verifier bug must not end the exchange; the batch is lost
                self.traffic.dropped += 1
                log.exception("verifying a rollout batch from %s failed", batch.author)
                continue
            self.rejected_groups += rejected
            if groups:
                self.add_external(groups, self.step)
                self.external_groups += len(groups)

    async def on_collected(self, step: int, local: list[Any]) -> list[Any]:
        self.step = step
        if not self.config.share:
            return []
        shared = [g for g in local if is_informative(g)]
        if shared:
            wire = [to_rollout_group(g) for g in shared]
            for raw in encode_batches(self.me, self.cohort, step, wire):
                data = framing.compress(raw)
                await self.host.publish(self.topic, data)
                self.traffic.bytes_sent += len(data)
        return self.sample_external(step)

    def statistics(self) -> dict[str, Any]:
        return {
            "external_groups": self.external_groups,
            "rejected_groups": self.rejected_groups,
            **self.traffic.as_dict("rollouts"),
        }
