"""SAPO experience sharing: informative local groups out, verified peer groups in, chosen by need.

Out: each step's groups whose completions scored differently (the rest carry no GRPO signal) go as
one ``RolloutBatch`` message, split in halves only if it would pass the gossip limit, in a zstd frame
(``compression.framing``: text, token ids and logprobs shrink severalfold; the frame states its size,
so a receiver never inflates more than the gossip limit).

In: a batch is decoded on the event loop (cheap, bounded by the codec), its author must be the
signer, and every group is de-duplicated by content across messages (a batch replayed x100 counts
once; the seen set is bounded and batches older than it are refused), then the batch waits in a
bounded queue for verification in a worker thread: every problem is regenerated from its task
reference and every completion re-scored locally, so a forged reward earns nothing. Verified groups
go to the learner's replay buffer and wait in the policy's bounded pool (per author, and by
staleness in our steps).

Which borrowed groups a step takes (``SharingPolicy``), from the measurements in the README: they
come on top of a full local batch (8 local + up to 4 borrowed: borrowing never displaces a group
this node would have generated), groups from *other cohorts* first (a same-cohort peer's experience
already reaches us through the DiLoCo merge, so borrowing it teaches the same thing twice), and among
them the problems this node fails on: a peer's solution where our own samples of problems like it
(same family, same answer length) score low is the experience worth borrowing (SAPO's "aha
moments"). Another cohort's group is taken only where its sender did better than we do on such
problems, by a margin: a weaker model's answers to problems we already solve are no lesson for us.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
from collections import OrderedDict, deque
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


def group_digest(group: RolloutGroup) -> bytes:
    """What makes two wire groups the same experience: the task and the completions' text (not the
    author, the step or the claimed rewards, which a replayer could change freely)."""
    h = hashlib.blake2b(digest_size=16)
    t = group.task
    h.update(f"{t.family}\x1f{t.seed}\x1f{t.index}".encode("utf-8", "surrogatepass"))
    for c in group.completions:
        h.update(b"\x1e" + c.text.encode("utf-8", "surrogatepass"))
    return h.digest()


class SeenSet:
    """The last ``capacity`` digests, oldest forgotten first: bounded memory whatever peers send."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._seen: OrderedDict[bytes, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def __contains__(self, digest: bytes) -> bool:
        return digest in self._seen

    def add(self, digest: bytes) -> bool:
        """True if ``digest`` is new (and now remembered), False if it was seen already."""
        if digest in self._seen:
            self._seen.move_to_end(digest)
            return False
        self._seen[digest] = None
        if len(self._seen) > self.capacity:
            self._seen.popitem(last=False)
        return True


def _rewards(group: Any) -> list[float]:
    rewards = getattr(group, "rewards", None)
    if rewards is None:  # a wire group
        rewards = [c.reward for c in getattr(group, "completions", ())]
    return [float(r) for r in rewards]


def _bucket(group: Any) -> tuple[str, int]:
    """Problems alike in difficulty: same family, same answer length (word length for reverse)."""
    problem = getattr(group, "problem", None) or getattr(group, "task", None)
    family = str(getattr(problem, "family", ""))
    answer = getattr(problem, "answer", None)
    return family, len(answer) if isinstance(answer, str) else -1


@dataclass(kw_only=True, slots=True)
class RolloutsConfig:
    swarm: str = "default"
    share: bool = True  # publish informative local groups and take verified peer groups
    queue: int = 64  # decoded batches waiting for verification; more are dropped (counted)
    # Borrowed groups a step takes at most; None: as many as the learner's replay buffer hands out
    # (train.external_groups, bounded by what is fresh), so the learner decides how many and this
    # policy which ones.
    take: int | None = None
    # Steps a pooled group may wait (our steps since arrival): train.staleness_steps' default.
    staleness_steps: int = 4
    per_author: int = 32  # verified groups pooled per author; older ones are forgotten first
    max_authors: int = 256
    # A same-cohort group's score is scaled by this: its experience already reaches us through the
    # merge, so another cohort's group of equal value goes first (0: never borrow from our cohort).
    same_cohort_weight: float = 0.5
    # Another cohort's group is borrowed only where its sender did clearly better than we do on
    # problems like it (its mean reward over our success rate, by more than this), and only once we
    # have tried such problems ourselves. Measured (bench_hetero): a
    # strong cohort that trained on a weak cohort's groups of problems it already solved collapsed
    # (cumulative reward 249 -> 44): pushing down another model's wrong answers, text this model
    # would rarely write, moves it more than learning from its own.
    cross_cohort_min_gain: float = 0.25
    seen_groups: int = 16384  # digests remembered for de-duplication (16 B each)
    # A batch created longer ago than this (sender's clock) is refused: a replay of it could
    # otherwise return once its digests left the bounded seen set. Generous for clock skew.
    max_age_s: float = 600.0

    def __post_init__(self) -> None:
        for name in ("queue", "per_author", "max_authors", "seen_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.take is not None and self.take < 0:
            raise ValueError(f"take: expected >= 0, got {self.take}")
        if self.staleness_steps < 0:
            raise ValueError(f"staleness_steps: expected >= 0, got {self.staleness_steps}")
        if not -1.0 <= self.cross_cohort_min_gain <= 1.0:
            raise ValueError(f"cross_cohort_min_gain: expected in [-1, 1], got {self.cross_cohort_min_gain}")
        if not 0.0 <= self.same_cohort_weight <= 1.0:
            raise ValueError(f"same_cohort_weight: expected in [0, 1], got {self.same_cohort_weight}")
        if not self.max_age_s > 0:
            raise ValueError(f"max_age_s: expected > 0, got {self.max_age_s}")


class SharingPolicy:
    """This node's success per kind of problem (from its own local groups), and the pool of verified
    peer groups ranked by what borrowing them is worth to it."""

    # weight of the newest local groups in a bucket's success estimate (about the last 10 steps)
    EMA = 0.1
    MAX_BUCKETS = 1024

    def __init__(self, config: RolloutsConfig, cohort: str) -> None:
        self.config = config
        self.cohort = cohort
        self._success: OrderedDict[tuple[str, int], float] = OrderedDict()
        self._pool: dict[str, deque[tuple[int, int, bool, Any]]] = {}
        self._seq = 0
        self.counts = {
            "pool_evicted": 0,
            "pool_stale": 0,
            "borrowed_other_cohort": 0,
            "borrowed_same_cohort": 0,
        }

    def observe_local(self, groups: list[Any]) -> None:
        for g in groups:
            rewards = _rewards(g)
            if not rewards:
                continue
            key = _bucket(g)
            mean = sum(rewards) / len(rewards)
            old = self._success.pop(key, None)
            self._success[key] = mean if old is None else (1 - self.EMA) * old + self.EMA * mean
            if len(self._success) > self.MAX_BUCKETS:
                self._success.popitem(last=False)

    def need(self, group: Any) -> float:
        """1 − our success on problems like this one; unseen kinds count as failed (we have no
        evidence of solving them)."""
        return 1.0 - self._success.get(_bucket(group), 0.0)

    def add(self, author: str, cohort: str, groups: list[Any], step: int) -> None:
        other = cohort != self.cohort
        if not other and self.config.same_cohort_weight == 0:
            return
        q = self._pool.get(author)
        if q is None:
            if len(self._pool) >= self.config.max_authors:
                self.counts["pool_evicted"] += len(groups)
                return
            q = self._pool[author] = deque(maxlen=self.config.per_author)
        for g in groups:
            if len(q) == q.maxlen:
                self.counts["pool_evicted"] += 1
            meta = getattr(g, "meta", None)
            if isinstance(meta, dict):  # staleness counts from arrival, in our steps
                meta["arrival_step"] = step
                meta["cohort"] = "other" if other else "same"
            self._seq += 1
            q.append((step, self._seq, other, g))

    def __len__(self) -> int:
        return sum(len(q) for q in self._pool.values())

    def score(self, group: Any, other: bool) -> float:
        """What borrowing ``group`` is worth: its best solution × how badly we need it, halved (by
        default) for our own cohort; 0 (never borrowed) for another cohort's group whose sender did
        no better than we do on problems like it."""
        rewards = _rewards(group)
        best = max(rewards) if rewards else 0.0
        if other:
            mine = self._success.get(_bucket(group))
            if mine is None:  # no evidence yet of how we do on such problems: not worth the risk
                return 0.0
            gain = sum(rewards) / max(1, len(rewards)) - mine
            if gain <= self.config.cross_cohort_min_gain:
                return 0.0
            return best * (self.need(group) + 0.05)
        # a small floor: problems we already solve still beat an empty slot
        return best * (self.need(group) + 0.05) * self.config.same_cohort_weight

    def take(self, step: int, n: int) -> list[Any]:
        """Up to ``n`` pooled groups, best first (ties: newest), removed from the pool."""
        bound = self.config.staleness_steps
        ranked = []
        for author in list(self._pool):
            q = self._pool[author]
            while q and step - q[0][0] > bound:
                q.popleft()
                self.counts["pool_stale"] += 1
            if not q:
                del self._pool[author]
                continue
            for arrived, seq, other, g in q:
                score = self.score(g, other)
                if score > 0:  # worth nothing to us: left to go stale
                    ranked.append((-score, -arrived, seq, author, other, g))
        ranked.sort(key=lambda t: t[:3])
        picked = ranked[:n]
        chosen = {seq for _, _, seq, *_ in picked}
        for author in {a for *_, a, _o, _g in picked}:
            kept = deque((e for e in self._pool[author] if e[1] not in chosen), maxlen=self.config.per_author)
            if kept:
                self._pool[author] = kept
            else:
                del self._pool[author]
        for *_, other, _g in picked:
            self.counts["borrowed_other_cohort" if other else "borrowed_same_cohort"] += 1
        return [g for *_, g in picked]


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
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.host = host
        self.me = str(host.peer_id)
        self.cohort = cohort
        self.verify = verify
        self.add_external = add_external
        self.sample_external = sample_external
        self.wall_clock = wall_clock
        self.topic = topics.topic(config.swarm, topics.ROLLOUTS)
        self.traffic = Traffic()
        self.policy = SharingPolicy(config, cohort)
        self.seen = SeenSet(config.seen_groups)
        self.step = 0
        self.external_groups = 0
        self.rejected_groups = 0
        self.duplicate_groups = 0
        self.duplicate_batches = 0
        self.old_batches = 0
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
        if batch.created_at < self.wall_clock() - self.config.max_age_s:
            self.old_batches += 1
            raise ValueError(f"rollout batch created over {self.config.max_age_s:g} s ago")
        fresh: dict[bytes, RolloutGroup] = {}
        for g in batch.groups:
            d = group_digest(g)
            if d not in self.seen and d not in fresh:
                fresh[d] = g
        self.duplicate_groups += len(batch.groups) - len(fresh)
        if not fresh:
            self.duplicate_batches += 1
            return
        try:
            self._queue.put_nowait(dataclasses.replace(batch, groups=list(fresh.values())))
        except asyncio.QueueFull:
            self.traffic.dropped += 1  # not remembered: a later copy may still get in
            return
        for d in fresh:
            self.seen.add(d)

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
            groups = [g for g in groups if is_informative(g)]  # re-scored here: may differ from the sender's
            if groups:
                self.policy.add(batch.author, batch.cohort, groups, self.step)
                self.add_external(groups, self.step)
                self.external_groups += len(groups)

    async def on_collected(self, step: int, local: list[Any]) -> list[Any]:
        self.step = step
        if not self.config.share:
            return []
        self.policy.observe_local(local)
        shared = [g for g in local if is_informative(g)]
        if shared:
            wire = [to_rollout_group(g) for g in shared]
            for raw in encode_batches(self.me, self.cohort, step, wire):
                data = framing.compress(raw)
                await self.host.publish(self.topic, data)
                self.traffic.bytes_sent += len(data)
        # The learner's replay buffer got every verified group on arrival (its bounds and counters
        # apply there); which of them this step trains on is the policy's choice, so what the buffer
        # would hand out is only drained (its sample also evicts what went stale).
        drained = self.sample_external(step)
        return self.policy.take(step, len(drained) if self.config.take is None else self.config.take)

    def statistics(self) -> dict[str, Any]:
        return {
            "external_groups": self.external_groups,
            "rejected_groups": self.rejected_groups,
            "duplicate_groups": self.duplicate_groups,
            "duplicate_batches": self.duplicate_batches,
            "old_batches": self.old_batches,
            "pooled_groups": len(self.policy),
            **self.policy.counts,
            **self.traffic.as_dict("rollouts"),
        }
