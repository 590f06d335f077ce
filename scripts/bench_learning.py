"""Does one node learn? GRPO on the tiny model for N steps or M minutes; prints ONE JSON object.

Held-out accuracy (greedy exact match on --eval-n problems the training stream never draws) is measured
before and after; evaluation time is excluded from ``wall_s`` (the RL time).

    nice -n 5 python scripts/bench_learning.py --optimizer adamw --minutes 10
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    from swarmnode import train

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    train.add_arguments(parser)
    parser.set_defaults(steps=10**9, minutes=10.0, eval_every=0, checkpoint_every=0, no_progress=True)
    parser.add_argument("--window", type=int, default=10, help="steps averaged for reward_start/end")
    argv = sys.argv[1:]
    if "--data-dir" not in argv:
        # A fresh dir each run (the tiny model is cached under the shared default model dir).
        argv += ["--data-dir", tempfile.mkdtemp(prefix="bench-learning-")]
    args = parser.parse_args(argv)
    if args.model is None:
        from swarmnode.tinymodel import build_tiny_policy

        args.model = str(
            build_tiny_policy(Path(tempfile.gettempdir()) / f"swarmnode-tiny-{args.task}", family=args.task)
        )
    run = train.TrainRun(args)
    try:
        acc_start = run.evaluate()
        rewards: list[float] = []
        t0 = time.monotonic()
        deadline = t0 + args.minutes * 60 if args.minutes > 0 else float("inf")
        while run.step < args.steps and time.monotonic() < deadline:
            rewards.append(run.run_step()["reward"])
        wall = time.monotonic() - t0
        acc_end = run.evaluate()
    finally:
        run.close()
    w = max(1, min(args.window, len(rewards) // 2 or 1))
    print(
        json.dumps(
            {
                "task": args.task,
                "optimizer": args.optimizer,
                "lr": run.config.train.lr,
                "group_size": args.group_size,
                "local_groups": args.local_groups,
                "steps": run.step,
                "wall_s": round(wall, 1),
                "eval_n": len(run.learner.heldout),
                "eval_acc_start": acc_start,
                "eval_acc_end": acc_end,
                "reward_start": sum(rewards[:w]) / w if rewards else None,
                "reward_end": sum(rewards[-w:]) / w if rewards else None,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
