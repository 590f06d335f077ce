"""Collecting one DiLoCo round's contributions: manifests in, blobs pulled, bounded by a deadline.

Manifests count until every expected cohort peer has published or the deadline passes. Each blob is
pulled as soon as its manifest arrives, so waiting for a peer that never publishes does not eat the
time to fetch the ones that did; every pull is bounded by the same deadline, and a slow or dead
peer is simply left out of the round.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

log = logging.getLogger(__name__)

# What a pull yields (the DiLoCo exchange: blob, weight, norm); collection only passes it on.
C = TypeVar("C")
# Open rounds (besides the one collecting) an author may hold manifests in.
MAX_ROUNDS_PER_AUTHOR = 2
# A deadline closer than this has passed: below the event loop's clock resolution a timer fires at
# once without time moving, and waiting on it would spin.
CLOCK_EPSILON_S = 1e-6


@dataclass(slots=True)
class Inbox:
    manifests: dict[str, Any] = field(default_factory=dict)  # author -> manifest
    arrived: asyncio.Event = field(default_factory=asyncio.Event)


def admit(inboxes: dict[int, Inbox], author: str, rnd: int, manifest: Any, *, keep: int | None) -> None:
    """File ``author``'s manifest for round ``rnd``. An honest author has at most two rounds open
    (the one collecting, the next): its newer manifest supersedes its oldest, so no author holds more
    (fake future rounds included), and a joiner that has not merged yet keeps following the cohort's
    newest rounds. Round ``keep`` (the one being collected) is never evicted."""
    mine = sorted(r for r, box in inboxes.items() if author in box.manifests and r != keep)
    if rnd not in mine and len(mine) >= MAX_ROUNDS_PER_AUTHOR:
        if rnd < mine[0]:
            raise ValueError(f"round {rnd}: older than this author's {MAX_ROUNDS_PER_AUTHOR} open rounds")
        box = inboxes[mine[0]]
        del box.manifests[author]
        if not box.manifests:
            del inboxes[mine[0]]
    inbox = inboxes.setdefault(rnd, Inbox())
    inbox.manifests[author] = manifest
    inbox.arrived.set()


async def collect_round(
    inbox: Inbox,
    *,
    expected: Callable[[], list[str]],
    fetch: Callable[[Any], Coroutine[Any, Any, C | None]],
    deadline: Callable[[], float],
    clock: Callable[[], float],
    accept: Callable[[str], bool] = lambda author: True,
) -> dict[str, C]:
    """{author: (Δ, weight)} of the contributions that arrived in time; ``fetch`` never raises (it
    returns None for a failed pull), so one bad peer cannot cancel the others' pulls. ``deadline``
    is read again as the round goes (a step round's window grows with the cohort's measured step
    times). Manifests of authors ``accept`` refuses (not chosen to contribute) are not pulled."""
    fetches: dict[str, asyncio.Task[C | None]] = {}
    try:
        async with asyncio.TaskGroup() as pulls:
            try:
                while True:
                    for author, manifest in inbox.manifests.items():
                        if author not in fetches and accept(author):
                            fetches[author] = pulls.create_task(fetch(manifest))
                    if set(expected()) <= set(inbox.manifests):
                        break
                    remaining = deadline() - clock()
                    if remaining <= CLOCK_EPSILON_S:
                        break
                    inbox.arrived.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(inbox.arrived.wait(), timeout=min(remaining, 0.25))
                while fetches and not all(t.done() for t in fetches.values()):
                    left = deadline() - clock()
                    if left <= CLOCK_EPSILON_S:
                        break
                    await asyncio.wait(fetches.values(), timeout=min(left, 1.0))
            finally:
                for task in fetches.values():  # a slow or dead peer is left out of this round
                    task.cancel()
    except Exception as exc:  # fetch never raises: only a bug can get here
        log.warning("round collection: %r", exc)
    out: dict[str, C] = {}
    for author, task in fetches.items():
        result = None if task.cancelled() or task.exception() is not None else task.result()
        if result is not None:
            out[author] = result
    return out
