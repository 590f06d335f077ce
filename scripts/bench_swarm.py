"""Isolated nodes vs a swarm, same steps and compute per node; prints ONE JSON object.

Isolated: 4 nodes, 8 local / 0 external groups per step, no sharing, no merges.
Swarm:    4 nodes, 8 local / 0 external groups per step, AdamW, DiLoCo merges in 4 s wall-clock rounds
          overlapped with training. --swarm-local 4 --swarm-external 4 adds SAPO rollout sharing;
          --optimizer demo trains with DeMo and gossips its components (best with --outer-lr 1.0
          --outer-momentum 0). --delta-codec sparse sends compressed pseudo-gradients (~0.018 B/param;
          outer lr 1.0, momentum 0 unless told otherwise).
Task: reverse-exact (binary reward); --family reverse gives the same questions with partial credit.
Each node trains on 8 groups per step in both arms. The isolated arm is deterministic (seeded sampling,
no network): a rerun gives the same cumulative reward to the last bit.

    nice -n 5 python scripts/bench_swarm.py --steps 600 --out runs/bench-swarm
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from swarmnode.localswarm import SwarmPlan, run_swarm
from swarmnode.swarmreport import read_metrics

# Binary reward (SAPO's regime: a group whose answers are all wrong carries no signal), on the tiny
# model warmed up so that every word length is hit now and then (swarmnode.tinymodel.WARMUP_STEPS).
BENCH_FAMILY = "reverse-exact"
# reverse-exact, 600 steps, isolated AdamW nodes: lr 3e-4 gave the most cumulative reward of
# 2e-4 / 3e-4 / 6e-4 / 1e-3 (219.7 / 222.7 / 170.9 / 112.7); both arms use it unless told otherwise.
DEFAULT_LR = {"adamw": 3e-4, "demo": 5e-4}


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def _read(plan: SwarmPlan) -> list[list[dict[str, Any]]]:
    return [read_metrics(plan.out / f"node{i}" / "metrics.jsonl") for i in range(plan.nodes)]


def _arm(plan: SwarmPlan) -> list[list[dict[str, Any]]]:
    if plan.out.exists():
        import shutil

        shutil.rmtree(plan.out)  # metrics files append: a previous run's rows must not count
    run_swarm(plan, live=False)
    return _read(plan)


def _merges(rows_per_node: list[list[dict[str, Any]]]) -> list[dict[str, float]]:
    """Per DiLoCo round: replica distance before the merge (spread of the replicas' Δs, which each
    contributor computes over the same set) and after it.

    After the merge every replica sits on the same new anchor plus the progress p_i it made while the
    round collected (carried over), so the mean distance to the mean replica is mean‖p_i − p̄‖, which
    is at most sqrt(mean‖p_i‖²): that bound, from each node's reported ‖p_i‖, is what we report.
    """
    by_round: dict[int, dict[str, list[Any]]] = {}
    for rows in rows_per_node:
        prev = 0
        for r in rows:
            if r.get("merges", 0) > prev and r.get("replica_distance_before_merge") is not None:
                d = by_round.setdefault(int(r["round"]), {"before": [], "carried": [], "anchors": []})
                d["before"].append(r["replica_distance_before_merge"])
                d["carried"].append(r.get("carried_progress") or 0.0)
                d["anchors"].append(r.get("anchor_hash"))
            prev = r.get("merges", prev)
    out = []
    for rnd in sorted(by_round):
        d = by_round[rnd]
        if len(d["before"]) < 2:
            continue  # a round only one node merged tells nothing about distances between replicas
        out.append(
            {
                "round": rnd,
                "before": _mean(d["before"]),
                "after": math.sqrt(_mean([c * c for c in d["carried"]])),
                "anchors": len(set(d["anchors"])),
            }
        )
    return out


def _summary(rows_per_node: list[list[dict[str, Any]]]) -> dict[str, Any]:
    # the final row (``train/final``) is written once the round in flight merged: not a step
    cum = [
        sum(r["reward"] for r in rows if r.get("reward") is not None and not r.get("train/final"))
        for rows in rows_per_node
    ]
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
    merges = _merges(rows_per_node)
    finals = {rows[-1].get("anchor_hash") for rows in rows_per_node if rows}
    return {
        "cumulative_reward": _mean(cum),
        "eval_acc": _mean([a for a in acc if a is not None]),
        "steps": min(steps) if steps else 0,
        "bytes_per_node_per_step": _mean(sent),
        "blocked_pct_max": max(blocked) if blocked else 0.0,
        "replica_distance_before_merge": _mean([m["before"] for m in merges]),
        "replica_distance_after_merge": _mean([m["after"] for m in merges]),
        "merges": len(merges),
        "merges_where_distance_dropped": sum(1 for m in merges if m["after"] < m["before"]),
        "merges_with_equal_anchors": sum(1 for m in merges if m["anchors"] == 1),
        "final_anchors_equal": len(finals) == 1 and "" not in finals,
        "demo_peers_used_per_step": _mean(
            [rows[-1].get("demo_peers_used", 0) / max(1, rows[-1]["step"]) for rows in rows_per_node if rows]
        ),
        "delta_bytes_per_round": max(
            (r.get("diloco_delta_bytes", 0) for rows in rows_per_node for r in rows[-1:]), default=0
        ),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--merge-every", type=int, default=0, help="step-based rounds of H steps instead")
    ap.add_argument("--round-seconds", type=float, default=4.0, help="wall-clock DiLoCo round length")
    ap.add_argument("--out", type=Path, default=Path("runs/bench-swarm"))
    ap.add_argument("--model", default="")
    ap.add_argument("--optimizer", choices=["demo", "adamw"], default="adamw", help="the swarm arm's")
    ap.add_argument("--lr", type=float, default=0.0, help="swarm arm (default: 5e-4 demo, 3e-4 adamw)")
    ap.add_argument(
        "--isolated-optimizer",
        choices=["adamw", "demo"],
        default="adamw",
        help="the isolated arm's (demo: DeMo alone, no gossip: a reference for a DeMo swarm)",
    )
    ap.add_argument(
        "--isolated-lr", type=float, default=0.0, help="the isolated arm's lr (default: the swarm's)"
    )
    ap.add_argument("--collect-seconds", type=float, default=2.0)
    ap.add_argument(
        "--delta-codec",
        choices=["int8", "sparse", "sparse-dct"],
        default="int8",
        help="the swarm arm's pseudo-gradient codec (sparse: top-k, 2-bit values, error feedback)",
    )
    ap.add_argument(
        "--outer-lr",
        type=float,
        default=None,
        help="DiLoCo outer (Nesterov) lr (default: 0.7 int8, 1.0 sparse)",
    )
    ap.add_argument(
        "--outer-momentum",
        type=float,
        default=None,
        help="DiLoCo outer momentum (default: 0.9 int8, 0 sparse)",
    )
    ap.add_argument("--swarm-local", type=int, default=8, help="swarm arm: local groups per step")
    ap.add_argument(
        "--swarm-external", type=int, default=0, help="swarm arm: external (shared) groups per step"
    )
    ap.add_argument(
        "--family",
        default=BENCH_FAMILY,
        help="task family of both arms (reverse: the same questions with partial credit)",
    )
    ap.add_argument(
        "--external-prefer", choices=["best", "fresh"], default="best", help="swarm arm's replay order"
    )
    ap.add_argument("--arms", default="isolated,swarm", help="which arms to run (comma separated)")
    args = ap.parse_args()
    sparse = args.delta_codec != "int8"  # the codec's own defaults (swarmnode.config DiLoCoConfig)
    if args.outer_lr is None:
        args.outer_lr = 1.0 if sparse else 0.7
    if args.outer_momentum is None:
        args.outer_momentum = 0.0 if sparse else 0.9
    lr = args.lr or DEFAULT_LR[args.optimizer]
    isolated_lr = args.isolated_lr or (
        lr if args.optimizer == args.isolated_optimizer else DEFAULT_LR[args.isolated_optimizer]
    )
    model = args.model
    if not model:
        from swarmnode.tinymodel import build_tiny_policy

        model = str(build_tiny_policy(args.out / "tiny-model", family=args.family))
    common = ["--eval-every", str(max(1, args.steps // 3)), "--eval-prompts", "200", "--family", args.family]
    isolated = SwarmPlan(
        nodes=args.nodes,
        steps=args.steps,
        out=args.out / "isolated",
        model=model,
        swarm="bench-isolated",
        merge_every=0,
        round_seconds=0.0,  # no merges: each node alone
        node_args=[
            *common,
            "--local-groups",
            "8",
            "--external-groups",
            "0",
            "--no-share-rollouts",
            "--optimizer",
            args.isolated_optimizer,
            "--no-gossip",
            "--lr",
            str(isolated_lr),
        ],
    )
    swarm = SwarmPlan(
        nodes=args.nodes,
        steps=args.steps,
        out=args.out / "swarm",
        model=model,
        swarm="bench-swarm",
        merge_every=args.merge_every,
        round_seconds=0.0 if args.merge_every else args.round_seconds,
        node_args=[
            *common,
            "--local-groups",
            str(args.swarm_local),
            "--external-groups",
            str(args.swarm_external),
            "--optimizer",
            args.optimizer,
            "--lr",
            str(lr),
            "--collect-seconds",
            str(args.collect_seconds),
            "--outer-lr",
            str(args.outer_lr),
            "--outer-momentum",
            str(args.outer_momentum),
            "--delta-codec",
            args.delta_codec,
            "--external-prefer",
            args.external_prefer,
        ],
    )
    arms = set(args.arms.split(","))
    iso = _summary(_arm(isolated) if "isolated" in arms else _read(isolated))
    swa = _summary(_arm(swarm) if "swarm" in arms else _read(swarm))
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
        "family": args.family,
        "swarm_optimizer": args.optimizer,
        "round": f"{args.merge_every} steps" if args.merge_every else f"{args.round_seconds} s",
        "swarm_lr": lr,
        "isolated_optimizer": args.isolated_optimizer,
        "isolated_lr": isolated_lr,
        "delta_codec": args.delta_codec,
        "delta_bytes_per_round": swa.get("delta_bytes_per_round"),
        "outer_lr": args.outer_lr,
        "outer_momentum": args.outer_momentum,
        "swarm_groups": f"{args.swarm_local}/{args.swarm_external}",
        "external_prefer": args.external_prefer,
        "merges": swa["merges"],
        "merges_where_distance_dropped": swa["merges_where_distance_dropped"],
        "merges_with_equal_anchors": swa["merges_with_equal_anchors"],
        "final_anchors_equal": swa["final_anchors_equal"],
        "demo_peers_used_per_step": swa["demo_peers_used_per_step"],
    }
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
