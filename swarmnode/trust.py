"""Whom to trust with our weights: pure rules for choosing a state donor and accepting its state.

Peer identities are free, so a catch-up that counts identities (newest round wins, most holders of an
anchor win) is a takeover: an attacker with 3 Sybil identities moved two victims onto its weights in
0.4 s. These rules count what is expensive to fake instead, and finally check the state itself.

API (all pure, deterministic; the catch-up code in ``swarmnode.exchange`` calls them)::

    network_group(addr) -> str | None
        The network a remote address belongs to: its IPv4 /24 or IPv6 /48 (one operator's Sybils
        usually share one), "ip:port" on loopback (a local swarm on one machine). None if unparseable.

    choose_donor(offers, addresses, *, verified=(), my_round, max_round, quorum=2) -> Choice | None
        ``offers``: what peers advertise (``Offer(peer, round, step, anchor_hash)``, from presences);
        ``addresses``: {peer: remote address of our connection to it} (the transport's view, not
        what the peer claims about itself); ``verified``: peers whose contributions this node fetched,
        checked and merged in earlier rounds (``Membership.contributors()``). Offers outside
        ``[my_round, max_round]`` are ignored. Each (round, anchor) is *supported* by the number of
        distinct network groups of the peers offering it plus the number of verified peers offering
        it; it is *attested* when that reaches ``quorum``. The choice is the newest attested round
        (then more support, then the smaller hash); without any attested offer, the best unattested
        one is returned with ``attested=False`` and the caller must accept it only after the probe.
        ``Choice.donors`` lists whom to ask, verified peers first, one per network group first.

    choose_resync(offers, addresses, *, verified=(), my_round, my_anchor, quorum=2) -> Choice | None
        The majority re-sync of a replica whose anchor diverged (it merged another set of
        contributions): among offers at ``my_round``, each anchor is supported as above, ours by one
        more (this node). The winner has the most support (ties: the smaller hash, the same rule on
        every replica); None when it is ours. ``attested``: the winner's support reaches ``quorum``.

    check_claim(round, step, *, my_round, my_step, max_round, max_steps_per_round,
                min_steps_per_round=0) -> str | None
        Why a donor's (round, step) is implausible (None if plausible): a round past the bound, or
        a step further ahead than that many rounds could have taken (no step 123,919 at round 5),
        or (step rounds) fewer steps than the round needs.

    accept_probe(own_reward, candidate_reward, *, tolerance=0.1) -> bool
        The local probe: load a candidate state only if its held-out reward on a few of our prompts
        is not worse than our current weights' by more than ``tolerance`` (non-finite: rejected).

What this tolerates: an attacker needs identities in ``quorum`` distinct /24 networks (or the trust of
merged rounds, which costs honest-looking contributions that pass the robust merge) to attest a
state. The exchange (``DiLoCoExchange.maybe_catch_up``) loads an attested state after the shape,
finiteness, anchor-hash and claim checks, without the probe; a bootstrap-only joiner facing one
malicious donor sees an unattested offer and loads it only if the probe passes, otherwise it rolls
back and trains from its own model. Not tolerated: an operator with hosts in ``quorum`` networks
(the probe does not guard attested states); on loopback every port is its own group (local swarms
on one machine), so there the rule counts processes, not operators.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "Choice",
    "Offer",
    "accept_probe",
    "check_claim",
    "choose_donor",
    "choose_resync",
    "network_group",
]


@dataclass(frozen=True, slots=True)
class Offer:
    """A state a peer advertises (its presence: round, step, anchor hash)."""

    peer: str
    round: int
    step: int
    anchor_hash: str


@dataclass(frozen=True, slots=True)
class Choice:
    round: int
    anchor_hash: str
    donors: tuple[str, ...]  # whom to ask, in order
    support: int  # distinct network groups + verified peers behind this anchor
    attested: bool  # support >= quorum; otherwise load only after ``accept_probe``


def network_group(addr: str) -> str | None:
    """IPv4 /24 or IPv6 /48 of a remote address ("/ip4/1.2.3.4/tcp/5", "1.2.3.4:5", "1.2.3.4");
    on loopback the address and port, since every node of a local swarm shares 127.0.0.1."""
    host, port = _split(addr)
    if host is None:
        return None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return f"{ip}:{port}" if port else str(ip)
    prefix = 24 if ip.version == 4 else 48
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


def _split(addr: str) -> tuple[str | None, str]:
    addr = addr.strip()
    if addr.startswith("/"):
        parts = addr.split("/")
        host = port = None
        for i, p in enumerate(parts[:-1]):
            if p in ("ip4", "ip6") and host is None:
                host = parts[i + 1]
            elif p in ("tcp", "udp") and port is None:
                port = parts[i + 1]
        return host, port or ""
    if addr.startswith("["):  # [v6]:port
        host, _, rest = addr[1:].partition("]")
        return host, rest.lstrip(":")
    if addr.count(":") == 1:  # v4:port
        host, _, port = addr.partition(":")
        return host, port
    return (addr or None), ""


def check_claim(
    round: int,
    step: int,
    *,
    my_round: int,
    my_step: int,
    max_round: int,
    max_steps_per_round: int,
    min_steps_per_round: int = 0,
) -> str | None:
    """Why a donor's (round, step) cannot be true, or None when it can. ``min_steps_per_round``:
    step-based rounds end every H steps, so a state of round r has taken at least r·H."""
    if not isinstance(round, int) or not isinstance(step, int) or round < 0 or step < 0:
        return f"round {round!r} / step {step!r} are not counts"
    if round > max_round:
        return f"round {round} is past the newest plausible round {max_round}"
    if round < my_round:
        return f"round {round} is older than ours ({my_round})"
    if step < round * min_steps_per_round:
        return f"step {step} is too few for round {round} ({min_steps_per_round} steps a round)"
    ceiling = my_step + (round - my_round + 1) * max_steps_per_round
    if step > ceiling:
        return f"step {step} is more than {round - my_round + 1} rounds of steps past ours ({my_step})"
    return None


def accept_probe(own_reward: float, candidate_reward: float, *, tolerance: float = 0.1) -> bool:
    """True when the candidate's held-out reward is not worse than ours by more than ``tolerance``.
    Our own non-finite reward (nothing to compare with) accepts any finite candidate."""
    if not math.isfinite(candidate_reward):
        return False
    if not math.isfinite(own_reward):
        return True
    return candidate_reward >= own_reward - tolerance


def choose_donor(
    offers: Sequence[Offer],
    addresses: Mapping[str, str],
    *,
    verified: Collection[str] = (),
    my_round: int,
    max_round: int,
    quorum: int = 2,
) -> Choice | None:
    """The state to load and whom to ask for it; see the module docstring for the rule."""
    if quorum < 1:
        raise ValueError(f"quorum must be >= 1, got {quorum}")
    trusted = set(verified)
    by_anchor: dict[tuple[int, str], list[str]] = {}
    for o in offers:
        if not o.anchor_hash or not my_round <= int(o.round) <= max_round:
            continue
        peers = by_anchor.setdefault((int(o.round), o.anchor_hash), [])
        if o.peer not in peers:
            peers.append(o.peer)
    best: tuple[tuple[int, int, int, str], Choice] | None = None
    for (rnd, anchor), peers in by_anchor.items():
        support = _support(peers, addresses, trusted)
        attested = support >= quorum
        choice = Choice(
            round=rnd,
            anchor_hash=anchor,
            donors=_donor_order(peers, addresses, trusted),
            support=support,
            attested=attested,
        )
        # attested first, then the newest round, then the most support, then the smaller hash
        key = (int(attested), rnd, support, _neg(anchor))
        if best is None or key > best[0]:
            best = (key, choice)
    return None if best is None else best[1]


def choose_resync(
    offers: Sequence[Offer],
    addresses: Mapping[str, str],
    *,
    verified: Collection[str] = (),
    my_round: int,
    my_anchor: str,
    quorum: int = 2,
    undecided: int = 0,
) -> Choice | None:
    """The anchor a replica re-syncs to at its own round, or None to keep its own (see the module
    docstring). Identities count for nothing: four Sybils from one /24 support an anchor by one, as
    much as this node supports its own. ``undecided``: cohort peers still a round behind (their
    presences do not say yet which anchor they will land on): while there are any, a replica moves
    only to an anchor that would out-vote its own even if all of them joined it, never on a tie (a
    replica one round ahead of a slow peer would otherwise follow a joiner's divergent anchor)."""
    if quorum < 1:
        raise ValueError(f"quorum must be >= 1, got {quorum}")
    trusted = set(verified)
    holders: dict[str, list[str]] = {}
    for o in offers:
        if int(o.round) != my_round or not o.anchor_hash:
            continue
        peers = holders.setdefault(o.anchor_hash, [])
        if o.peer not in peers:
            peers.append(o.peer)
    support = {a: _support(p, addresses, trusted) for a, p in holders.items()}
    ours = support.get(my_anchor, 0) + 1
    winner = min(
        [*(a for a in support if a != my_anchor), my_anchor],
        key=lambda a: (-(ours if a == my_anchor else support[a]), a),
    )
    if winner == my_anchor:
        return None
    if undecided > 0 and support[winner] <= ours + undecided:
        return None
    return Choice(
        round=my_round,
        anchor_hash=winner,
        donors=_donor_order(holders[winner], addresses, trusted),
        support=support[winner],
        attested=support[winner] >= quorum,
    )


def _support(peers: Collection[str], addresses: Mapping[str, str], trusted: set[str]) -> int:
    """Distinct network groups of ``peers`` plus the verified ones among them."""
    groups = {g for p in peers if (g := network_group(addresses.get(p, ""))) is not None}
    return len(groups) + sum(1 for p in peers if p in trusted)


def _neg(text: str) -> str:
    """A key that sorts ``text`` descending inside an ascending comparison of hex digests."""
    return "".join(chr(0x10FFFF - ord(c)) for c in text)


def _donor_order(peers: list[str], addresses: Mapping[str, str], trusted: set[str]) -> tuple[str, ...]:
    """Verified peers first; then one peer per network group before a second from any group;
    peers whose address we do not know last; ties by peer id."""
    seen: dict[str | None, int] = {}
    ranked = []
    for p in sorted(peers):
        g = network_group(addresses.get(p, ""))
        nth = seen.get(g, 0)
        seen[g] = nth + 1
        ranked.append((p not in trusted, g is None, nth, p))
    return tuple(p for *_, p in sorted(ranked))
