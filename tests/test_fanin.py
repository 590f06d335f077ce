"""Bounded fan-in: a rotating choice of contributors per DiLoCo round (``merge_fanin``) pulled through
relay trees, and a rotating choice of DeMo publishers per step (``max_publishers``); the hashing in
``swarmnode.exchange.fanin`` and the blob server that holds a relay child until its parent has it."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
import torch
import trio
from fakes import COHORT_A, SWARM, Bus, FakeClock, run, settle
from test_exchange_demo import make as make_demo
from test_exchange_demo import running as running_demo
from test_exchange_diloco import Peer, make, running, train

from swarmnode.exchange.fanin import choose, relay_source, seed_of
from swarmnode.p2p.streams import BlobStats, BlobStore

NAMES = [f"peer{a}{b}" for a in "ABCDE" for b in "ABCDEFGH"]  # base58, as peer ids are


def test_choose_rotates_evenly_and_agrees_across_views_that_differ_outside_the_choice() -> None:
    counts: Counter[str] = Counter()
    for r in range(400):
        chosen = choose(seed_of("s", "c", "merge", r), 8, NAMES)
        assert len(chosen) == 8
        assert chosen == sorted(set(chosen))
        counts.update(chosen)
    # every member is chosen about k/N = 1/5 of the rounds (80 of 400)
    assert len(counts) == len(NAMES)
    assert min(counts.values()) > 40
    assert max(counts.values()) < 120
    # a member that is not chosen, missing from one view, changes nothing
    seed = seed_of("s", "c", "merge", 7)
    chosen = choose(seed, 8, NAMES)
    outsider = next(n for n in NAMES if n not in chosen)
    assert choose(seed, 8, [n for n in NAMES if n != outsider]) == chosen
    assert choose(seed, 50, NAMES[:5]) == NAMES[:5]  # fewer members than k: all of them
    with pytest.raises(ValueError, match="k must be"):
        choose(seed, 0, NAMES)


def test_relay_trees_bound_each_member_s_uploads_by_the_branching() -> None:
    members = NAMES[:32]
    for branching in (1, 2, 4):
        for author in members[:4]:
            seed = seed_of("s", "c", "relay", 3, author)
            parents = {m: relay_source(seed, author, m, members, branching) for m in members if m != author}
            children = Counter(parents.values())
            assert max(children.values()) <= branching  # nobody serves a blob more than `branching` times
            assert children[author] == branching
            for m in parents:  # every puller reaches the author, in log_branching(N) hops
                hops, at = 0, m
                while at != author:
                    at, hops = parents[at], hops + 1
                    assert hops <= 31
                if branching > 1:
                    assert hops <= 6
    with pytest.raises(ValueError, match="branching"):
        relay_source(b"x" * 16, "a", "b", ["a", "b"], 0)


def test_the_blob_server_holds_a_request_for_a_blob_it_is_still_pulling() -> None:
    store = BlobStore(BlobStats())
    data = b"relayed pseudo-gradient" * 100
    digest = __import__("hashlib").sha256(data).hexdigest()

    async def main() -> tuple[bytes | None, bytes | None, float]:
        store.expect(digest, trio.current_time() + 30.0 if False else __import__("time").monotonic() + 30.0)
        got: list[object] = []

        async def ask() -> None:
            got.append(await store._lookup(digest))

        async with trio.open_nursery() as n:
            n.start_soon(ask)
            await trio.sleep(0.3)
            assert not got  # held: the blob is not here yet
            store.provide(data)
        t0 = trio.current_time()
        unknown = await store._lookup("0" * 64)  # neither held nor pulled: refused at once
        return got[0], unknown, trio.current_time() - t0  # type: ignore[return-value]

    held, unknown, waited = trio.run(main)
    assert held == data
    assert store.stats.held_requests == 1
    assert unknown is None
    assert waited < 0.1

    async def gives_up() -> object:
        store.expect("1" * 64, __import__("time").monotonic() + 0.2)  # our pull's deadline
        return await store._lookup("1" * 64)

    assert trio.run(gives_up) is None


def _fanin_cohort(n: int, k: int, clock: FakeClock) -> tuple[Bus, list[Peer]]:
    bus = Bus()
    peers = [
        make(bus, name, clock, drift=0.05 * (i + 1), merge_fanin=k, relay_branching=2)
        for i, name in enumerate(NAMES[:n])
    ]
    return bus, peers


def test_a_round_merges_only_the_chosen_contributors_through_relay_trees_and_anchors_agree() -> None:
    clock = FakeClock()
    _, peers = _fanin_cohort(7, 3, clock)
    names = [p.name for p in peers]
    chosen = choose(seed_of(SWARM, COHORT_A, "merge", 1), 3, names)
    before: dict[str, torch.Tensor] = {}

    async def body() -> None:
        await asyncio.gather(*(train(p, 3) for p in peers))  # round 1 ends at step 3
        for p in peers:
            before[p.name] = p.w()
        await asyncio.gather(*(p.ex.drain() for p in peers))

    run(running(peers, body()), clock)
    anchors = {p.ex.anchor_hash for p in peers}
    assert len(anchors) == 1  # one anchor for the whole cohort: everyone merged the same three Δs
    anchor = peers[0].ex.diloco.anchor["w"].clone()
    for p in peers:
        s = p.ex.statistics()
        assert (s["round"], s["merge_contributors"], s["diloco_incomplete_rounds"]) == (1, 3, 0)
        assert s["diloco_chosen_last"] == (p.name in chosen)
        assert s["diloco_sat_out"] == (0 if p.name in chosen else 1)
        assert s["diloco_relay_fallbacks"] == 0
        if p.name in chosen:  # its Δ is in the anchor: it sits on it
            assert torch.allclose(p.w(), anchor)
        else:  # not chosen: it keeps everything it trained since the old anchor (zeros), on the new one
            assert torch.allclose(p.w(), anchor + before[p.name], atol=1e-6)
        # it pulled the chosen contributors' blobs only: 3, or 2 besides its own (plus their manifests)
        pulled = (2 if p.name in chosen else 3) * max(q.ex.delta_bytes for q in peers)
        assert pulled < s["diloco/bytes_received"] < pulled + 3 * 400
    # each chosen blob was served by its author to `relay_branching` pullers, the rest by relays
    for p in peers:
        if p.name in chosen:
            digest = p.ex._served_blob
            assert p.host.served[digest] == 2
            assert sum(q.host.served.get(digest, 0) for q in peers) == len(peers) - 1
        assert max(p.host.served.values(), default=0) <= 2


def test_a_member_not_chosen_for_rounds_contributes_its_whole_progress_when_chosen() -> None:
    clock = FakeClock()
    _, peers = _fanin_cohort(5, 2, clock)
    names = [p.name for p in peers]
    rounds = 6
    sat = Counter(
        n
        for r in range(1, rounds + 1)
        for n in names
        if n not in choose(seed_of(SWARM, COHORT_A, "merge", r), 2, names)
    )

    async def body() -> None:
        await asyncio.gather(*(train(p, 3 * rounds) for p in peers))
        await asyncio.gather(*(p.ex.drain() for p in peers))

    run(running(peers, body()), clock)
    assert len({p.ex.anchor_hash for p in peers}) == 1
    for p in peers:
        s = p.ex.statistics()
        assert s["round"] == rounds
        assert s["merges"] == rounds
        assert s["diloco_incomplete_rounds"] == 0
        assert s["diloco_sat_out"] == sat[p.name]
    # a contribution's averaging weight is the samples trained since it last contributed
    last = choose(seed_of(SWARM, COHORT_A, "merge", rounds), 2, names)
    for name in last:
        p = next(q for q in peers if q.name == name)
        streak = 0
        for r in range(rounds - 1, 0, -1):
            if name in choose(seed_of(SWARM, COHORT_A, "merge", r), 2, names):
                break
            streak += 1
        assert p.ex.published_weight == 3 * 2 * (streak + 1)


def test_with_no_more_members_than_the_fanin_everyone_contributes_and_pulls_from_the_author() -> None:
    clock = FakeClock()
    _, peers = _fanin_cohort(4, 4, clock)

    async def body() -> None:
        await asyncio.gather(*(train(p, 3) for p in peers))
        await asyncio.gather(*(p.ex.drain() for p in peers))

    run(running(peers, body()), clock)
    for p in peers:
        s = p.ex.statistics()
        assert (s["merge_contributors"], s["diloco_sat_out"], s["diloco_relay_pulls"]) == (4, 0, 0)
        assert p.host.served[p.ex._served_blob] == 3


def test_demo_components_come_from_at_most_max_publishers_peers_a_step() -> None:
    clock = FakeClock()
    bus = Bus()
    peers = [make_demo(bus, name, seed, max_publishers=2) for seed, name in enumerate(NAMES[:6])]
    names = [p.ex.me for p in peers]
    for p in peers:
        p.ex.members = lambda me=p.ex.me: [n for n in names if n != me]
    steps = 8
    used: list[list[int]] = []

    async def body() -> None:
        for _ in range(steps):
            for p in peers:
                await asyncio.to_thread(p.step)
            await settle()
            used.append([p.ex.last_used for p in peers])

    run(running_demo(peers, body()), clock)
    published = Counter()
    for p in peers:
        published[p.ex.me] = steps - p.ex.sat_out
    want = Counter(n for s in range(steps) for n in choose(seed_of(SWARM, COHORT_A, "demo", s), 2, names))
    assert published == want  # exactly the chosen two published each step
    assert sum(p.ex.sat_out for p in peers) == steps * (len(peers) - 2)
    # A node used each publisher's step at most once: over the run, at most the chosen two per step
    # (but itself). One step may hold a late publisher of the step before next to this step's two.
    for p in peers:
        offered = sum(
            len(set(choose(seed_of(SWARM, COHORT_A, "demo", s), 2, names)) - {p.ex.me}) for s in range(steps)
        )
        assert 0 < p.ex.used <= offered
    assert all(u <= 4 for row in used for u in row)
