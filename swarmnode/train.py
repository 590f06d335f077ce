"""``swarmnode train``: one node, no peers — GRPO on a built-in task with AdamW or DeMo.

Restarting with the same ``--data-dir`` resumes from the newest valid checkpoint (model, optimizer
state, step, RNG); SIGINT/SIGTERM finish the step in flight, write a final checkpoint and exit.
Rollouts are seeded per step, so a resumed run draws the same problems an uninterrupted one would.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

# Measured on the tiny local model with scripts/bench_learning.py (add, G=8, I=8): AdamW 1e-3 and
# DeMo 2e-3 collapsed groups to one answer (rising zero-variance skips, falling reward) within a few
# hundred steps; AdamW 3e-4 and DeMo 5e-4 raised the mean reward steadily over 10 minutes.
DEFAULT_LR = {"adamw": 3e-4, "demo": 5e-4}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--task", default="reverse", help="task family (default reverse)")
    a("--steps", type=int, default=100, help="optimizer steps to reach (counting resumed ones)")
    a("--minutes", type=float, default=0.0, help="also stop after this much wall time (0: no limit)")
    a("--optimizer", choices=("adamw", "demo"), default="adamw")
    a("--data-dir", required=True, type=Path, help="checkpoints, metrics.jsonl, and model/ if built")
    a(
        "--model",
        default=None,
        help="HF model dir or hub id (default: build the tiny model into DATA_DIR/model)",
    )
    a("--seed", type=int, default=0)
    a("--lr", type=float, default=None, help="default: 3e-4 (adamw), 5e-4 (demo)")
    a("--group-size", type=int, default=8)
    a("--local-groups", type=int, default=8)
    a("--max-new-tokens", type=int, default=8)
    a("--temperature", type=float, default=1.0)
    a("--eval-every", type=int, default=20, help="steps between held-out evaluations (0: only at the end)")
    a("--eval-n", type=int, default=200, help="held-out problems per evaluation")
    a("--checkpoint-every", type=int, default=10, help="steps between checkpoints (0: only at exit)")
    a("--no-progress", action="store_true", help="no progress bar (logs and metrics only)")


class TrainRun:
    """One learner (``swarmnode.build.build_learner``, the same as a swarm node's) stepping alone;
    checkpoints and resume are the learner's."""

    def __init__(self, args: argparse.Namespace) -> None:
        from swarmnode.build import build_learner
        from swarmnode.config import load_config
        from swarmnode.metrics import MetricsWriter

        self.args = args
        data_dir: Path = args.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        lr = args.lr if args.lr is not None else DEFAULT_LR[args.optimizer]
        self.config = load_config(
            None,
            {
                "model.model": args.model or "tiny",
                "task.family": args.task,
                "task.seed": args.seed,
                "train.optimizer": args.optimizer,
                "train.lr": lr,
                "train.group_size": args.group_size,
                "train.local_groups": args.local_groups,
                "train.external_groups": 0,
                "train.max_new_tokens": args.max_new_tokens,
                "train.temperature": args.temperature,
                "train.eval_prompts": max(1, args.eval_n),
                "train.share_rollouts": False,
            },
        )
        self.metrics = MetricsWriter(data_dir / "metrics.jsonl")
        self.learner = build_learner(self.config, data_dir, tiny_dir=data_dir / "model", metrics=self.metrics)
        if args.eval_n <= 0:
            self.learner.heldout = []
        self.step = 0

    @property
    def last_eval(self) -> float:
        return self.learner.last_eval

    def save(self) -> None:
        self.learner.checkpoint(self.step, 0)

    def resume(self) -> bool:
        resumed = self.learner.resume()
        if resumed is None:
            return False
        self.step = resumed[0]
        return True

    def evaluate(self) -> float:
        acc = self.learner.evaluate()
        self.metrics.write({"step": self.step, "eval_acc": acc})
        return acc

    def run_step(self) -> dict[str, float]:
        local = self.learner.collect_local(self.step)
        m = self.learner.train_step(local, [], step=self.step)
        self.step += 1
        return m

    def close(self) -> None:
        self.metrics.close()
        self.learner.close()


def main(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    stop = {"flag": False}

    def request_stop(signum: int, _frame: Any) -> None:
        stop["flag"] = True  # finish the step in flight, then checkpoint and exit

    try:
        run = TrainRun(args)
    except (ValueError, KeyError, OSError) as exc:
        print(f"swarmnode train: {exc}", file=sys.stderr)
        return 2
    old = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    deadline = time.monotonic() + args.minutes * 60 if args.minutes > 0 else math.inf
    try:
        if run.resume():
            print(f"resumed from checkpoint at step {run.step}", flush=True)
        bar = tqdm(total=args.steps, initial=run.step, disable=args.no_progress, dynamic_ncols=True)
        while run.step < args.steps and not stop["flag"] and time.monotonic() < deadline:
            m = run.run_step()
            if args.eval_every and run.step % args.eval_every == 0:
                run.evaluate()
            bar.update(1)
            bar.set_postfix(reward=f"{m['reward']:.3f}", acc=f"{run.last_eval:.3f}")
            if args.checkpoint_every and run.step % args.checkpoint_every == 0:
                run.save()
        bar.close()
        if not stop["flag"]:
            acc = run.evaluate()
            print(f"step {run.step}: held-out accuracy {acc:.3f}", flush=True)
        run.save()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        run.close()
    return 130 if stop["flag"] else 0
