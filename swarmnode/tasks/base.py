"""Task families: deterministic procedural problems with locally checkable answers.

A problem is named by (family, seed, index) so a rollout can travel as a reference and every receiver
regenerates the same question and ground truth. Held-out membership is a property of the question's
*content* (a stable hash bucket), not of where it came from: training generation skips held-out
questions, so no (seed, index) can ever hand the trainer an evaluation problem.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

# One question in HELDOUT_BUCKETS is held out (10 %): enough distinct evaluation problems for every
# built-in family while leaving the training distribution essentially unchanged.
HELDOUT_BUCKETS = 10
# Rejection sampling for a training problem: 64 held-out draws in a row has probability 1e-64, so the
# bound only guards against a broken family (which then raises instead of spinning).
_MAX_DRAWS = 64
# Completions are scored on at most this many characters: scoring must stay cheap on hostile input.
MAX_SCORED_CHARS = 4096


@dataclass(frozen=True, slots=True)
class Problem:
    family: str
    seed: int
    index: int
    prompt: str
    answer: str


def stable_hash(*parts: object) -> int:
    """A 64-bit hash that is the same in every process (unlike ``hash()``, which is salted)."""
    data = "\x1f".join(str(p) for p in parts).encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little")


def is_heldout_prompt(family: str, prompt: str) -> bool:
    return stable_hash("heldout", family, prompt) % HELDOUT_BUCKETS == 0


class TaskFamily:
    """Base class: subclasses set ``name`` and implement ``_draw`` and ``score``."""

    name: str = ""
    # Which question stream (and held-out split) the family draws from; "" means its own ``name``.
    # Two families with one space ask the same questions and differ only in how they score them.
    space: str = ""

    @property
    def problem_space(self) -> str:
        return self.space or self.name

    def _draw(self, rng: random.Random) -> tuple[str, str]:
        """One random (prompt, answer) pair."""
        raise NotImplementedError

    def score(self, problem: Problem, completion_text: str) -> float:
        raise NotImplementedError

    def is_correct(self, problem: Problem, completion_text: str) -> bool:
        return _clean(completion_text) == problem.answer

    def is_heldout(self, problem: Problem) -> bool:
        return is_heldout_prompt(self.problem_space, problem.prompt)

    def problem(self, seed: int, index: int) -> Problem:
        """The training problem (seed, index): deterministic, never a held-out question."""
        if not isinstance(seed, int) or not isinstance(index, int) or index < 0:
            raise ValueError(f"seed and index must be ints with index >= 0, got {seed!r}, {index!r}")
        rng = random.Random(stable_hash(self.problem_space, seed, index))
        for _ in range(_MAX_DRAWS):
            prompt, answer = self._draw(rng)
            if not is_heldout_prompt(self.problem_space, prompt):
                return Problem(family=self.name, seed=seed, index=index, prompt=prompt, answer=answer)
        raise RuntimeError(f"{self.name}: {_MAX_DRAWS} held-out draws in a row for ({seed}, {index})")

    def heldout(self, n: int) -> list[Problem]:
        """The first ``n`` distinct held-out questions of a fixed stream (same list in every process)."""
        rng = random.Random(stable_hash(self.problem_space, "heldout-stream"))
        out: list[Problem] = []
        seen: set[str] = set()
        # Bounded: each draw is held out with p = 1/HELDOUT_BUCKETS; a family too small to supply n
        # distinct questions raises instead of spinning.
        for _ in range(max(1000, 200 * n * HELDOUT_BUCKETS)):
            if len(out) >= n:
                break
            prompt, answer = self._draw(rng)
            if prompt in seen or not is_heldout_prompt(self.problem_space, prompt):
                continue
            seen.add(prompt)
            out.append(Problem(family=self.name, seed=-1, index=len(out), prompt=prompt, answer=answer))
        if len(out) < n:
            raise ValueError(f"{self.name}: only {len(out)} distinct held-out problems, asked for {n}")
        return out


def _clean(text: str) -> str:
    """The completion as an answer: bounded, whitespace-trimmed (EOS is already stripped by engines)."""
    if not isinstance(text, str):
        return ""
    return text[:MAX_SCORED_CHARS].strip()
