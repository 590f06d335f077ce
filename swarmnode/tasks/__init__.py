"""Verifiable task families: a registry of procedural problem generators with local scoring."""

from __future__ import annotations

from swarmnode.tasks.base import Problem, TaskFamily, is_heldout_prompt, stable_hash
from swarmnode.tasks.builtin import AddFamily, CountFamily, ExactFamily, ReverseFamily

_REGISTRY: dict[str, TaskFamily] = {}


def register(family: TaskFamily, *, replace: bool = False) -> TaskFamily:
    if not family.name:
        raise ValueError("family.name must be a non-empty string")
    if family.name in _REGISTRY and not replace:
        raise ValueError(f"task family {family.name!r} is already registered")
    _REGISTRY[family.name] = family
    return family


def get_family(name: str) -> TaskFamily:
    """The family called ``name``; ``rg:<dataset>`` builds a reasoning-gym adapter (optional extra)."""
    family = _REGISTRY.get(name)
    if family is not None:
        return family
    if isinstance(name, str) and name.startswith("rg:"):
        from swarmnode.tasks.reasoning_gym import ReasoningGymFamily

        return register(ReasoningGymFamily(name.removeprefix("rg:")))
    raise KeyError(f"unknown task family {name!r}; known: {', '.join(families())}")


def families() -> list[str]:
    return sorted(_REGISTRY)


def heldout_problems(family: str, n: int) -> list[Problem]:
    """The fixed evaluation set of ``family``: disjoint by content from every training problem."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return get_family(family).heldout(n)


for _family in (AddFamily(), ReverseFamily(), CountFamily()):
    register(_family)
    register(ExactFamily(_family))

__all__ = [
    "Problem",
    "TaskFamily",
    "families",
    "get_family",
    "heldout_problems",
    "is_heldout_prompt",
    "register",
    "stable_hash",
]
