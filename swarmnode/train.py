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
    """Builds policy, engine, optimizer and trainer; runs steps; saves and resumes checkpoints."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        from swarmnode.checkpoint import CheckpointManager
        from swarmnode.engines import make_engine
        from swarmnode.metrics import MetricsWriter
        from swarmnode.optim import build_optimizer
        from swarmnode.policy import load_policy
        from swarmnode.tasks import heldout_problems
        from swarmnode.trainer import GRPOConfig, Trainer

        self.args = args
        data_dir: Path = args.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        model_path = args.model
        if model_path is None:
            from swarmnode.tinymodel import build_tiny_policy

            model_path = str(build_tiny_policy(data_dir / "model", family=args.task))
        torch.manual_seed(args.seed)
        self.policy = load_policy(model_path, device="cpu")
        self.engine = make_engine("hf", self.policy)
        lr = args.lr if args.lr is not None else DEFAULT_LR[args.optimizer]
        self.config = GRPOConfig(
            task=args.task,
            seed=args.seed,
            group_size=args.group_size,
            local_groups=args.local_groups,
            external_groups=0,
            lr=lr,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
        )
        self.optimizer = build_optimizer(args.optimizer, self.policy.model.named_parameters(), self.config)
        self.metrics = MetricsWriter(data_dir / "metrics.jsonl")
        self.trainer = Trainer(self.policy, self.engine, self.optimizer, self.config, self.metrics)
        self.checkpoints = CheckpointManager(data_dir / "checkpoints", keep=3)
        self.heldout = heldout_problems(args.task, args.eval_n) if args.eval_n > 0 else []
        self.step = 0
        self.last_eval = float("nan")

    # --- checkpoints ----------------------------------------------------------------------------

    def save(self) -> None:
        import torch

        from swarmnode.checkpoint import optimizer_to_tensors

        opt_tensors, opt_meta = optimizer_to_tensors(self.optimizer)
        tensors = {f"model.{k}": v for k, v in self.policy.model.state_dict().items()}
        tensors.update(opt_tensors)
        tensors["rng.torch"] = torch.get_rng_state()
        state = {
            "seed": self.args.seed,
            "task": self.args.task,
            "optimizer_name": self.args.optimizer,
            "optimizer": opt_meta,
            "samples_seen": self.trainer.samples_seen,
            "last_eval": None if math.isnan(self.last_eval) else self.last_eval,
        }
        self.checkpoints.save(self.step, tensors, state)

    def resume(self) -> bool:
        import torch

        from swarmnode.checkpoint import optimizer_from_tensors

        loaded = self.checkpoints.load_latest()
        if loaded is None:
            return False
        step, tensors, state = loaded
        if state.get("optimizer_name") != self.args.optimizer or state.get("task") != self.args.task:
            raise ValueError(
                f"--data-dir {self.args.data_dir}: checkpoint was trained with optimizer "
                f"{state.get('optimizer_name')!r} on task {state.get('task')!r}; use a fresh data dir"
            )
        model_sd = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        self.policy.model.load_state_dict(model_sd)
        optimizer_from_tensors(self.optimizer, tensors, state["optimizer"])
        torch.set_rng_state(tensors["rng.torch"])
        self.trainer.samples_seen = int(state.get("samples_seen", 0))
        self.last_eval = float("nan") if state.get("last_eval") is None else float(state["last_eval"])
        self.step = step
        self.engine.update_weights(self.policy.model.named_parameters())
        return True

    # --- loop -----------------------------------------------------------------------------------

    def evaluate(self) -> float:
        self.last_eval = self.trainer.evaluate(self.heldout) if self.heldout else float("nan")
        self.metrics.write({"step": self.step, "eval_acc": self.last_eval})
        return self.last_eval

    def run_step(self) -> dict[str, float]:
        local = self.trainer.collect_local(self.step)
        m = self.trainer.train_step(local, [], step=self.step)
        self.step += 1
        return m

    def close(self) -> None:
        self.metrics.close()
        self.engine.close()


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
