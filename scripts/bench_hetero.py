"""Two cohorts of different tiny models: alone, merging within each cohort, and sharing rollouts across
cohorts on top; prints ONE JSON object.

Arms (the same nodes, steps and local groups per node in each; only the collaboration differs):
  isolated: every node alone (8 local groups per step, no sharing, no merges);
  merge:    each cohort merges within itself (DiLoCo, wall-clock rounds), no rollouts shared;
  share:    the same merges, plus verified rollouts borrowed from the whole swarm, up to 4 groups
            per step on top of the 8 local ones (the sharing policy takes other cohorts' groups
            first, and problems this node fails on; swarmnode.exchange.rollouts).
Task: reverse-exact (binary reward: a group whose answers are all wrong carries no signal). A cohort's
model is a tiny variant (swarmnode.tinymodel.TINY_VARIANT_RE): by default the wide tiny-128 and the
narrow tiny-64 warmed up for 200 steps instead of 400, so one cohort is much weaker than the other.

    nice -n 5 python scripts/bench_hetero.py --steps 600 --out runs/bench-hetero
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any

from swarmnode.localswarm import SwarmPlan, parse_mix, run_swarm
from swarmnode.swarmreport import read_metrics

FAMILY = "reverse-exact"
DEFAULT_COHORTS = "tiny-128:2,tiny-64-w200:2"


def _mean(xs: list[Any]) -> float:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else float("nan")


def _node(rows: list[dict[str, Any]]) -> dict[str, float]:
    steps = [r for r in rows if not r.get("train/final")]
    last = rows[-1] if rows else {}
    n = max(1, int(last.get("step", 0)))
    elapsed = float(last.get("elapsed_s") or 0.0)
    return {
        "cumulative_reward": sum(r["reward"] for r in steps if r.get("reward") is not None),
        "eval_acc": next((r["eval_acc"] for r in reversed(rows) if r.get("eval_acc") is not None), None),
        "steps": last.get("step", 0),
        # gossip published + pseudo-gradient blobs served to peers
        "bytes_per_step": (last.get("bytes_sent", 0) + last.get("blob_bytes_served", 0)) / n,
        "rollout_bytes_per_step": last.get("rollouts/bytes_sent", 0) / n,
        "borrowed_other_cohort_per_step": last.get("borrowed_other_cohort", 0) / n,
        "borrowed_same_cohort_per_step": last.get("borrowed_same_cohort", 0) / n,
        "merges": last.get("merges", 0),
        "blocked_pct": 100.0 * float(last.get("blocked_on_network_s") or 0.0) / elapsed if elapsed else 0.0,
    }


def _arm(plan: SwarmPlan, run: bool) -> dict[str, dict[str, float]]:
    if run:
        if plan.out.exists():
            shutil.rmtree(plan.out)  # metrics files append: a previous run's rows must not count
        run_swarm(plan, live=False)
    per_cohort: dict[str, list[dict[str, float]]] = {}
    for i, m in enumerate(plan.members()):
        rows = read_metrics(plan.out / f"node{i}" / "metrics.jsonl")
        per_cohort.setdefault(m.cohort, []).append(_node(rows))
    return {c: {k: _mean([n[k] for n in ns]) for k in ns[0]} for c, ns in per_cohort.items()}


def _gain(new: float, base: float) -> float:
    return round(100.0 * (new - base) / base, 1) if base > 0 else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cohorts", default=DEFAULT_COHORTS, help="local-swarm --mix of the swarm's nodes")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--round-seconds", type=float, default=4.0, help="wall-clock DiLoCo round length")
    ap.add_argument(
        "--merge-every",
        type=int,
        default=25,
        help="DiLoCo rounds of H steps instead (0: wall-clock rounds); the default keeps H equal in both "
        "merging arms, where the share arm's longer steps would otherwise shorten its rounds",
    )
    ap.add_argument("--collect-seconds", type=float, default=2.0)
    ap.add_argument("--lr", type=float, default=3e-4, help="AdamW, every node and arm")
    ap.add_argument("--local-groups", type=int, default=8)
    ap.add_argument("--external-groups", type=int, default=4, help="share arm: borrowed groups on top")
    ap.add_argument("--family", default=FAMILY)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-hetero"))
    ap.add_argument("--arms", default="isolated,merge,share", help="arms to run (the rest are read back)")
    ap.add_argument("--outer-lr", type=float, default=None, help="DiLoCo outer lr (default: the node's)")
    ap.add_argument(
        "--outer-momentum", type=float, default=None, help="DiLoCo outer momentum (default: the node's)"
    )
    args = ap.parse_args()

    mix = parse_mix(args.cohorts)
    from swarmnode.localswarm import _built

    for e in mix:
        e.model = _built(e.model, args.out, args.family)
    common = [
        *("--family", args.family, "--lr", str(args.lr), "--local-groups", str(args.local_groups)),
        *("--eval-every", str(max(1, args.steps // 3)), "--eval-prompts", "200"),
        *("--collect-seconds", str(args.collect_seconds)),
        *(("--outer-lr", str(args.outer_lr)) if args.outer_lr is not None else ()),
        *(("--outer-momentum", str(args.outer_momentum)) if args.outer_momentum is not None else ()),
    ]
    alone = ["--external-groups", "0", "--no-share-rollouts"]

    def plan(name: str, round_seconds: float, extra: list[str]) -> SwarmPlan:
        merges = round_seconds > 0
        return SwarmPlan(
            steps=args.steps,
            out=args.out / name,
            mix=[parse_mix(f"{e.model}:{e.count}")[0] for e in mix],
            swarm=f"bench-hetero-{name}",
            round_seconds=0.0 if args.merge_every else round_seconds,
            merge_every=args.merge_every if merges else 0,
            node_args=[*common, *extra],
        )

    plans = {
        "isolated": plan("isolated", 0.0, alone),
        "merge": plan("merge", args.round_seconds, alone),
        "share": plan("share", args.round_seconds, ["--external-groups", str(args.external_groups)]),
    }
    labels = {e.model: e.label for e in mix}
    wanted = set(args.arms.split(","))
    arms = {
        name: {labels[c]: v for c, v in _arm(p, name in wanted).items()}  # cohorts by their mix names
        for name, p in plans.items()
    }
    cohorts = list(dict.fromkeys(e.label for e in mix))
    result: dict[str, Any] = {
        "family": args.family,
        "steps": args.steps,
        "cohorts": args.cohorts,
        "round": f"{args.merge_every} steps" if args.merge_every else f"{args.round_seconds} s",
        "groups": f"{args.local_groups} local, +{args.external_groups} borrowed in the share arm",
        "lr": args.lr,
        "outer": {"lr": args.outer_lr, "momentum": args.outer_momentum},  # None: the node's defaults
    }
    for c in cohorts:
        iso, mer, sha = (arms[a][c] for a in ("isolated", "merge", "share"))
        result[c] = {
            "cumulative_reward": {a: round(arms[a][c]["cumulative_reward"], 1) for a in arms},
            "eval_acc": {a: arms[a][c]["eval_acc"] for a in arms},
            "gain_share_over_merge_pct": _gain(sha["cumulative_reward"], mer["cumulative_reward"]),
            "gain_merge_over_isolated_pct": _gain(mer["cumulative_reward"], iso["cumulative_reward"]),
            "gain_share_over_isolated_pct": _gain(sha["cumulative_reward"], iso["cumulative_reward"]),
            "bytes_per_node_per_step": {a: round(arms[a][c]["bytes_per_step"]) for a in ("merge", "share")},
            "rollout_bytes_per_node_per_step": round(sha["rollout_bytes_per_step"]),
            "borrowed_per_step_other_cohort": round(sha["borrowed_other_cohort_per_step"], 2),
            "borrowed_per_step_same_cohort": round(sha["borrowed_same_cohort_per_step"], 2),
            "merges": {a: arms[a][c]["merges"] for a in ("merge", "share")},
            "blocked_on_network_pct": {a: round(arms[a][c]["blocked_pct"], 2) for a in ("merge", "share")},
            "steps": {a: arms[a][c]["steps"] for a in arms},
        }
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
