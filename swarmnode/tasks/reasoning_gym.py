"""Adapter for reasoning-gym datasets (optional extra: ``pip install 'swarmnode[tasks]'``).

reasoning-gym is imported lazily so the core runs without it. A dataset is built per seed with
``reasoning_gym.create_dataset(name, seed=..., size=...)``; problem ``index`` is entry ``index`` of the
dataset for ``seed``. The answer is scored by the dataset's own ``score_answer(answer, entry)``.
"""

from __future__ import annotations

import functools
import random
from typing import Any

from swarmnode.tasks.base import Problem, TaskFamily, _clean, is_heldout_prompt, stable_hash

INSTALL_HINT = "reasoning-gym is not installed; install the optional extra: pip install 'swarmnode[tasks]'"
# Entries per (dataset, seed): problem indices wrap modulo this size.
DATASET_SIZE = 1000


def _import_reasoning_gym() -> Any:
    try:
        import reasoning_gym
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    return reasoning_gym


class ReasoningGymFamily(TaskFamily):
    def __init__(self, dataset: str, *, size: int = DATASET_SIZE) -> None:
        if not dataset:
            raise ValueError("dataset must be a non-empty reasoning-gym dataset name")
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self._rg = _import_reasoning_gym()
        self.dataset = dataset
        self.size = size
        self.name = f"rg:{dataset}"
        self._entries: dict[str, dict[str, Any]] = {}
        self._load = functools.lru_cache(maxsize=8)(self._create)

    def _create(self, seed: int) -> Any:
        return self._rg.create_dataset(self.dataset, seed=seed, size=self.size)

    def _entry(self, seed: int, index: int) -> tuple[Any, dict[str, Any]]:
        data = self._load(seed)
        return data, data[index % self.size]

    def problem(self, seed: int, index: int) -> Problem:
        if not isinstance(seed, int) or not isinstance(index, int) or index < 0:
            raise ValueError(f"seed and index must be ints with index >= 0, got {seed!r}, {index!r}")
        # Held-out questions are skipped by moving to a derived index (deterministic, bounded).
        rng = random.Random(stable_hash(self.name, seed, index))
        probe = index
        for _ in range(64):
            _, entry = self._entry(seed, probe)
            prompt = str(entry["question"])
            if not is_heldout_prompt(self.name, prompt):
                self._entries[prompt] = entry
                return Problem(self.name, seed, index, prompt, str(entry["answer"]))
            probe = rng.randrange(1 << 30)
        raise RuntimeError(f"{self.name}: no training problem found for ({seed}, {index})")

    def heldout(self, n: int) -> list[Problem]:
        # A dedicated evaluation seed; only questions in the held-out bucket are used.
        seed = stable_hash(self.name, "heldout-stream") % (2**31)
        data = self._rg.create_dataset(self.dataset, seed=seed, size=max(self.size, 20 * n))
        out: list[Problem] = []
        for entry in data:
            prompt = str(entry["question"])
            if is_heldout_prompt(self.name, prompt) and prompt not in self._entries:
                self._entries[prompt] = entry
                out.append(Problem(self.name, -1, len(out), prompt, str(entry["answer"])))
                if len(out) == n:
                    return out
        raise ValueError(f"{self.name}: only {len(out)} held-out problems, asked for {n}")

    def score(self, problem: Problem, completion_text: str) -> float:
        entry = self._entries.get(problem.prompt) or {"question": problem.prompt, "answer": problem.answer}
        data = self._load(problem.seed if problem.seed >= 0 else 0)
        try:
            value = float(data.score_answer(_clean(completion_text), entry))
        except Exception:  # a third-party scorer must not crash the trainer on odd text
            return 0.0
        return min(1.0, max(0.0, value))

    def is_correct(self, problem: Problem, completion_text: str) -> bool:
        return self.score(problem, completion_text) >= 1.0
