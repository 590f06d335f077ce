"""Benchmark the p2p transport with real node processes on 127.0.0.1; prints ONE JSON object.

Node 0 is the only bootstrap address. Measures: burst delivery (1000 × 10 KB from one node to all),
latency percentiles over all hops, sustained publish rate, blob pull throughput, rejoin time after
SIGKILL, RSS growth over a traffic soak, idle CPU, and SIGTERM shutdown time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from p2p_node_proc import NodeProcess, wait_until

TOPIC = "/swarmnode/bench/t/1"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def counts(nodes: list[NodeProcess], tag: str) -> list[int]:
    return [n.call("report", tag=tag)["count"] for n in nodes]


def warm_up(nodes: list[NodeProcess]) -> None:
    """Publish small rounds until every node hears every other node (mesh formed)."""
    everyone = {n.peer_id for n in nodes}
    for attempt in range(40):
        tag = f"warm{attempt}"
        for node in nodes:
            node.call("publish", topic=TOPIC, tag=tag, count=1, size=100)

        def done(tag: str = tag) -> bool:
            return all(set(n.call("report", tag=tag)["origins"]) >= everyone - {n.peer_id} for n in nodes)

        if wait_until(done, 2.0, interval=0.2):
            return
    raise RuntimeError("mesh did not form: some node never heard some other node")


def wait_settled(nodes: list[NodeProcess], tag: str, expected: int, quiet_s: float = 3.0) -> int:
    """Wait until every expected message arrived, or no new one arrived for quiet_s; return the total."""
    last, changed_at = -1, time.perf_counter()
    while True:
        total = sum(counts(nodes, tag))
        if total >= expected:
            return total
        if total != last:
            last, changed_at = total, time.perf_counter()
        elif time.perf_counter() - changed_at > quiet_s:
            return total
        time.sleep(0.2)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--duration", type=float, default=20.0, help="traffic soak length (s)")
    parser.add_argument("--burst", type=int, default=1000)
    parser.add_argument("--size", type=int, default=10_000)
    parser.add_argument("--blob-mb", type=int, default=50)
    args = parser.parse_args()
    result: dict[str, object] = {"nodes": args.nodes}
    root = Path(tempfile.mkdtemp(prefix="bench_p2p_"))
    nodes: list[NodeProcess] = []
    try:
        nodes.append(NodeProcess(root / "n0", subscribe=(TOPIC,)))
        for i in range(1, args.nodes):
            nodes.append(NodeProcess(root / f"n{i}", bootstrap=nodes[0].addr, subscribe=(TOPIC,)))
        warm_up(nodes)

        # Latency: paced 10 KB messages from one node, every receiver, all hops.
        nodes[1].call("publish", topic=TOPIC, tag="lat", count=100, size=args.size, interval=0.05, timeout=60)
        wait_until(lambda: sum(counts(nodes, "lat")) >= 100 * (args.nodes - 1), 10, interval=0.3)
        latencies = [x for n in nodes for x in n.call("report", tag="lat")["latencies_ms"]]
        result["p50_ms"] = round(percentile(latencies, 0.50), 2)
        result["p99_ms"] = round(percentile(latencies, 0.99), 2)

        # Burst: as fast as back-pressure allows, from one node to all others.
        expected = args.burst * (args.nodes - 1)
        start = time.perf_counter()
        published = nodes[1].call(
            "publish", topic=TOPIC, tag="burst", count=args.burst, size=args.size, timeout=300
        )
        total = wait_settled(nodes, "burst", expected)
        delivered_s = time.perf_counter() - start
        result["delivery_ratio"] = round(total / expected, 5)
        result["burst_publish_s"] = round(published["seconds"], 3)
        # msgs_per_s is the rate at which EVERY node has the burst (the receivers' CPU is the limit on a
        # small machine); publish_msgs_per_s is what the publisher sustains under back-pressure alone.
        result["publish_msgs_per_s"] = round(args.burst / published["seconds"], 1)
        result["msgs_per_s"] = round(
            args.burst / max(published["seconds"], delivered_s if total >= expected else 0), 1
        )

        # Bulk: blob pull between two leaves.
        blob = nodes[2].call("provide", size=args.blob_mb << 20)["hash"]
        got = nodes[3].call(
            "fetch", hash=blob, providers=[nodes[2].peer_id], max_size=(args.blob_mb + 1) << 20, timeout=120
        )
        if got["sha256"] != blob:
            raise RuntimeError("blob arrived corrupted")
        result["bulk_mb_s"] = round(args.blob_mb / got["seconds"], 1)

        # Soak: every node publishes at a steady rate for --duration seconds, in two halves. Growth is measured
        # over the second half only: the first half pays for one-off allocations (caches filling, the blob
        # buffers above), the second shows whether memory keeps climbing under steady traffic.
        nodes[2].call("remove", hash=blob)
        rate = 5.0
        per_half = max(1, int(args.duration * rate / 2))
        rss_start = [rss_kb(n.proc.pid) for n in nodes]
        rss_marks = []
        for half in range(2):
            ids = [
                (
                    n,
                    n.send(
                        "publish",
                        topic=TOPIC,
                        tag=f"soak{half}",
                        count=per_half,
                        size=args.size,
                        interval=1 / rate,
                    ),
                )
                for n in nodes
            ]
            for node, request_id in ids:
                node.reply(request_id, timeout=args.duration * 3 + 30)
            wait_settled(nodes, f"soak{half}", per_half * args.nodes * (args.nodes - 1))
            rss_marks.append([rss_kb(n.proc.pid) for n in nodes])
        soak_expected = 2 * per_half * args.nodes * (args.nodes - 1)
        soak_received = sum(counts(nodes, "soak0")) + sum(counts(nodes, "soak1"))
        result["soak_delivery_ratio"] = round(soak_received / soak_expected, 5)
        result["rss_mb_max"] = round(max(rss_marks[1]) / 1024, 1)
        result["rss_growth_first_half_pct"] = round(
            max((a - b) / b * 100 for a, b in zip(rss_marks[0], rss_start, strict=True)), 1
        )
        result["rss_growth_pct"] = round(
            max((a - b) / b * 100 for a, b in zip(rss_marks[1], rss_marks[0], strict=True)), 1
        )

        # Idle CPU: mean per node, percent of one core.
        cpu0 = [cpu_seconds(n.proc.pid) for n in nodes]
        time.sleep(5.0)
        cpu1 = [cpu_seconds(n.proc.pid) for n in nodes]
        result["idle_cpu_pct"] = round(
            statistics.mean(b - a for a, b in zip(cpu0, cpu1, strict=True)) / 5.0 * 100, 2
        )

        result["outbound_dropped"] = sum(
            sum(n.call("stats")["stats"]["outbound_dropped"].values()) for n in nodes if n.proc.poll() is None
        )

        # Rejoin: SIGKILL a leaf, restart it with the same data dir, time until it receives again.
        victim_index = args.nodes - 1
        killed_at = time.perf_counter()
        nodes[victim_index].kill()
        nodes[victim_index] = NodeProcess(
            root / f"n{victim_index}", bootstrap=nodes[0].addr, subscribe=(TOPIC,)
        )

        def receiving() -> bool:
            nodes[1].call("publish", topic=TOPIC, tag="rejoin", count=1, size=100)
            return nodes[victim_index].call("report", tag="rejoin")["count"] > 0

        rejoined = wait_until(receiving, 30, interval=0.1)
        result["rejoin_s"] = round(time.perf_counter() - killed_at, 2) if rejoined else None

        # Shutdown: SIGTERM everyone.
        exits = [n.terminate() for n in nodes]
        result["shutdown_max_s"] = round(max(s for _, s in exits), 3)
        result["clean_exit"] = all(code == 0 for code, _ in exits)
    finally:
        for node in nodes:
            node.kill()
    result["cpu_count"] = os.cpu_count()
    result["loadavg_1m"] = os.getloadavg()[0]
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
