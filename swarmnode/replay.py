"""Replay buffer of verified external rollout groups (SAPO), bounded per author and by staleness.

Bounded per author so one chatty (or hostile) peer cannot crowd out everyone else; sampling takes the
fresh groups with the best solutions first (see ``ReplayBuffer.sample``). Groups whose
completions all scored the same carry no GRPO signal (zero advantage everywhere), so by default they
are not kept: every external slot in a step goes to a group the policy can learn from.
"""

from __future__ import annotations

import random
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(kw_only=True, slots=True)
class ReplayConfig:
    per_author: int = 64
    max_authors: int = 256
    staleness_steps: int = 8
    informative_only: bool = True  # drop zero-variance groups on arrival
    prefer: Literal["best", "fresh"] = "best"  # which fresh groups ``sample`` takes first

    def __post_init__(self) -> None:
        if self.per_author < 1:
            raise ValueError(f"per_author: expected >= 1, got {self.per_author}")
        if self.max_authors < 1:
            raise ValueError(f"max_authors: expected >= 1, got {self.max_authors}")
        if self.staleness_steps < 0:
            raise ValueError(f"staleness_steps: expected >= 0, got {self.staleness_steps}")
        if self.prefer not in ("best", "fresh"):
            raise ValueError(f"prefer: expected 'best' or 'fresh', got {self.prefer!r}")


def is_informative(group: Any) -> bool:
    """False only for a group whose rewards are all equal (GRPO advantage 0 for every completion)."""
    rewards = getattr(group, "rewards", None)
    if not rewards:
        return True  # nothing to judge by (e.g. not yet scored): keep
    return max(rewards) - min(rewards) > 1e-6


class ReplayBuffer:
    """Groups carry ``source`` (author) and are stamped with the local step at which they arrived."""

    def __init__(self, config: ReplayConfig | None = None) -> None:
        self.config = config or ReplayConfig()
        self._by_author: dict[str, deque[tuple[int, Any]]] = {}
        self._counts: Counter[str] = Counter()

    def __len__(self) -> int:
        return sum(len(q) for q in self._by_author.values())

    def add(self, groups: list[Any], step: int) -> None:
        for g in groups:
            if self.config.informative_only and not is_informative(g):
                self._counts["uninformative"] += 1
                continue
            author = str(getattr(g, "source", "unknown"))
            q = self._by_author.get(author)
            if q is None:
                if len(self._by_author) >= self.config.max_authors:
                    self._counts["dropped_too_many_authors"] += 1
                    continue
                q = self._by_author[author] = deque(maxlen=self.config.per_author)
            if len(q) == q.maxlen:
                self._counts["evicted"] += 1
            meta = getattr(g, "meta", None)
            if isinstance(meta, dict):  # the trainer's staleness bound counts from arrival, in our steps
                meta.setdefault("arrival_step", step)
            q.append((step, g))
            self._counts["added"] += 1

    def _evict_stale(self, now_step: int) -> None:
        bound = self.config.staleness_steps
        for author in list(self._by_author):
            q = self._by_author[author]
            while q and now_step - q[0][0] > bound:
                q.popleft()
                self._counts["stale"] += 1
            if not q:
                del self._by_author[author]

    def sample(self, j: int, now_step: int, rng: random.Random) -> list[Any]:
        """Up to ``j`` distinct fresh groups, removed from the buffer (each group is learned from once).

        ``prefer="best"``: the groups whose best completion scored highest first, and among those the
        ones the sender found hardest (lowest mean reward): a peer's solution to a problem most of its
        own samples failed is the experience worth borrowing (SAPO's "aha moments"). ``"fresh"``: the
        newest arrivals first (the most on-policy). Remaining ties go to the newest arrival, then
        authors take turns in a random order, so no peer crowds out another.
        """
        self._evict_stale(now_step)
        order = list(self._by_author)
        rng.shuffle(order)
        turn = {a: t for t, a in enumerate(order)}
        best = self.config.prefer == "best"
        pool = []
        for a, q in self._by_author.items():
            for i, (arrived, g) in enumerate(q):
                rewards = list(getattr(g, "rewards", None) or [0.0])
                quality = (-max(rewards), sum(rewards) / len(rewards)) if best else (0.0, 0.0)
                pool.append((quality, -arrived, len(q) - 1 - i, turn[a], a, i))
        picked = sorted(pool)[:j]
        out = [self._by_author[a][i][1] for *_, a, i in picked]
        for *_, a, i in sorted(picked, key=lambda t: (t[-2], -t[-1])):  # delete high indices first
            del self._by_author[a][i]
        for author in [a for a, q in self._by_author.items() if not q]:
            del self._by_author[author]
        self._counts["sampled"] += len(out)
        return out

    def statistics(self) -> dict[str, int]:
        return {"size": len(self), "authors": len(self._by_author), **self._counts}
