"""DiLoCo catch-up for joiners over ``/swarmnode/state/1.0.0``, and the choice of whom to copy.

A late joiner asks a peer that advertises a newer round for the cohort's state. The request carries
the joiner's cohort fingerprint; the answer is a small state manifest (round, step, anchor hash, and
the sha256 of the state's *index*). The index (``compression.state``) lists the state's layout and
the sha256 of every 4 MiB chunk; chunks are pulled over the blob stream, each verified on arrival and
written to a staging file, then loaded tensor by tensor from a memory map. At 0.5 B parameters the
state is 4 GB: nothing ever holds it twice, a donor serves it straight out of its live tensors, and a
transfer whose donor dies resumes from the next donor of the same state with the chunks it has.
A peer can make us wait, never make us load bytes its index did not commit to, and the index must
match our own model's names, shapes and dtypes before a single chunk is pulled.

Whom to copy (``choose_source``, rules in ``swarmnode.trust``): not the newest round, nor the most
identities — those are free. A state is *attested* when peers in ``quorum`` distinct network groups
(IPv4 /24, IPv6 /48, by the remote address of our connection to them: ``exchange.addresses``), or
peers whose contributions we verified, advertise it; claims of a round or step that cannot be true
(``trust.check_claim``) are refused before anything is pulled, and checked again on the donor's
state manifest. An unattested state (a bootstrap-only joiner, one donor) is loaded only if the
caller can probe it (held-out reward, ``trust.accept_probe``) and rolled back if the probe fails.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from swarmnode.compression.state import (
    CHUNK,
    StateIndex,
    build_index,
    decode_index,
    encode_index,
    index_size,
    read_range,
    tensors_from_file,
)
from swarmnode.optim.diloco import hash_anchor
from swarmnode.protocol import StateManifest, codec
from swarmnode.protocol.topics import STATE_PROTOCOL
from swarmnode.trust import Choice, Offer, check_claim, choose_donor, choose_resync

__all__ = [
    "STATE_PROTOCOL",
    "CatchupError",
    "Decision",
    "Snapshot",
    "StateServer",
    "StateTransfer",
    "choose_source",
    "load_state_file",
    "request_manifest",
    "snapshot_of",
]

log = logging.getLogger(__name__)
# Chunk pulls in flight per transfer: enough to keep a link busy across request round trips.
PARALLEL_CHUNKS = 4


class CatchupError(RuntimeError):
    """The peer could not give us a usable state (wrong cohort, bad index, nothing to serve)."""


@dataclass(slots=True)
class Snapshot:
    round: int
    step: int
    anchor_hash: str
    tensors: Mapping[str, Any]  # the live anchor/momentum tensors the index was built from
    index: StateIndex


def snapshot_of(diloco: Any, *, round: int, step: int, chunk: int = CHUNK) -> Snapshot:
    """Hash the outer optimizer's state chunk by chunk (run it off the event loop: seconds at 0.5 B)."""
    tensors = diloco.state_tensors()
    index = build_index(tensors, diloco.scalars(), chunk=chunk)
    return Snapshot(round=round, step=step, anchor_hash=diloco.anchor_hash(), tensors=tensors, index=index)


class StateServer:
    """Serves the newest snapshot: its index as a blob, its chunks as views of the live tensors. The
    node refreshes it after every merge; a chunk read after the tensors moved fails its requester's
    hash check, and the requester asks again for the new snapshot."""

    def __init__(self, host: Any, cohort: str) -> None:
        self.host = host
        self.cohort = cohort
        self._snapshot: Snapshot | None = None
        self._served: list[str] = []
        self._index_hash = ""
        self._index_size = 0
        self.served = 0

    def update(self, snap: Snapshot) -> None:
        old = self._served
        index_bytes = encode_index(snap.index)
        served = [self.host.provide_blob(index_bytes)]
        for i, digest in enumerate(snap.index.chunks):
            lo, hi = snap.index.chunk_range(i)
            read = _chunk_reader(snap.tensors, snap.index, lo)
            self.host.provide_view(digest.hex(), hi - lo, read)
            served.append(digest.hex())
        self._index_hash, self._index_size = served[0], len(index_bytes)
        self._snapshot, self._served = snap, served
        for h in set(old) - set(served):
            self.host.remove_blob(h)

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
            content_hash=self._index_hash,
            size=self._index_size,
            anchor_hash=snap.anchor_hash,
        )
        return codec.encode(manifest)


def _chunk_reader(tensors: Mapping[str, Any], index: StateIndex, base: int) -> Callable[[int, int], bytes]:
    return lambda start, end: read_range(tensors, index, base + start, base + end)


def expected_layout(diloco: Any) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{state key: (dtype, shape)} a state for our model may contain (anchor required, momentum
    optional): a donor's index must fit it before any chunk is pulled."""
    out = {}
    for name, shape in diloco.shapes().items():
        out[f"anchor.{name}"] = ("float32", tuple(shape))
        out[f"momentum.{name}"] = ("float32", tuple(shape))
    return out


async def request_manifest(host: Any, cohort: str, donor: str) -> StateManifest:
    """The donor's current state manifest (round, step, anchor hash, index hash): one small request."""
    answer = await host.request(donor, STATE_PROTOCOL, cohort.encode("ascii"))
    if not answer:
        raise CatchupError(f"peer {donor} has no state for cohort {cohort[:12]}")
    manifest = codec.decode(answer)
    if not isinstance(manifest, StateManifest) or manifest.cohort != cohort:
        raise CatchupError(f"peer {donor} answered with a state for another cohort")
    return manifest


class StateTransfer:
    """One joiner's pull of a cohort state into ``path``, resumable across donors.

    ``pull(donor)`` fetches that donor's manifest and index, checks the index against ``layout``
    (our model), then pulls every chunk it does not hold yet (chunks already verified at the same
    position with the same digest are kept: a transfer that lost its donor continues with the next
    donor of the same state). Every chunk is verified by the host against the index's digest.
    """

    def __init__(
        self, host: Any, cohort: str, path: Path, layout: Mapping[str, tuple[str, tuple[int, ...]]]
    ) -> None:
        self.host = host
        self.cohort = cohort
        self.path = path
        self.layout = dict(layout)
        shapes = {k: s for k, (_, s) in self.layout.items()}
        self.max_total, self.max_index = index_size(shapes)
        self._have: dict[int, bytes] = {}  # chunk position -> digest written there
        self.bytes_pulled = 0
        self.chunks_kept = 0

    async def pull(
        self, donor: str, check: Callable[[StateManifest], None] | None = None
    ) -> tuple[Any, StateIndex]:
        """``check(manifest)`` may refuse the donor's state (raise) before its index is fetched."""
        manifest = await request_manifest(self.host, self.cohort, donor)
        if check is not None:
            check(manifest)
        if manifest.size > self.max_index:
            raise CatchupError(
                f"peer {donor} offers a {manifest.size}-byte state index, over {self.max_index}"
            )
        raw = await self.host.fetch(manifest.content_hash, [donor], max_size=int(manifest.size))
        index = decode_index(raw, max_bytes=self.max_index, max_total=self.max_total)
        self._check_layout(index, donor)
        self._prepare(index)
        todo = [i for i in range(len(index.chunks)) if self._have.get(i) != index.chunks[i]]
        self.chunks_kept = len(index.chunks) - len(todo)
        sem = asyncio.Semaphore(PARALLEL_CHUNKS)
        failures: list[str] = []

        async def one(i: int) -> None:
            # A failed chunk does not cancel the others: what arrives is kept for the next donor.
            async with sem:
                if failures:
                    return  # this donor is failing: leave the rest to the next one
                lo, hi = index.chunk_range(i)
                try:
                    data = await self.host.fetch(index.chunks[i].hex(), [donor], max_size=hi - lo)
                    if len(data) != hi - lo:
                        raise CatchupError(f"chunk {i} has {len(data)} bytes, expected {hi - lo}")
                except Exception as exc:
                    failures.append(f"chunk {i}: {type(exc).__name__}: {exc}"[:200])
                    return
                await asyncio.to_thread(self._write, lo, data)
                self._have[i] = index.chunks[i]
                self.bytes_pulled += len(data)

        await asyncio.gather(*(one(i) for i in todo))
        if failures:
            raise CatchupError(f"state from {donor}: {failures[0]} ({len(failures)} chunk pulls failed)")
        return manifest, index

    def _check_layout(self, index: StateIndex, donor: str) -> None:
        names = {e.name for e in index.tensors}
        missing = sorted(k for k in self.layout if k.startswith("anchor.") and k not in names)
        if missing:
            raise CatchupError(f"state from {donor} lacks {missing[:3]}")
        for e in index.tensors:
            want = self.layout.get(e.name)
            if want is None or want != (e.dtype, e.shape):
                raise CatchupError(
                    f"state from {donor}: {e.name} is {e.dtype}{list(e.shape)}, our model needs {want}"
                )

    def _prepare(self, index: StateIndex) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists() or self.path.stat().st_size != index.total:
            self._have.clear()  # another layout: nothing we hold is at the right place
            with open(self.path, "ab") as f:
                f.truncate(index.total)

    def _write(self, offset: int, data: bytes) -> None:
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)

    def discard(self) -> None:
        self._have.clear()
        self.path.unlink(missing_ok=True)


def load_state_file(diloco: Any, path: Path, index: StateIndex, *, anchor_hash: str) -> None:
    """Load a verified state stream from disk if its anchor is the one the donor announced; the
    optimizer checks names, shapes and finiteness of every tensor before changing any."""
    state: dict[str, Any] = dict(tensors_from_file(path, index))
    got = hash_anchor({k[len("anchor.") :]: v for k, v in state.items() if k.startswith("anchor.")})
    if got != anchor_hash:
        raise CatchupError(f"the state's anchor hashes to {got[:12]}, its manifest says {anchor_hash[:12]}")
    state.update(index.scalars)
    diloco.load_state_dict(state, reset_local=True)


@dataclass(frozen=True, slots=True)
class Decision:
    """What ``choose_source`` decided: the state to load, whether it is a re-sync at our own round
    (``heal``) or a catch-up to a newer one, and every peer whose offer would do for it
    (``candidates``, in ``trust``'s donor order): whom to ask for their current state manifest
    when the presences (seconds old) do not attest one state."""

    choice: Choice
    heal: bool
    candidates: tuple[str, ...]
    min_round: int  # the oldest round that is still a catch-up (heal: our own)


def choose_source(
    peers: Mapping[str, Any],
    live: Collection[str],
    addresses: Mapping[str, str],
    *,
    cohort: str,
    my_round: int,
    my_step: int,
    my_anchor: str,
    fresh: bool,
    merged: bool,
    max_round: int,
    max_steps_per_round: int,
    min_steps_per_round: int = 0,
    verified: Collection[str] = (),
    quorum: int = 2,
    refused: Callable[[str, str, str], None] = lambda kind, peer, why: None,
) -> Decision | None:
    """The state to load (``swarmnode.trust`` rules), or None to carry on.

    ``peers`` are presences (an observer, which just loaded its state, offers nothing); offers
    from live cohort peers whose (round, step) fails
    ``trust.check_claim`` are dropped and reported as ``refused("claim", peer, why)``. A fresh node,
    or one two or more rounds behind, catches up to the newest *attested* newer state (support from
    ``quorum`` distinct network groups, or verified peers). When the cohort's state at or past our
    round is attested and not that far ahead, newer unattested offers (Sybils claiming a newer
    round) are not even pulled: ``refused("unattested", ...)``. When nothing is attested, the best
    unattested newer state is returned (``choice.attested`` False): the caller must re-attest it or
    probe it before loading. A replica that merged and whose anchor lost the re-sync vote
    (``trust.choose_resync``) re-syncs (again attested, or only after a probe). Identities count
    for nothing: 4 Sybils from one /24 count as one group.
    """
    alive = set(live)
    offers: list[Offer] = []
    undecided = 0  # live cohort peers a round behind us: which anchor they land on is not known yet
    for peer, presence in peers.items():
        if presence is None or peer not in alive or getattr(presence, "cohort", None) != cohort:
            continue
        if getattr(presence, "status", "active") == "observing":
            continue  # it just copied its state from someone: an echo, not a second witness
        anchor = getattr(presence, "anchor_hash", "")
        rnd, step = getattr(presence, "round", -1), getattr(presence, "step", -1)
        if isinstance(rnd, int) and not isinstance(rnd, bool) and rnd == my_round - 1:
            undecided += 1
        if not isinstance(anchor, str) or not anchor or not isinstance(rnd, int) or rnd < my_round:
            continue
        why = check_claim(
            rnd,
            step,
            my_round=my_round,
            my_step=my_step,
            max_round=max_round,
            max_steps_per_round=max_steps_per_round,
            min_steps_per_round=min_steps_per_round,
        )
        if why is not None:
            refused("claim", peer, why)
            continue
        offers.append(Offer(peer, rnd, int(step), anchor))

    # one round behind is ordinary skew and merges normally
    min_round = my_round + 1 if fresh else my_round + 2
    kw: dict[str, Any] = {"verified": verified, "quorum": quorum, "max_round": max_round}
    ahead = [o for o in offers if o.round >= min_round]
    near = choose_donor(offers, addresses, my_round=my_round, **kw)
    far = choose_donor(ahead, addresses, my_round=min_round, **kw)
    if near is not None and near.attested and near.round < min_round:
        if far is not None:  # newer than what the cohort attests: not even pulled
            refused(
                "unattested",
                far.donors[0],
                f"round {far.round} anchor {far.anchor_hash[:12]}: support {far.support} < quorum "
                f"{quorum}, while round {near.round} is attested",
            )
    elif far is not None:
        everyone = choose_donor(
            [Offer(o.peer, min_round, o.step, "any") for o in ahead], addresses, my_round=min_round, **kw
        )
        candidates = everyone.donors if everyone is not None else far.donors
        return Decision(far, heal=False, candidates=candidates, min_round=min_round)
    if merged:
        resync = choose_resync(
            offers,
            addresses,
            verified=verified,
            my_round=my_round,
            my_anchor=my_anchor,
            quorum=quorum,
            undecided=undecided,
        )
        if resync is not None:
            return Decision(resync, heal=True, candidates=resync.donors, min_round=my_round)
    return None
