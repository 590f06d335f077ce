"""Isolated nodes vs a swarm, same steps and compute per node; prints ONE JSON object.

Isolated: 4 nodes, 8 local / 0 external groups per step, no sharing, no merges.
Swarm:    4 nodes, 4 local / 4 external groups per step (SAPO), DeMo with component gossip (lr 2e-3,
          its sign step needs a larger lr than AdamW), DiLoCo merges every H steps.
Each node generates the same number of completions per step in both arms (4 + 4 = 8 groups trained).

    nice -n 10 python scripts/bench_swarm.py --steps 30 --out runs/bench-swarm
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from swarmnode.localswarm import TINY_FAMILY, SwarmPlan, read_metrics, run_swarm


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def _arm(plan: SwarmPlan) -> list[list[dict[str, Any]]]:
    run_swarm(plan, live=False)
    return [read_metrics(plan.out / f"node{i}" / "metrics.jsonl") for i in range(plan.nodes)]


def _summary(rows_per_node: list[list[dict[str, Any]]]) -> dict[str, float]:
    cum = [sum(r["reward"] for r in rows if r.get("reward") is not None) for rows in rows_per_node]
    acc = [
        next((r["eval_acc"] for r in reversed(rows) if r.get("eval_acc") is not None), None)
        for rows in rows_per_node
    ]
    steps = [rows[-1]["step"] if rows else 0 for rows in rows_per_node]
    # gossip published + blobs served to peers (pseudo-gradients), per step
    sent = [
        (rows[-1]["bytes_sent"] + rows[-1].get("blob_bytes_served", 0)) / max(1, rows[-1]["step"])
        if rows
        else 0
        for rows in rows_per_node
    ]
    blocked = [
        100.0 * rows[-1]["blocked_on_network_s"] / max(1e-9, rows[-1]["elapsed_s"]) if rows else 0.0
        for rows in rows_per_node
    ]
    before = [
        r["replica_distance_before_merge"]
        for rows in rows_per_node
        for r in rows
        if r.get("replica_distance_before_merge") is not None
    ]
    # After a merge every replica that averaged the same Δs sits on the same anchor: distance 0 if the
    # final anchor hashes agree, else unknown from metrics alone (reported as NaN).
    finals = {rows[-1].get("anchor_hash") for rows in rows_per_node if rows}
    after = 0.0 if len(finals) == 1 and "" not in finals else float("nan")
    return {
        "cumulative_reward": _mean(cum),
        "eval_acc": _mean([a for a in acc if a is not None]),
        "steps": min(steps) if steps else 0,
        "bytes_per_node_per_step": _mean(sent),
        "blocked_pct_max": max(blocked) if blocked else 0.0,
        "replica_distance_before_merge": _mean(before),
        "replica_distance_after_merge": after,
        "demo_peers_used_per_step": _mean(
            [rows[-1].get("demo_peers_used", 0) / max(1, rows[-1]["step"]) for rows in rows_per_node if rows]
        ),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--merge-every", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-swarm"))
    ap.add_argument("--model", default="")
    args = ap.parse_args()
    model = args.model
    if not model:
        from swarmnode.tinymodel import build_tiny_policy

        model = str(build_tiny_policy(args.out / "tiny-model", family=TINY_FAMILY))
    common = ["--eval-every", str(max(1, args.steps // 3))]
    isolated = SwarmPlan(
        nodes=args.nodes,
        steps=args.steps,
        out=args.out / "isolated",
        model=model,
        swarm="bench-isolated",
        merge_every=0,
        node_args=[*common, "--local-groups", "8", "--external-groups", "0", "--no-share-rollouts"],
    )
    swarm = SwarmPlan(
        nodes=args.nodes,
        steps=args.steps,
        out=args.out / "swarm",
        model=model,
        swarm="bench-swarm",
        merge_every=args.merge_every,
        node_args=[
            *common,
            "--local-groups",
            "4",
            "--external-groups",
            "4",
            "--optimizer",
            "demo",
            "--lr",
            "2e-3",
        ],
    )
    iso = _summary(_arm(isolated))
    swa = _summary(_arm(swarm))
    gain = (
        100.0
        * (swa["cumulative_reward"] - iso["cumulative_reward"])
        / max(1e-9, abs(iso["cumulative_reward"]))
    )
    result = {
        "nodes": args.nodes,
        "steps": args.steps,
        "cumulative_reward_isolated": iso["cumulative_reward"],
        "cumulative_reward_swarm": swa["cumulative_reward"],
        "gain_pct": gain,
        "eval_acc_isolated": iso["eval_acc"],
        "eval_acc_swarm": swa["eval_acc"],
        "bytes_per_node_per_step": swa["bytes_per_node_per_step"],
        "blocked_on_network_pct": swa["blocked_pct_max"],
        "replica_distance_before_merge": swa["replica_distance_before_merge"],
        "replica_distance_after_merge": swa["replica_distance_after_merge"],
        "demo_peers_used_per_step": swa["demo_peers_used_per_step"],
    }
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
