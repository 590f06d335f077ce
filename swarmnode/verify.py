"""Verification of rollouts shared by peers (SAPO): nothing a peer claims reaches the loss unchecked.

The receiver regenerates each problem from its task reference (family, seed, index) and re-scores every
completion itself; the sender's reward is ignored, so a forged "correct" claim on a wrong answer earns
exactly what the answer deserves. Whole groups are rejected (never single completions, which would bias
the group's advantage baseline) and every rejection is counted by reason.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Callable
from typing import Any

from swarmnode.trainer import Group

# Completions of the verifiable tasks we train on are short; a peer sending kilobytes per answer is
# either broken or trying to make us spend compute re-tokenising and back-propagating through junk.
DEFAULT_MAX_TEXT_BYTES = 2048
# Training problems are indexed from 0 within a seed; a node asks for at most a few hundred per step.
DEFAULT_MAX_INDEX = 1 << 20
# How many held-out problems to compare prompts against when the family has no is_heldout() of its own.
HELDOUT_CHECK_N = 1000

REASONS = (
    "unknown_family",
    "bad_task_ref",
    "heldout_problem",
    "oversized_text",
    "wrong_group_size",
    "non_finite",
    "duplicate_group",
)


@functools.lru_cache(maxsize=32)
def _heldout_prompts(family: str) -> frozenset[str]:
    from swarmnode.tasks import heldout_problems

    return frozenset(p.prompt for p in heldout_problems(family, HELDOUT_CHECK_N))


def default_is_heldout(family: Any, problem: Any) -> bool:
    check = getattr(family, "is_heldout", None)
    if callable(check):
        return bool(check(problem))
    return problem.prompt in _heldout_prompts(family.name)


def _default_get_family(name: str) -> Any:
    from swarmnode.tasks import get_family

    return get_family(name)


def verify_external(
    batch: Any,
    tokenizer: Any = None,
    *,
    local_fingerprint: str = "",
    group_size: int | None = None,
    max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES,
    max_index: int = DEFAULT_MAX_INDEX,
    get_family: Callable[[str], Any] | None = None,
    is_heldout: Callable[[Any, Any], bool] | None = None,
    arrival_step: int | None = None,
) -> tuple[list[Group], Counter[str]]:
    """Groups fit for training from a decoded ``RolloutBatch``, and a Counter of rejection reasons.

    Each group carries the token ids to train on: the local tokenisation of each completion's text
    followed by EOS (completions are whole answers: the sender stopped there). Only when the batch comes
    from our cohort and the sender's ids are exactly that (with or without its EOS) are its ids and
    logprobs kept, the logprobs for the trainer's truncated importance weight.
    ``arrival_step`` (our step on receipt) stamps the groups for the staleness bound: peers' step
    counters are not comparable with ours; the sender's step is kept in ``meta``.
    """
    lookup = get_family or _default_get_family
    heldout = is_heldout or default_is_heldout
    same_cohort = bool(local_fingerprint) and batch.cohort == local_fingerprint
    groups: list[Group] = []
    rejects: Counter[str] = Counter()
    seen: set[tuple[str, int, int]] = set()
    for rg in batch.groups:
        ref = rg.task
        try:
            family = lookup(ref.family)
        except (KeyError, ValueError):
            rejects["unknown_family"] += 1
            continue
        if not 0 <= ref.index < max_index:
            rejects["bad_task_ref"] += 1
            continue
        key = (ref.family, ref.seed, ref.index)
        if key in seen:  # the same problem twice in one batch would double its weight in our loss
            rejects["duplicate_group"] += 1
            continue
        try:
            problem = family.problem(ref.seed, ref.index)
        except (ValueError, IndexError, OverflowError):  # e.g. a seed reserved for evaluation
            rejects["bad_task_ref"] += 1
            continue
        if heldout(family, problem):
            rejects["heldout_problem"] += 1
            continue
        completions = list(rg.completions)
        if group_size is not None and len(completions) != group_size:
            rejects["wrong_group_size"] += 1
            continue
        if len(completions) < 2:
            rejects["wrong_group_size"] += 1
            continue
        if any(len(c.text.encode("utf-8", "surrogatepass")) > max_text_bytes for c in completions):
            rejects["oversized_text"] += 1
            continue
        if any(not math.isfinite(c.reward) or not all(map(math.isfinite, c.logprobs)) for c in completions):
            rejects["non_finite"] += 1
            continue
        seen.add(key)
        rewards = [float(family.score(problem, c.text)) for c in completions]
        ids, sender_logprobs = _completion_ids(completions, tokenizer, same_cohort)
        groups.append(
            Group(
                problem=problem,
                samples=completions,
                rewards=rewards,
                source=batch.author,
                policy_step=batch.policy_step if arrival_step is None else arrival_step,
                sender_logprobs=sender_logprobs,
                completion_ids=ids,
                meta={"claimed_rewards": [c.reward for c in completions], "sender_step": batch.policy_step},
            )
        )
    return groups, rejects


def _completion_ids(
    completions: list[Any], tokenizer: Any, same_cohort: bool
) -> tuple[list[list[int]] | None, list[list[float]] | None]:
    """(token ids to train on, sender logprobs or None) for one group's completions."""
    if tokenizer is None:
        return None, None
    eos = getattr(tokenizer, "eos_token_id", None)
    tail = [int(eos)] if isinstance(eos, int) else []
    encoded = [list(tokenizer.encode(c.text, add_special_tokens=False)) for c in completions]
    if same_cohort and all(c.logprobs for c in completions):
        claimed = [list(c.token_ids) for c in completions]
        if all(
            (ids == enc or ids == enc + tail) and len(c.logprobs) == len(ids)
            for ids, enc, c in zip(claimed, encoded, completions, strict=True)
        ):
            return claimed, [list(c.logprobs) for c in completions]
    return [enc + tail for enc in encoded], None
