"""Memory under Sybil churn: a Membership fed real, encoded presence messages from ever-new
identities (plus one flooding peer and fake round manifests), on a simulated clock; prints one JSON
object with the resident set size after a warm-up minute and at the end.

    python scripts/bench_sybil_rss.py --minutes 10 --sybils 150 --lifetime-s 30

Every ``lifetime_s`` each Sybil is replaced by a fresh identity, each sends a presence every 0.5 s
(and a round manifest per presence, i.e. ``note_member``), and one more peer floods 100 presences/s.
The heartbeat's ``prune`` runs every 2 s as in the daemon. Time is simulated (the clock advances per
message), so 10 minutes of churn take well under a minute of CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import time
from typing import Any

from swarmnode.protocol import Presence, codec

from swarmnode.membership import Membership, MembershipConfig, Status

COHORT = "aa" * 8


class _Host:
    peer_id = "Victim1"

    def connected_peers(self) -> list[str]:
        return []


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _presence(peer: str, rnd: int) -> bytes:
    record = Presence(
        peer_id=peer,
        addrs=["/ip4/198.18.0.1/tcp/4001"],
        swarm="bench",
        cohort=COHORT,
        engine="hf",
        hardware="cpu",
        step=rnd * 10,
        round=rnd,
        samples=0,
        anchor_hash="ee" * 32,
    )
    return codec.encode(record)


def _id(generation: int, i: int) -> str:
    return "Sy" + f"{generation}x{i}".replace("0", "z")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--sybils", type=int, default=150)
    ap.add_argument("--lifetime-s", type=float, default=30.0)
    args = ap.parse_args()

    now = [0.0]
    asyncio.set_event_loop(asyncio.new_event_loop())  # Membership holds an asyncio.Event
    m = Membership(
        MembershipConfig(swarm="bench"),
        host=_Host(),  # type: ignore[arg-type]
        cohort=COHORT,
        engine="hf",
        hardware="cpu",
        addrs=lambda: [],
        status=lambda: Status(),
        clock=lambda: now[0],
    )
    m.round_bound = lambda: 10
    flood = _presence("Fx1", 3)
    t0 = time.process_time()
    sent = 0
    tick = 0.5
    rss_warm = 0
    peak_table = 0
    samples: list[tuple[float, int]] = []
    end = args.minutes * 60.0
    next_prune = 2.0
    while now[0] < end:
        generation = int(now[0] // args.lifetime_s)
        for i in range(args.sybils):
            peer = _id(generation, i)
            m._handle(peer, _presence(peer, (i % 20) * (1 << 40) if i % 3 == 0 else 3))
            m.note_member(peer)
            sent += 1
        for _ in range(int(100 * tick)):
            m._handle("Fx1", flood)
            sent += 1
        now[0] += tick
        if now[0] >= next_prune:
            m.prune()
            next_prune += 2.0
        peak_table = max(peak_table, len(m.peers))
        if not rss_warm and now[0] >= 60.0:
            gc.collect()
            rss_warm = rss_kib()
        if int(now[0]) % 60 == 0 and now[0] == int(now[0]):
            samples.append((now[0], rss_kib()))
    gc.collect()
    rss_end = rss_kib()
    stats: dict[str, Any] = m.statistics()
    print(
        json.dumps(
            {
                "simulated_minutes": args.minutes,
                "sybils_alive": args.sybils,
                "identities_total": int(end // args.lifetime_s) * args.sybils,
                "messages": sent,
                "cpu_s": round(time.process_time() - t0, 1),
                "rss_kib_after_1_min": rss_warm,
                "rss_kib_end": rss_end,
                "rss_growth_pct": round(100.0 * (rss_end - rss_warm) / rss_warm, 2) if rss_warm else None,
                "rss_kib_per_minute": samples,
                "peer_table_peak": peak_table,
                "peer_table_end": len(m.peers),
                "rate_limited": stats["presence/rate_limited"],
                "implausible": stats["presence/implausible"],
                "cohort_peers_end": stats["cohort_peers"],
            }
        )
    )


if __name__ == "__main__":
    main()
