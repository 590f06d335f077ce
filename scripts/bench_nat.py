"""NAT bench at the p2p level: blob pulls between NATed nodes in network namespaces, one JSON object out.

Topology (tests/netns.py; needs root, `ip`, `nft`): `--public` public nodes (pub0 is the bootstrap; the
others are spare relays), router r1 with h1a and h1b, router r2 with h2a (the issue's 1 public + 3 NATed,
plus spares). Every node runs the real `swarmnode.p2p` host (relay service, reservations, DCUtR), driven
by tests/netns_node.py.

What one run does:
1. Waits until every NATed node says "behind NAT, reachable through relay ...".
2. `--rounds` rounds: each NATed node provides a fresh `--blob-kib` blob (standing in for a pseudo-gradient
   or state blob) and every other live node pulls it from its author only (no re-serving by others), so
   pulls between h1* and h2a must cross the NATs (relay, or a hole-punched connection).
3. After round `--kill-after`, SIGKILLs the relay carrying h1a's connection to h2a (pub0 if that
   connection is direct) and measures `recover_s`: until every NATed pair answers an echo request again
   (a new relay, or a hole-punched path). `--cut` unplugs its link first (no FIN/RST reaches anyone).
4. A late NATed joiner (h2b, behind r2) starts and pulls every blob of the last round from the NATed
   authors (`joiner_caught_up`).

Reported: `pull_success_ratio` (all pulls; `natted_pull_success_ratio`: between NATed nodes behind
different routers), `bytes_relayed` (payload the relays forwarded, counted by their relay service,
including noise/yamux framing), `bytes_pulled` (blob bytes all nodes received), `bytes_direct` (pulled
minus relayed, clamped at 0: an estimate), `hole_punch_ok` (whether any NATed pair behind different
routers held a direct connection (`direct_cross_router_pairs` of `cross_router_pairs`), by the end of the rounds or within `--punch-wait` s after them),
`merges_with_all_contributors` (rounds in which every live node
pulled every other NATed node's blob intact).

Not covered (null in the output): training, gossip of rollouts and DeMo components, real merges and
anchors (`anchors_equal`), a joiner's state catch-up through the exchange code; the churn cycle of the
issue. Those need the full node (swarmnode.node) in the namespaces; this bench measures the transport
the exchanges ride on.

    sudo python scripts/bench_nat.py --rounds 6 --blob-kib 1024
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from netns import NetnsBed, skip_reason
from p2p_node_proc import NodeProcess, wait_until

PORT = 4001
NATTED = ("h1a", "h1b", "h2a")


def _router(name: str) -> str:
    return name[:2]  # "h1a" -> "h1": nodes behind one router share the prefix


def _relayed(node: NodeProcess) -> bool:
    return "reachable through relay" in node.call("stats")["stats"]["reachability"]


def _relay_of(node: NodeProcess, peer: str) -> str | None:
    for addrs in node.call("conns")["conns"].get(peer, []):
        if "/p2p-circuit" in addrs:
            return addrs.split("/p2p-circuit")[0].rsplit("/p2p/", 1)[1]
    return None


def _direct(node: NodeProcess, peer: str) -> bool:
    return any("/p2p-circuit" not in c for c in node.call("conns")["conns"].get(peer, []))


def _request_ok(node: NodeProcess, peer: str, deadline: float) -> bool:
    try:
        return bool(
            node.call("request", peer=peer, size=100, deadline=deadline, timeout=deadline + 10)["echo"]
        )
    except (RuntimeError, TimeoutError):
        return False


def _pull_all(pulls: list[tuple[str, NodeProcess, str, str]], max_size: int, deadline: float) -> list[bool]:
    """Run pulls (puller name, puller, blob hash, author id); one outstanding command per node at a time."""
    results: list[bool] = [False] * len(pulls)
    pending = list(enumerate(pulls))
    while pending:
        busy: set[str] = set()
        batch = []
        for index, (name, node, digest, author) in pending:
            if name in busy:
                continue
            busy.add(name)
            request = node.send("pull", hash=digest, providers=[author], max_size=max_size, deadline=deadline)
            batch.append((index, node, request))
        done = {index for index, _, _ in batch}
        for index, node, request in batch:
            try:
                results[index] = bool(node.reply(request, timeout=deadline + 15)["intact"])
            except (RuntimeError, TimeoutError):
                results[index] = False
        pending = [(i, p) for i, p in pending if i not in done]
    return results


def run(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="bench_nat_"))
    bed = NetnsBed()
    out: dict[str, Any] = {}
    try:
        hosts = {f"pub{i}": bed.add_public(f"pub{i}") for i in range(args.public)}
        r1 = bed.add_router("r1", stealth=not args.rst_routers)
        r2 = bed.add_router("r2", stealth=not args.rst_routers)
        hosts.update(
            {"h1a": bed.add_home(r1, "h1a"), "h1b": bed.add_home(r1, "h1b"), "h2a": bed.add_home(r2, "h2a")}
        )
        if args.shape:
            for router in (r1, r2):
                bed.shape(router, rate=args.shape)
        options = {"no_hole_punching": args.no_hole_punching}
        nodes: dict[str, NodeProcess] = {
            "pub0": bed.start_node(hosts["pub0"], root / "pub0", port=PORT, **options)
        }
        boot = [nodes["pub0"].addr]
        for i in range(1, args.public):
            name = f"pub{i}"
            nodes[name] = bed.start_node(hosts[name], root / name, port=PORT, bootstrap=boot, **options)
            boot.append(nodes[name].addr)
        for index, name in enumerate(NATTED):
            port = PORT + 1 + index if args.distinct_ports else PORT
            nodes[name] = bed.start_node(hosts[name], root / name, port=port, bootstrap=boot, **options)
        started = time.monotonic()
        ready = all(wait_until(lambda n=nodes[name]: _relayed(n), 60, 0.5) for name in NATTED)
        out["relay_ready_s"] = round(time.monotonic() - started, 2)
        if not ready:
            raise RuntimeError("NATed nodes never reported a relay reservation")
        reach = {name: nodes[name].call("stats")["stats"]["reachability"] for name in nodes}

        live = dict(nodes)
        max_size = args.blob_kib * 1024 * 2
        pulls_ok = pulls_total = natted_ok = natted_total = full_rounds = 0
        bytes_pulled = 0
        hole_punched = False
        recover_s: float | None = None
        killed = None
        last_blobs: dict[str, str] = {}
        relayed_by: dict[str, int] = {}  # the last count read from each relay (a killed one keeps its last)
        round_s = []
        for round_index in range(args.rounds):
            t0 = time.monotonic()
            blobs = {name: live[name].call("provide", size=args.blob_kib * 1024)["hash"] for name in NATTED}
            plan = [
                (puller, live[puller], digest, live[author].peer_id, author)
                for author, digest in blobs.items()
                for puller in live
                if puller != author
            ]
            results = _pull_all([p[:4] for p in plan], max_size, args.pull_deadline)
            round_full = all(results)
            for (puller, _node, _digest, _author_id, author), ok in zip(plan, results, strict=True):
                pulls_total += 1
                pulls_ok += ok
                bytes_pulled += args.blob_kib * 1024 if ok else 0
                if puller in NATTED and _router(puller) != _router(author):
                    natted_total += 1
                    natted_ok += ok
            full_rounds += round_full
            last_blobs = blobs
            round_s.append(round(time.monotonic() - t0, 2))
            for name, node in live.items():
                if name.startswith("pub"):
                    relayed_by[name] = node.call("stats")["stats"]["relay"].get("bytes_relayed", 0)
            for a in NATTED:
                for b in NATTED:
                    if _router(a) != _router(b) and _direct(live[a], live[b].peer_id):
                        hole_punched = True
            if round_index + 1 == args.kill_after and killed is None:
                a, b = live["h1a"], live["h2a"]
                used = _relay_of(a, b.peer_id) or nodes["pub0"].peer_id
                killed = next(name for name, n in live.items() if n.peer_id == used)
                if args.cut:
                    bed.cut(hosts[killed])
                live.pop(killed).kill()
                t_kill = time.monotonic()
                pairs = [(x, y) for x in NATTED for y in NATTED if _router(x) != _router(y)]
                while pairs and time.monotonic() - t_kill < args.recover_limit:
                    pairs = [(x, y) for x, y in pairs if not _request_ok(live[x], live[y].peer_id, 5.0)]
                    if pairs:
                        time.sleep(0.2)
                recover_s = round(time.monotonic() - t_kill, 2) if not pairs else None
        # A late NATed joiner behind r2 pulls the last round's blobs from their NATed authors.
        joiner_host = bed.add_home(r2, "h2b")
        public_addrs = [n.addr for name, n in live.items() if name.startswith("pub")]
        port = PORT + 1 + len(NATTED) if args.distinct_ports else PORT
        joiner = bed.start_node(joiner_host, root / "h2b", port=port, bootstrap=public_addrs, **options)
        wait_until(
            lambda: "reachable through relay" in joiner.call("stats")["stats"]["reachability"], 60, 0.5
        )
        joined = _pull_all(
            [("h2b", joiner, digest, live[author].peer_id) for author, digest in last_blobs.items()],
            max_size,
            args.pull_deadline,
        )
        live["h2b"] = joiner
        # DCUtR runs in the background (first attempt ~2-6 s after a relayed connection opens): give it time.
        cross = [(x, y) for x in (*NATTED, "h2b") for y in (*NATTED, "h2b") if _router(x) != _router(y)]
        punch_started = time.monotonic()
        hole_punched = hole_punched or wait_until(
            lambda: any(_direct(live[x], live[y].peer_id) for x, y in cross), args.punch_wait, 1.0
        )
        punch_wait_s = round(time.monotonic() - punch_started, 2)
        stats = {name: n.call("stats")["stats"] for name, n in live.items()}
        for name, s in stats.items():
            if name.startswith("pub"):
                relayed_by[name] = s["relay"].get("bytes_relayed", 0)
        bytes_relayed = sum(relayed_by.values())
        out.update(
            {
                "nodes": len(nodes) + 1,
                "natted": len(NATTED) + 1,
                "rounds": args.rounds,
                "blob_kib": args.blob_kib,
                "merges_with_all_contributors": full_rounds,
                "anchors_equal": None,
                "pull_success_ratio": round(pulls_ok / max(pulls_total, 1), 4),
                "pulls": pulls_total,
                "natted_pull_success_ratio": round(natted_ok / max(natted_total, 1), 4),
                "natted_pulls": natted_total,
                "bytes_pulled": bytes_pulled,
                "bytes_relayed": bytes_relayed,
                "bytes_direct": max(0, bytes_pulled - bytes_relayed),
                "hole_punching": not args.no_hole_punching,
                "natted_ports": "distinct" if args.distinct_ports else "same",
                "routers": "rst" if args.rst_routers else "stealth",
                "hole_punch_ok": hole_punched,
                "hole_punch_wait_s": punch_wait_s,
                "direct_cross_router_pairs": sum(_direct(live[x], live[y].peer_id) for x, y in cross) // 2,
                "cross_router_pairs": len(cross) // 2,
                "joiner_caught_up": all(joined),
                "killed_relay": killed,
                "kill": "cut+sigkill" if args.cut else "sigkill",
                "recover_s": recover_s,
                "round_s": round_s,
                "reachability": reach,
                "relay_stats": {name: s["relay"] for name, s in stats.items()},
                "not_covered": "training, gossip of rollouts/DeMo, merges and anchors, exchange-level catch-up, churn",
            }
        )
        return out
    finally:
        bed.close()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--blob-kib", type=int, default=1024)
    parser.add_argument(
        "--public", type=int, default=2, help="public nodes (pub0 bootstraps; >= 2 for a spare relay)"
    )
    parser.add_argument(
        "--kill-after", type=int, default=3, help="kill the relay after this round (0: never)"
    )
    parser.add_argument("--cut", action="store_true", help="unplug the relay's link before killing it")
    parser.add_argument("--recover-limit", type=float, default=60.0)
    parser.add_argument("--pull-deadline", type=float, default=30.0)
    parser.add_argument("--no-hole-punching", action="store_true")
    parser.add_argument(
        "--punch-wait", type=float, default=40.0, help="seconds to wait for a hole-punched pair"
    )
    parser.add_argument("--rst-routers", action="store_true", help="routers answer unsolicited SYNs with RST")
    parser.add_argument(
        "--distinct-ports",
        action="store_true",
        help="NATed nodes listen on distinct ports (default: all on 4001)",
    )
    parser.add_argument("--shape", default="", help="tc tbf rate on each router's uplink, e.g. 50mbit")
    args = parser.parse_args()
    reason = skip_reason()
    if reason:
        print(json.dumps({"error": reason}))
        return 2
    print(json.dumps(run(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
