"""Built-in procedural families a tiny character-level model can learn on a CPU.

Scoring shape (all families): 1.0 exact; otherwise FORMAT_CREDIT for an answer in the right alphabet
plus up to PARTIAL_CREDIT for position-wise correct characters; 0.0 for anything else. Partial credit
stays below 1.0 so an exact answer is always strictly best.

``<family>-exact`` (e.g. ``reverse-exact``) asks the same questions with a binary reward: 1.0 for an
exact answer, 0.0 otherwise. That is the regime of reasoning benchmarks, where a group whose answers are
all wrong carries no signal, so a node learns much more from peers' groups that contain a hit.
"""

from __future__ import annotations

import random
import string

from swarmnode.tasks.base import Problem, TaskFamily, _clean

FORMAT_CREDIT = 0.1
PARTIAL_CREDIT = 0.5


def _positional(answer: str, got: str, *, right_align: bool) -> float:
    """Fraction of answer characters matched in place (numbers align on the units digit)."""
    if right_align:
        answer, got = answer[::-1], got[::-1]
    hits = sum(1 for a, b in zip(answer, got, strict=False) if a == b)
    return hits / max(len(answer), len(got))


class AddFamily(TaskFamily):
    """Multi-digit addition, "12+345=" → "357"; operands have 1–3 digits (digit count uniform)."""

    name = "add"

    def _draw(self, rng: random.Random) -> tuple[str, str]:
        a = _number(rng, rng.randint(1, 3))
        b = _number(rng, rng.randint(1, 3))
        return f"{a}+{b}=", str(a + b)

    def score(self, problem: Problem, completion_text: str) -> float:
        got = _clean(completion_text)
        if got == problem.answer:
            return 1.0
        if not got or not got.isascii() or not got.isdigit():
            return 0.0
        return FORMAT_CREDIT + PARTIAL_CREDIT * _positional(problem.answer, got, right_align=True)


class ReverseFamily(TaskFamily):
    """Reverse a short lowercase string, "rev:abcd=" → "dcba" (3–6 letters)."""

    name = "reverse"

    def _draw(self, rng: random.Random) -> tuple[str, str]:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))
        return f"rev:{word}=", word[::-1]

    def score(self, problem: Problem, completion_text: str) -> float:
        got = _clean(completion_text)
        if got == problem.answer:
            return 1.0
        if not got or not (got.isascii() and got.isalpha() and got.islower()):
            return 0.0
        return FORMAT_CREDIT + PARTIAL_CREDIT * _positional(problem.answer, got, right_align=False)


class CountFamily(TaskFamily):
    """Count a letter in a short string, "cnt:a:abca=" → "2" (letters from a small alphabet)."""

    name = "count"
    # A 4-letter alphabet makes counts of 0..8 all common, so the answer is not a constant guess.
    _ALPHABET = "abcd"

    def _draw(self, rng: random.Random) -> tuple[str, str]:
        word = "".join(rng.choice(self._ALPHABET) for _ in range(rng.randint(4, 10)))
        ch = rng.choice(self._ALPHABET)
        return f"cnt:{ch}:{word}=", str(word.count(ch))

    def score(self, problem: Problem, completion_text: str) -> float:
        got = _clean(completion_text)
        if got == problem.answer:
            return 1.0
        if not got or not got.isascii() or not got.isdigit() or len(got) > 3:
            return 0.0
        # Off by one earns more than a wild guess: a smooth signal for the counting skill.
        miss = abs(int(got) - int(problem.answer))
        return FORMAT_CREDIT + PARTIAL_CREDIT * max(0.0, 1.0 - miss / 3)


class ExactFamily(TaskFamily):
    """``base``'s questions (same stream, same held-out split), scored 1.0 exact / 0.0 otherwise."""

    def __init__(self, base: TaskFamily) -> None:
        self.base = base
        self.name = f"{base.name}-exact"
        self.space = base.problem_space

    def _draw(self, rng: random.Random) -> tuple[str, str]:
        return self.base._draw(rng)

    def score(self, problem: Problem, completion_text: str) -> float:
        return 1.0 if self.is_correct(problem, completion_text) else 0.0


def _number(rng: random.Random, digits: int) -> int:
    if digits == 1:
        return rng.randint(0, 9)
    return rng.randint(10 ** (digits - 1), 10**digits - 1)
