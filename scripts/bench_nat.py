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

Not covered by this mode (null in the output): training, gossip of rollouts and DeMo components, real
merges and anchors (`anchors_equal`), a joiner's state catch-up through the exchange code. This mode
measures the transport the exchanges ride on.

`--train`: the same topology with the full node. pub0 (the bootstrap) and the three NATed nodes run
`swarmnode run` (tiny model, DeMo inner optimizer gossiping its components, rollouts shared, DiLoCo in
wall-clock rounds); pub1.. (`--relays`, default 2) are public nodes that only relay (tests/netns_node.py). After `--kill-at`
seconds the relay that h1a reserved on is SIGKILLed; after `--join-at` seconds a late NATed joiner
(h2b, behind r2) starts with only the public nodes as bootstrap and catches up through the exchange
code. Everything is read from the nodes' own metrics and logs: per round, which nodes merged it, with
how many contributors and onto which anchor (`merges_with_all_contributors`: rounds every live node
merged with every live node's contribution; `anchors_equal`: those rounds ended on one anchor);
`pull_success_ratio` (Δ pulls that succeeded, from the merges and the exchange's failed-pull count);
`bytes_relayed` (what the relays forwarded), `bytes_direct` (the rest of what the nodes received, an
estimate); `hole_punch_ok` (a NATed node held a direct connection to a node behind another router);
`recover_s` (kill to the first round after it that every live NATed node merged with every live
contributor); `joiner_caught_up` and whether its donor was NATed.

    sudo python scripts/bench_nat.py --rounds 6 --blob-kib 1024
    sudo python scripts/bench_nat.py --train --seconds 300
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import zlib
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


# -- training level -----------------------------------------------------------------------------------------

TRAIN_SWARM = "bench-nat"
LISTENING = "swarmnode listening on "
# Small and fast on a shared 2-core machine: the tiny model, DeMo inner steps (components gossiped every
# step), rollouts shared, DiLoCo merges in wall-clock rounds.
TRAIN_ARGS = [
    *("--family", "reverse-exact", "--local-groups", "4", "--external-groups", "2"),
    *("--optimizer", "demo", "--lr", "5e-4", "--outer-lr", "1.0", "--outer-momentum", "0"),
    *("--eval-every", "100000", "--checkpoint-every", "0"),
]


class Daemon:
    """`swarmnode run` inside a namespace; its metrics and log are read from its data dir."""

    def __init__(
        self,
        where: Any,
        data_dir: Path,
        model: str,
        bootstrap: list[str],
        seconds: float,
        args: Any,
        port_offset: int = 0,
    ) -> None:
        import subprocess

        self.name = data_dir.name
        self.dir = data_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        # Trainers run niced: every node here shares 2 cores, and a relay (its own machine in a real
        # swarm) that waits behind five training loops delays every relayed pull past its window.
        cmd = ["ip", "netns", "exec", where.ns, "nice", "-n", str(args.trainer_nice)]
        cmd += [sys.executable, "-m", "swarmnode.cli", "run"]
        cmd += ["--data-dir", str(self.dir), "--model", model, "--swarm", TRAIN_SWARM]
        cmd += [
            "--listen",
            f"/ip4/{where.ip}/tcp/{PORT + port_offset}",
            "--seed",
            str(zlib.crc32(self.name.encode()) % 1000),
        ]
        cmd += [
            "--diloco",
            "--round-seconds",
            str(args.round_seconds),
            "--collect-seconds",
            str(args.collect_seconds),
        ]
        cmd += ["--duration", str(seconds), "--expect-peers", "0", *TRAIN_ARGS]
        for b in bootstrap:
            cmd += ["--bootstrap", b]
        env = {**__import__("os").environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.log = (self.dir / "node.log").open("w", encoding="utf-8")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, text=True, env=env)
        self.started = time.time()
        self.killed_at: float | None = None
        self.addr = ""
        self.peer_id = ""

    def wait_listening(self, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in (self.dir / "node.log").read_text(errors="replace").splitlines():
                if line.startswith(LISTENING):
                    self.addr = line[len(LISTENING) :].strip()
                    self.peer_id = self.addr.rsplit("/p2p/", 1)[1]
                    return self.addr
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} did not start:\n{(self.dir / 'node.log').read_text()[-2000:]}")

    def rows(self) -> list[dict[str, Any]]:
        path = self.dir / "metrics.jsonl"
        out = []
        if path.exists():
            for line in path.read_text(errors="replace").splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if "step" in row:
                    out.append(row)
        return out

    def last(self) -> dict[str, Any]:
        rows = self.rows()
        return rows[-1] if rows else {}

    def kill(self) -> None:
        self.killed_at = time.time()
        self.proc.kill()
        self.proc.wait()

    def stop(self, timeout: float) -> int:
        import subprocess

        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return int(self.proc.returncode)


def _merges(d: Daemon) -> dict[int, dict[str, Any]]:
    """{round: the metrics row right after this node merged it} (merges counted up in that row)."""
    out: dict[int, dict[str, Any]] = {}
    before = 0
    for row in d.rows():
        m = int(row.get("merges") or 0)
        if m > before:
            out[int(row["round"])] = row
        before = m
    return out


def _relay_named(reachability: str) -> str:
    return reachability.split("relay", 1)[1].strip().split()[0].strip(",") if "relay" in reachability else ""


def run_training(args: argparse.Namespace) -> dict[str, Any]:
    from swarmnode.tinymodel import build_tiny_policy

    root = Path(tempfile.mkdtemp(prefix="bench_nat_train_"))
    bed = NetnsBed()
    daemons: dict[str, Daemon] = {}
    out: dict[str, Any] = {}
    try:
        model = str(build_tiny_policy(root / "tiny-model", family="reverse-exact"))
        relay_names = [f"pub{i}" for i in range(1, 1 + args.relays)]
        hosts = {name: bed.add_public(name) for name in ("pub0", *relay_names)}
        r1, r2 = bed.add_router("r1"), bed.add_router("r2")
        hosts.update(
            {"h1a": bed.add_home(r1, "h1a"), "h1b": bed.add_home(r1, "h1b"), "h2a": bed.add_home(r2, "h2a")}
        )
        if args.shape:
            for router in (r1, r2):
                bed.shape(router, rate=args.shape)
        t0 = time.time()
        daemons["pub0"] = Daemon(hosts["pub0"], root / "pub0", model, [], args.seconds, args)
        boot = [daemons["pub0"].wait_listening()]
        relays = {n: bed.start_node(hosts[n], root / n, port=PORT, bootstrap=boot) for n in relay_names}
        boot += [r.addr for r in relays.values()]
        for index, name in enumerate(NATTED):
            left = args.seconds - (time.time() - t0)
            offset = 0 if args.same_ports else 1 + index
            daemons[name] = Daemon(hosts[name], root / name, model, boot, left, args, offset)
        for d in daemons.values():
            d.wait_listening()
        ids = {name: d.peer_id for name, d in daemons.items()} | {n: r.peer_id for n, r in relays.items()}
        names = {v: k for k, v in ids.items()}
        natted_ready = wait_until(
            lambda: all(
                "reachable through relay" in str(daemons[n].last().get("reachability")) for n in NATTED
            ),
            120,
            1.0,
        )
        out["relay_ready_s"] = round(time.time() - t0, 1)
        out["reachability"] = {n: daemons[n].last().get("reachability") for n in daemons}
        if not natted_ready:
            raise RuntimeError(f"NATed nodes never reported a relay: {out['reachability']}")
        killed = joiner = None
        killed_time: float | None = None
        kill_at = t0 + args.kill_at if args.kill_at > 0 else float("inf")
        join_at = t0 + args.join_at
        end = t0 + args.seconds
        relay_stats: dict[str, dict[str, Any]] = {}
        while time.time() < end and any(d.proc.poll() is None for d in daemons.values()):
            now = time.time()
            if killed is None and now >= kill_at:
                relay = _relay_named(str(daemons["h1a"].last().get("reachability", "")))
                killed = names.get(relay, relay_names[0] if relay_names else "pub0")
                if killed in relays:
                    relay_stats[killed] = relays[killed].call("stats")["stats"]["relay"]
                    relays[killed].kill()
                    killed_time = time.time()
                else:
                    daemons[killed].kill()
                    killed_time = daemons[killed].killed_at or time.time()
                out["killed_relay"] = killed
                out["killed_at_s"] = round(killed_time - t0, 1)
            if joiner is None and now >= join_at:
                joiner_host = bed.add_home(r2, "h2b")
                live_boot = [daemons["pub0"].addr] if killed != "pub0" else []
                live_boot += [r.addr for n, r in relays.items() if n != killed]
                offset = 0 if args.same_ports else 1 + len(NATTED)
                joiner = Daemon(joiner_host, root / "h2b", model, live_boot, end - now, args, offset)
                daemons["h2b"] = joiner
                joiner.wait_listening()
                ids["h2b"], names[joiner.peer_id] = joiner.peer_id, "h2b"
            time.sleep(1.0)
        for name, r in relays.items():
            if name != killed:
                relay_stats[name] = r.call("stats")["stats"]["relay"]
        exit_codes = {n: d.stop(timeout=120) for n, d in daemons.items() if d.killed_at is None}
        out.update(_training_report(daemons, names, relay_stats, killed_time, args))
        out["exit_codes"] = exit_codes
        return out
    finally:
        for d in daemons.values():
            if d.proc.poll() is None:
                d.proc.kill()
        bed.close()


def _training_report(
    daemons: dict[str, Daemon],
    names: dict[str, str],
    relay_stats: dict[str, dict[str, Any]],
    killed_at: float | None,
    args: Any,
) -> dict[str, Any]:
    merges = {n: _merges(d) for n, d in daemons.items()}
    last = {n: d.last() for n, d in daemons.items()}
    # a node contributes from the first round it merged with its own Δ (a joiner first observes one)
    first_own = {
        n: min((r for r, row in m.items() if row.get("diloco_merged_own")), default=None)
        for n, m in merges.items()
    }

    ended = {n: float(last[n].get("time", 0.0)) for n in daemons}

    def alive(n: str, at: float) -> bool:
        # a node whose run ends within a round of the merge (every node stops at the bench's end,
        # mid-round) is not expected to merge it; a killed one is not after its kill
        d = daemons[n]
        return (
            d.started <= at
            and at + args.round_seconds <= ended[n]
            and (d.killed_at is None or at < d.killed_at)
        )

    rounds = sorted({r for m in merges.values() for r in m})
    full = equal = 0
    pulls_expected, pulls_ok = [0], [0]
    per_round = []
    for r in rounds:
        rows = {n: m[r] for n, m in merges.items() if r in m}
        at = min(float(row["time"]) for row in rows.values())
        # every node alive when the round merged that had started contributing by this round
        members = [n for n in daemons if alive(n, at) and first_own[n] is not None and first_own[n] <= r]
        complete = set(members) <= set(rows) and all(
            row.get("diloco_merged_own") and int(row.get("merge_contributors", 0)) >= len(members)
            for n, row in rows.items()
            if n in members
        )
        same = len({row.get("anchor_hash") for row in rows.values()}) == 1
        for n in members:  # every other member's Δ is a pull this member should have made
            got = int(rows[n].get("merge_contributors", 0)) if n in rows else 1
            pulls_expected[0] += len(members) - 1
            pulls_ok[0] += max(0, min(got, len(members)) - 1)
        full += complete
        equal += same
        per_round.append([r, sorted(rows), len(members), complete, same])
    recover_s = None
    if killed_at is not None:
        natted = [n for n in ("h1a", "h1b", "h2a") if daemons[n].killed_at is None]
        for r, _merged_by, _, complete, same in per_round:
            rows = {n: merges[n][r] for n in natted if r in merges[n]}
            if len(rows) < len(natted) or min(float(x["time"]) for x in rows.values()) < killed_at:
                continue
            if complete and same:
                recover_s = round(max(float(x["time"]) for x in rows.values()) - killed_at, 1)
                break
    failed = received = 0
    for n in merges:
        failed += int(last[n].get("diloco/dropped") or 0)
        received += sum(
            int(v)
            for k, v in last[n].items()
            if k.endswith("/bytes_received") and isinstance(v, (int, float))
        )
    relayed = int(last.get("pub0", {}).get("relay/bytes_relayed") or 0)
    relayed += sum(int(r.get("bytes_relayed", 0)) for r in relay_stats.values())
    # direct paths a NATed node holds beyond the public nodes and its LAN neighbours: a hole punch
    lan = {"h1a": 1, "h1b": 1, "h2a": 0, "h2b": 1}
    punched = any(
        int(row.get("p2p/direct_peers") or 0) > 1 + args.relays + lan[n]
        for n in lan
        if n in daemons
        for row in daemons[n].rows()
    )
    joiner = daemons.get("h2b")
    donor = None
    if joiner is not None:
        for line in (joiner.dir / "node.log").read_text(errors="replace").splitlines():
            if "caught up from " in line:
                donor = names.get(line.split("caught up from ", 1)[1].split(":")[0].strip(), "?")
                break
    return {
        "nodes": len(daemons) + 1,
        "natted": sum(1 for n in daemons if n.startswith("h")),
        "rounds": len(per_round),
        "merges_with_all_contributors": full,
        "anchors_equal": equal,
        "rounds_detail": per_round,
        # a member's Δ that reached another member's merge of the round, of all it should have reached
        # (a pull that failed, or did not finish within the collection window, is a miss)
        "pull_success_ratio": round(pulls_ok[0] / max(1, pulls_expected[0]), 4),
        "pulls": pulls_expected[0],
        "pulls_failed_counted": failed,
        "bytes_relayed": relayed,
        "bytes_received": received,
        "bytes_direct": max(0, received - relayed),
        "hole_punch_ok": punched,
        "recover_s": recover_s,
        "joiner_caught_up": bool(joiner is not None and int(last["h2b"].get("catchups") or 0) >= 1),
        "joiner_donor": donor,
        "joiner_donor_natted": donor is not None and donor.startswith("h"),
        "steps": {n: last[n].get("step") for n in daemons},
        "demo_peers_used": {n: last[n].get("demo_peers_used") for n in daemons},
        "borrowed_groups": {
            n: int(last[n].get("borrowed_same_cohort") or 0) + int(last[n].get("borrowed_other_cohort") or 0)
            for n in daemons
        },
        "diloco_health": {n: last[n].get("diloco_health") for n in daemons},
        "shape": args.shape or None,
        "natted_ports": "same" if args.same_ports else "distinct",
    }


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
    parser.add_argument("--train", action="store_true", help="the full node in the namespaces (see above)")
    parser.add_argument("--seconds", type=float, default=300.0, help="--train: how long the nodes train")
    parser.add_argument(
        "--kill-at", type=float, default=150.0, help="--train: kill h1a's relay then (0: never)"
    )
    parser.add_argument("--join-at", type=float, default=180.0, help="--train: start the late NATed joiner")
    parser.add_argument("--round-seconds", type=float, default=20.0, help="--train: DiLoCo round length")
    parser.add_argument("--collect-seconds", type=float, default=10.0, help="--train: collection window")
    parser.add_argument(
        "--same-ports",
        action="store_true",
        help="--train: every NATed node on port 4001 (default: distinct, as `--port 0` gives; two nodes behind "
        "one router on one port broke each other's hole-punched paths)",
    )
    parser.add_argument("--relays", type=int, default=2, help="--train: public relay-only nodes besides pub0")
    parser.add_argument("--trainer-nice", type=int, default=5, help="--train: niceness of the training nodes")
    args = parser.parse_args()
    reason = skip_reason()
    if reason:
        print(json.dumps({"error": reason}))
        return 2
    print(json.dumps(run_training(args) if args.train else run(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
