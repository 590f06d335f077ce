"""DiLoCo catch-up for joiners over ``/swarmnode/state/1.0.0``, and the choice of whom to copy.

A late joiner asks a peer that advertises a newer round for the cohort's state. The request carries
the joiner's cohort fingerprint; the answer is a small state manifest (round, step, content hash,
size, anchor hash). The state itself (weights + DiLoCo outer state) is served as a content-addressed
blob and pulled over the blob stream, then hash-checked before anything is loaded: a peer can make
us wait, never make us load bytes it did not announce.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from swarmnode.compression.state import decode_state, encode_state
from swarmnode.protocol import StateManifest, codec
from swarmnode.protocol.topics import STATE_PROTOCOL

__all__ = [
    "STATE_PROTOCOL",
    "CatchupError",
    "Snapshot",
    "StateServer",
    "choose_source",
    "fetch_state",
    "load_state",
    "state_blob",
]

log = logging.getLogger(__name__)


class CatchupError(RuntimeError):
    """The peer could not give us a usable state (wrong cohort, hash mismatch, nothing to serve)."""


def state_blob(diloco: Any) -> tuple[str, bytes]:
    """(anchor hash, encoded state) of a ``DiLoCo`` outer optimizer: what a joiner loads."""
    state = diloco.state_dict()
    tensors = {k: v for k, v in state.items() if hasattr(v, "shape")}
    scalars = {k: v for k, v in state.items() if not hasattr(v, "shape")}
    return diloco.anchor_hash(), encode_state(tensors, scalars)


def load_state(diloco: Any, blob: bytes, *, max_bytes: int) -> None:
    """Decode a peer's state and load it; the optimizer checks names, shapes and finiteness first."""
    diloco.load_state_dict(decode_state(blob, max_bytes=max_bytes), reset_local=True)


@dataclass(slots=True)
class Snapshot:
    round: int
    step: int
    anchor_hash: str
    blob: bytes


class StateServer:
    """Serves the newest snapshot; the node refreshes it after every merge (blob kept until replaced,
    so a joiner fetching while we merge still gets a consistent state)."""

    def __init__(self, host: Any, cohort: str) -> None:
        self.host = host
        self.cohort = cohort
        self._snapshot: Snapshot | None = None
        self._hash = ""
        self.served = 0

    def update(self, snapshot: Snapshot) -> None:
        old = self._hash
        self._hash = self.host.provide_blob(snapshot.blob)
        self._snapshot = snapshot
        if old and old != self._hash:
            self.host.remove_blob(old)

    async def handle(self, peer_id: Any, data: bytes) -> bytes:
        cohort = data.decode("ascii", errors="replace")
        snap = self._snapshot
        if snap is None or cohort != self.cohort:
            # An empty answer is "nothing for you": the joiner tries another peer.
            return b""
        self.served += 1
        manifest = StateManifest(
            cohort=self.cohort,
            round=snap.round,
            step=snap.step,
            content_hash=self._hash,
            size=len(snap.blob),
            anchor_hash=snap.anchor_hash,
        )
        return codec.encode(manifest)


async def fetch_state(host: Any, peer_id: Any, cohort: str, *, max_bytes: int) -> tuple[Any, bytes]:
    """(state manifest, verified blob) from ``peer_id``; raises ``CatchupError``."""
    answer = await host.request(peer_id, STATE_PROTOCOL, cohort.encode("ascii"))
    if not answer:
        raise CatchupError(f"peer {peer_id} has no state for cohort {cohort[:12]}")
    manifest = codec.decode(answer)
    if not isinstance(manifest, StateManifest) or manifest.cohort != cohort:
        raise CatchupError(f"peer {peer_id} answered with a state for another cohort")
    if manifest.size > max_bytes:
        raise CatchupError(f"peer {peer_id} offers a {manifest.size}-byte state, over {max_bytes}")
    blob = await host.fetch(manifest.content_hash, [peer_id], max_size=manifest.size)
    if hashlib.sha256(blob).hexdigest() != manifest.content_hash or len(blob) != manifest.size:
        raise CatchupError(f"state from {peer_id} does not match its manifest hash")
    return manifest, blob


def pick_source(
    peers: dict[str, Any], my_round: int, cohort: str, is_live: Callable[[str], bool]
) -> str | None:
    """The live cohort peer advertising the newest round ahead of ours (ties: lowest id, deterministic)."""
    best: tuple[int, str] | None = None
    for peer, presence in peers.items():
        if presence is None or getattr(presence, "cohort", None) != cohort or not is_live(peer):
            continue
        rnd = int(getattr(presence, "round", 0))
        if rnd > my_round and (best is None or (-rnd, peer) < (-best[0], best[1])):
            best = (rnd, peer)
    return None if best is None else best[1]


def pick_majority_anchor(
    peers: dict[str, Any], my_round: int, my_anchor: str, cohort: str, is_live: Callable[[str], bool]
) -> tuple[str, str] | None:
    """(peer to copy from, anchor hash) when this node's anchor lost the vote among cohort peers that
    report the same round; None when ours is the winner.

    Replicas diverge when they merged different sets of pseudo-gradients (one missed a manifest). The
    rule is the same everywhere — most holders wins, ties go to the smallest hash — so every replica
    converges on one anchor without coordination.
    """
    holders: dict[str, list[str]] = {my_anchor: []}
    for peer, presence in peers.items():
        if presence is None or getattr(presence, "cohort", None) != cohort or not is_live(peer):
            continue
        if int(getattr(presence, "round", -1)) != my_round or not getattr(presence, "anchor_hash", ""):
            continue
        holders.setdefault(presence.anchor_hash, []).append(peer)
    counts = {h: len(p) + (1 if h == my_anchor else 0) for h, p in holders.items()}
    winner = min(counts, key=lambda h: (-counts[h], h))
    if winner == my_anchor:
        return None
    return sorted(holders[winner])[0], winner


def choose_source(
    peers: dict[str, Any],
    live: set[str],
    *,
    cohort: str,
    my_round: int,
    my_step: int,
    merged: bool,
    my_anchor: str,
) -> tuple[str, str] | None:
    """(peer, anchor hash to expect or "") to load state from, or None to carry on.

    A fresh node, or one two or more rounds behind, loads from the peer with the newest round (one
    round behind is ordinary skew and merges normally); a replica whose anchor lost the majority
    vote after a merge re-syncs to the winner.
    """
    source = pick_source(peers, my_round, cohort, live.__contains__)
    if source is not None:
        fresh = my_step == 0 and my_round == 0
        if fresh or int(peers[source].round) >= my_round + 2:
            return source, ""
    if merged:
        return pick_majority_anchor(peers, my_round, my_anchor, cohort, live.__contains__)
    return None
