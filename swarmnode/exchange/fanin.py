"""Bounded fan-in without a coordinator: who contributes to a round, who publishes DeMo components at
a step, and whom a puller fetches a blob from — all decided by hashing, so every member with the same
view of the cohort decides the same, and no node's traffic grows with the cohort.

- ``choose(seed, k, members)``: the ``k`` members whose hash of (seed, member) is smallest. A fresh
  seed every round (or step) rotates the choice, so every member is chosen about k/N of the time;
  nobody can pick it (the hash covers the round, which nobody chooses, and the member's peer id,
  which is fixed before the round is known). Members whose views differ by a peer that does not
  rank among the k smallest still agree: a newcomer or a dead peer moves the choice only where it
  ranks.
- ``relay_source(seed, author, me, pullers, branching)``: a ``branching``-ary tree over the pullers
  of one blob, in hash order, rooted at its author: the first ``branching`` pull from the author,
  each later one from its parent, which serves the blob as soon as its own pull finished (the blob
  server holds a request for a blob it is still pulling, ``streams.BlobStore``). Each member uploads
  each blob it holds to at most ``branching`` others: a round costs a member about (k + 1) x
  branching blobs up and k blobs down, whatever N; the depth is log_branching(N).

The DiLoCo exchange uses both when more members than ``RoundsConfig.merge_fanin`` are live; with
fewer, every member contributes and pulls from the author, as before.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

__all__ = ["choose", "rank", "relay_source", "seed_of"]


def seed_of(*parts: object) -> bytes:
    """A seed from the swarm, cohort, channel and round (or step): ``seed_of(swarm, cohort, "merge", r)``."""
    return hashlib.blake2b("\x1f".join(str(p) for p in parts).encode(), digest_size=16).digest()


def rank(seed: bytes, member: str) -> bytes:
    return hashlib.blake2b(member.encode(), key=seed, digest_size=16).digest()


def choose(seed: bytes, k: int, members: Iterable[str]) -> list[str]:
    """The ``k`` members (all of them when there are no more) with the smallest rank, sorted by id."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    unique = sorted(set(members))
    if len(unique) <= k:
        return unique
    return sorted(sorted(unique, key=lambda m: rank(seed, m))[:k])


def relay_source(seed: bytes, author: str, me: str, pullers: Iterable[str], branching: int) -> str:
    """Whom ``me`` pulls ``author``'s blob from: its parent in the blob's relay tree (see the module
    docstring), or the author. ``pullers`` are the members that pull it (``me`` among them)."""
    if branching < 1:
        raise ValueError(f"branching must be >= 1, got {branching}")
    order = sorted({p for p in pullers if p != author} | {me}, key=lambda p: rank(seed, p))
    i = order.index(me)
    return author if i < branching else order[i // branching - 1]
