"""``swarmnode local-swarm``: N real ``swarmnode run`` processes on 127.0.0.1, a live status table,
and a summary (JSON + PNG) of how each node learned.

Each node is its own OS process with its own port and data dir, exactly as on separate machines;
node 0's printed multiaddr is the bootstrap address of the others (any node would do).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import IO, Any

from swarmnode.config import check_swarm_id
from swarmnode.swarmreport import status_table, summarize

# Printed by the daemon on start; the launcher greps for it to learn node 0's full address.
MULTIADDR_PREFIX = "swarmnode listening on "
STOP_GRACE_S = 20.0  # SIGTERM lets a node write its final checkpoint; SIGKILL after this
# The only settings local-swarm changes from the `run` defaults (which target real models) besides
# what the plan itself decides per node (data dir, listen address, swarm, model, steps/duration,
# bootstrap, engine, seed, DiLoCo rounds, expect-peers). Tuned for the tiny local model: AdamW 3e-4
# and short answers; on loopback a pseudo-gradient blob arrives in milliseconds, so a 3 s collection
# window only ever waits on a peer that is slow or gone (the 10 s default is for real networks).
# Given before node_args, so anything after `--` on the command line overrides them.
# reverse at AdamW 3e-4: the tiny model goes from ~14 % to ~47 % held-out accuracy in 3 minutes alone
# (scripts/bench_learning.py); lr 1e-3 collapses the policy onto one answer.
TINY_FAMILY = "reverse"
TINY_MODEL_ARGS = [
    "--family",
    TINY_FAMILY,
    "--lr",
    "3e-4",
    "--max-new-tokens",
    "8",
    "--collect-seconds",
    "3",
    "--eval-every",
    "20",  # each evaluation generates 64 greedy answers: not every 5th step (the config default)
    # the nodes start one after another, each loading its model: wait for all of them before step 1
    "--join-wait",
    "20",
]
# The default CPU demo: a time budget rather than a step count, since the processes share the cores;
# the tiny model needs a few hundred GRPO steps before held-out accuracy moves.
DEMO_DURATION_S = 240.0


@dataclass(kw_only=True, slots=True)
class SwarmPlan:
    """One local swarm; the defaults are `swarmnode local-swarm`'s (its flags read them from here)."""

    nodes: int = 4
    steps: int = 0
    duration_s: float = 0.0
    out: Path = Path("runs/local-swarm")
    model: str = ""  # empty: the tiny model, built locally
    swarm: str = "local"
    # DiLoCo wall-clock rounds of this many seconds: every node publishes at the same moment, however
    # far apart their step counts drift
    round_seconds: float = 8.0
    # > 0: rounds of this many steps (H) instead, and round_seconds is unused; both 0: share rollouts only
    merge_every: int = 0
    node_args: list[str] = field(default_factory=list)
    # One rollout engine per node ("hf" or "vllm"), or empty: every node on the `run` default.
    engines: list[str] = field(default_factory=list)
    start_timeout_s: float = 120.0
    # After --duration, nodes get this long to finish their step and exit before being stopped.
    overrun_s: float = 60.0

    def __post_init__(self) -> None:
        if not 1 <= self.nodes <= 64:
            raise ValueError(f"nodes must be in 1..64, got {self.nodes}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.round_seconds < 0:
            raise ValueError(f"round seconds must be >= 0, got {self.round_seconds}")
        if self.merge_every < 0:
            raise ValueError(f"merge_every must be >= 0, got {self.merge_every}")
        if self.merge_every:
            self.round_seconds = 0.0  # step rounds win
        if self.duration_s < 0:
            raise ValueError(f"duration must be >= 0, got {self.duration_s}")
        if self.steps == 0 and self.duration_s == 0:
            raise ValueError("give --steps or --duration (or neither, for the default demo)")
        if self.engines and len(self.engines) != self.nodes:
            raise ValueError(f"engines must name one engine per node ({self.nodes}), got {self.engines}")
        if any(e not in ("hf", "vllm") for e in self.engines):
            raise ValueError(f"engines must each be 'hf' or 'vllm', got {self.engines}")
        check_swarm_id(self.swarm, "swarm")


@dataclass(slots=True)
class NodeProc:
    index: int
    proc: subprocess.Popen[str]
    data_dir: Path
    log: IO[str]
    multiaddr: str = ""

    @property
    def metrics_path(self) -> Path:
        return self.data_dir / "metrics.jsonl"


def _node_command(plan: SwarmPlan, index: int, data_dir: Path, bootstrap: str) -> list[str]:
    cmd = [sys.executable, "-m", "swarmnode.cli", "run", "--data-dir", str(data_dir)]
    cmd += ["--listen", "/ip4/127.0.0.1/tcp/0", "--swarm", plan.swarm]
    if plan.model:
        cmd += ["--model", plan.model]
    if plan.steps:
        cmd += ["--steps", str(plan.steps)]
    if plan.duration_s:
        cmd += ["--duration", str(plan.duration_s)]
    if bootstrap:
        cmd += ["--bootstrap", bootstrap]
    if plan.engines:
        cmd += ["--engine", plan.engines[index]]
    # Different sampling seeds per node: identical nodes would generate identical rollouts.
    cmd += ["--seed", str(index)]
    if plan.round_seconds:
        cmd += ["--diloco", "--round-seconds", str(plan.round_seconds)]
    elif plan.merge_every:
        cmd += ["--diloco", "--inner-steps", str(plan.merge_every)]
    # Hear every other node before the first step, so round 1 already merges all of them.
    cmd += ["--expect-peers", str(plan.nodes - 1)]
    return cmd + TINY_MODEL_ARGS + plan.node_args


def _start(plan: SwarmPlan, index: int, bootstrap: str, node_cmd: list[str] | None) -> NodeProc:
    data_dir = plan.out / f"node{index}"
    data_dir.mkdir(parents=True, exist_ok=True)
    cmd = _node_command(plan, index, data_dir, bootstrap)
    if node_cmd is not None:  # tests substitute a stand-in for `swarmnode run`
        cmd = [*node_cmd, *cmd[4:]]
    log = (data_dir / "node.log").open("w", encoding="utf-8")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # N processes on one machine: split the cores instead of every process using all of them.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // plan.nodes)))
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    return NodeProc(index=index, proc=proc, data_dir=data_dir, log=log)


def wait_multiaddr(node: NodeProc, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    log_path = node.data_dir / "node.log"
    while time.monotonic() < deadline:
        for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith(MULTIADDR_PREFIX):
                return line[len(MULTIADDR_PREFIX) :].strip()
        if node.proc.poll() is not None:
            break
        time.sleep(0.1)
    tail = log_path.read_text(encoding="utf-8", errors="replace")[-2000:]
    raise RuntimeError(f"node {node.index} did not print its multiaddr within {timeout_s:.0f}s:\n{tail}")


def stop_all(nodes: list[NodeProc], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM every node (graceful: final checkpoint), then SIGKILL whoever is still there."""
    for n in nodes:
        if n.proc.poll() is None:
            n.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for n in nodes:
        try:
            n.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            n.proc.kill()
            n.proc.wait()
        n.log.close()


def run_swarm(plan: SwarmPlan, *, node_cmd: list[str] | None = None, live: bool = True) -> dict[str, Any]:
    plan.out.mkdir(parents=True, exist_ok=True)
    nodes: list[NodeProc] = []
    try:
        nodes.append(_start(plan, 0, "", node_cmd))
        nodes[0].multiaddr = wait_multiaddr(nodes[0], plan.start_timeout_s)
        for i in range(1, plan.nodes):
            nodes.append(_start(plan, i, nodes[0].multiaddr, node_cmd))
        # Bounded: steps/duration end every node; this is the backstop if one hangs.
        budget = plan.duration_s + plan.overrun_s if plan.duration_s else 3600.0 * 6
        deadline = time.monotonic() + budget
        last_print = 0.0
        while any(n.proc.poll() is None for n in nodes) and time.monotonic() < deadline:
            if live and time.monotonic() - last_print >= 2.0:
                table = status_table(nodes)
                if sys.stdout.isatty():
                    print("\x1b[H\x1b[J" + table, flush=True)
                else:
                    print(table + "\n", flush=True)
                last_print = time.monotonic()
            time.sleep(0.2)
    except KeyboardInterrupt:
        print("interrupted: stopping nodes", file=sys.stderr)
    finally:
        stop_all(nodes)
    if live:
        print(status_table(nodes))
    summary = summarize(nodes, plan.out)
    # Benchmarks call this with live=False and own stdout (one JSON object): report on stderr there.
    print(
        f"summary: {plan.out / 'summary.json'}  plot: {plan.out / 'summary.png'}",
        file=sys.stdout if live else sys.stderr,
    )
    return summary


def _default(name: str) -> Any:
    (f,) = [f for f in fields(SwarmPlan) if f.name == name]
    return f.default_factory() if f.default is MISSING else f.default  # type: ignore[operator]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Defaults are SwarmPlan's; the per-node `run` settings are the config's (swarmnode run --help).
    a = parser.add_argument
    a(
        "--nodes",
        type=int,
        default=_default("nodes"),
        metavar="N",
        help="number of nodes (default: %(default)s)",
    )
    a(
        "--steps",
        type=int,
        default=_default("steps"),
        metavar="N",
        help="training steps per node (default: %(default)s: run --duration)",
    )
    a(
        "--duration",
        type=float,
        default=_default("duration_s"),
        metavar="SECONDS",
        help=f"seconds per node, instead of --steps (neither: {DEMO_DURATION_S:g} s)",
    )
    a(
        "--out",
        type=Path,
        default=_default("out"),
        metavar="DIR",
        help="output directory (default: %(default)s)",
    )
    a(
        "--model",
        default=_default("model"),
        metavar="MODEL",
        help="model dir or hub id (default: the tiny model, built locally)",
    )
    a("--swarm", default=_default("swarm"), metavar="ID", help="swarm id (default: %(default)s)")
    a(
        "--round-seconds",
        type=float,
        default=_default("round_seconds"),
        metavar="SECONDS",
        help="DiLoCo round length in wall-clock seconds (default: %(default)s; 0 and no --merge-every: no merges)",
    )
    a(
        "--merge-every",
        type=int,
        default=_default("merge_every"),
        metavar="H",
        help="DiLoCo rounds of H steps instead of seconds (default: %(default)s: seconds)",
    )
    a(
        "--engines",
        default=",".join(_default("engines")),
        metavar="LIST",
        help="comma-separated rollout engine per node, e.g. vllm,hf,hf (default: the run default on every node); "
        "with vllm and no --model, the tiny model is built with a head size vLLM's CPU build accepts",
    )
    a("node_args", nargs=argparse.REMAINDER, help="after --: extra flags passed to every `swarmnode run`")


def main(args: argparse.Namespace) -> int:
    steps, duration = args.steps, args.duration
    if steps == 0 and duration == 0:
        duration = DEMO_DURATION_S
    engines = [e.strip() for e in args.engines.split(",")] if args.engines else []
    model = args.model
    if not model and "vllm" in engines:
        from swarmnode.tinymodel import build_vllm_tiny_policy

        model = str(build_vllm_tiny_policy(Path(args.out) / "tiny-model-vllm", family=TINY_FAMILY))
    elif not model:
        from swarmnode.tinymodel import build_tiny_policy

        model = str(build_tiny_policy(Path(args.out) / "tiny-model", family=TINY_FAMILY))
    extra = [a for a in args.node_args if a != "--"]
    try:
        plan = SwarmPlan(
            nodes=args.nodes,
            steps=steps,
            duration_s=duration,
            out=args.out,
            model=model,
            swarm=args.swarm,
            node_args=extra,
            engines=engines,
            merge_every=args.merge_every,
            round_seconds=args.round_seconds,
        )
    except ValueError as exc:
        print(f"swarmnode local-swarm: {exc}", file=sys.stderr)
        return 2
    summary = run_swarm(plan)
    return 0 if all(n["exit_code"] == 0 for n in summary["nodes"]) else 1
