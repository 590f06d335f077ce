"""``swarmnode local-swarm``: N real ``swarmnode run`` processes on 127.0.0.1, a live status table,
and a summary (JSON + PNG) of how each node learned.

Each node is its own OS process with its own port and data dir, exactly as on separate machines;
node 0's printed multiaddr is the bootstrap address of the others (any node would do).

A swarm can mix models (each its own cohort: DiLoCo merges within it, rollouts cross every cohort),
optimizers and speeds (``--mix tiny-64:2,tiny-128:1,tiny-128:1:slow=3``); the default run also starts
one node alone (its own swarm id, no sharing, no merges, the same model and share of the cores) so
the summary and plot show what joining buys.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import IO, Any

from swarmnode.config import check_swarm_id
from swarmnode.swarmreport import status_table, summarize, summary_lines

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
# Nodes the default demo runs alone beside the swarm, for the side-by-side picture.
DEMO_ALONE = 1
# A throttled node runs in slices of this long, stopped (SIGSTOP) for (slow - 1) slices in between:
# a machine `slow` times slower, whose idle share of the cores goes to the others.
THROTTLE_SLICE_S = 0.1


@dataclass(kw_only=True, slots=True)
class MixEntry:
    """``count`` nodes of one kind: a model (a tiny variant name, a dir or a hub id), an optional
    optimizer, a slowdown factor, and extra `run` flags."""

    model: str
    count: int = 1
    optimizer: str = ""  # "" : the run default
    slow: float = 1.0
    args: list[str] = field(default_factory=list)
    label: str = ""  # the cohort's name in the table and plot (default: the model as given)

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("mix: every entry needs a model")
        if not 1 <= self.count <= 64:
            raise ValueError(f"mix: count must be in 1..64, got {self.count}")
        if self.optimizer not in ("", "adamw", "demo"):
            raise ValueError(f"mix: optimizer must be adamw or demo, got {self.optimizer!r}")
        if not 1.0 <= self.slow <= 100.0:
            raise ValueError(f"mix: slow must be in [1, 100], got {self.slow}")
        self.label = self.label or self.model


def parse_mix(text: str) -> list[MixEntry]:
    """``MODEL[:COUNT][:OPTION...]`` entries, comma separated. Options: ``adamw`` / ``demo`` (the
    optimizer), ``slow=F`` (throttled F times), ``KEY=VALUE`` (``--KEY VALUE`` for those nodes' run).

    >>> [(e.model, e.count, e.slow) for e in parse_mix("tiny-64:2,tiny-128:1:slow=3")]
    [('tiny-64', 2, 1.0), ('tiny-128', 1, 3.0)]
    """
    entries = []
    for raw in text.split(","):
        parts = [p.strip() for p in raw.strip().split(":")]
        if not parts[0]:
            raise ValueError(f"mix: empty entry in {text!r}")
        model, rest = parts[0], parts[1:]
        count = 1
        if rest and rest[0].isdigit():
            count = int(rest.pop(0))
        optimizer, slow, args = "", 1.0, []
        for opt in rest:
            key, eq, value = opt.partition("=")
            if not eq and key in ("adamw", "demo"):
                optimizer = key
            elif key == "slow" and eq:
                try:
                    slow = float(value)
                except ValueError:
                    raise ValueError(f"mix: slow must be a number, got {value!r}") from None
            elif eq and key and value:
                args += [f"--{key}", value]
            else:
                raise ValueError(f"mix: unknown option {opt!r} in {raw!r} (adamw, demo, slow=F or KEY=VALUE)")
        entries.append(MixEntry(model=model, count=count, optimizer=optimizer, slow=slow, args=args))
    return entries


@dataclass(kw_only=True, slots=True)
class Member:
    """One node of a plan, resolved."""

    model: str
    cohort: str  # label shown for its cohort (its model)
    args: list[str]
    slow: float = 1.0
    alone: bool = False
    engine: str = ""

    @property
    def note(self) -> str:
        opt = self.args[self.args.index("--optimizer") + 1] if "--optimizer" in self.args else ""
        return " ".join(
            x
            for x in ("alone" if self.alone else "", opt, f"slow x{self.slow:g}" if self.slow > 1 else "")
            if x
        )


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
    # Kinds of nodes; empty: `nodes` nodes of `model`. Given: `nodes` is their total.
    mix: list[MixEntry] = field(default_factory=list)
    # Nodes run alone beside the swarm, each a copy of node 0's kind: its own swarm id, no rollout
    # sharing, no merges, the same share of the cores (the local-swarm command's default is 1).
    alone: int = 0
    start_timeout_s: float = 120.0
    # After --duration, nodes get this long to finish their step and exit before being stopped.
    overrun_s: float = 60.0

    def __post_init__(self) -> None:
        if self.mix:
            self.nodes = sum(e.count for e in self.mix)
        if not 0 <= self.alone <= 8:
            raise ValueError(f"alone must be in 0..8, got {self.alone}")
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
        check_swarm_id(f"{self.swarm}-alone{self.nodes + self.alone}", "swarm")  # the alone nodes' ids

    def members(self) -> list[Member]:
        """Every node of the plan in start order: the swarm's (node 0 first), then the alone ones."""
        out: list[Member] = []
        for e in self.mix or [
            MixEntry(model=self.model or "tiny", count=self.nodes, label=_label(self.model))
        ]:
            opt = ["--optimizer", e.optimizer] if e.optimizer else []
            out += [
                Member(model=e.model, cohort=e.label, args=[*opt, *e.args], slow=e.slow)
                for _ in range(e.count)
            ]
        for i, m in enumerate(out[: len(self.engines)]):
            m.engine = self.engines[i]
        first = out[0]
        out += [
            Member(
                model=first.model, cohort=first.cohort, args=list(first.args), alone=True, engine=first.engine
            )
            for _ in range(self.alone)
        ]
        return out


def _label(model: str) -> str:
    return Path(model).name if model else "tiny"


@dataclass(slots=True)
class NodeProc:
    index: int
    proc: subprocess.Popen[str]
    data_dir: Path
    log: IO[str]
    multiaddr: str = ""
    cohort: str = ""
    note: str = ""  # alone, optimizer, throttle
    alone: bool = False

    @property
    def metrics_path(self) -> Path:
        return self.data_dir / "metrics.jsonl"


def _node_command(plan: SwarmPlan, index: int, data_dir: Path, bootstrap: str) -> list[str]:
    members = plan.members()
    me = members[index]
    swarm = f"{plan.swarm}-alone{index}" if me.alone else plan.swarm
    cmd = [sys.executable, "-m", "swarmnode.cli", "run", "--data-dir", str(data_dir)]
    cmd += ["--listen", "/ip4/127.0.0.1/tcp/0", "--swarm", swarm]
    if me.model and (plan.mix or plan.model):
        cmd += ["--model", me.model]
    if plan.steps:
        cmd += ["--steps", str(plan.steps)]
    if plan.duration_s:
        cmd += ["--duration", str(plan.duration_s)]
    if bootstrap and not me.alone:
        cmd += ["--bootstrap", bootstrap]
    if me.engine:
        cmd += ["--engine", me.engine]
    # Different sampling seeds per node: identical nodes would generate identical rollouts.
    cmd += ["--seed", str(index)]
    if me.alone:
        cmd += ["--no-share-rollouts", "--expect-peers", "0"]
        return cmd + TINY_MODEL_ARGS + me.args + plan.node_args
    if plan.round_seconds:
        cmd += ["--diloco", "--round-seconds", str(plan.round_seconds)]
    elif plan.merge_every:
        cmd += ["--diloco", "--inner-steps", str(plan.merge_every)]
    # Hear every other node of the cohort (same model) before the first step, so round 1 already
    # merges all of them.
    peers = sum(1 for m in members if not m.alone and m.model == me.model) - 1
    cmd += ["--expect-peers", str(peers)]
    return cmd + TINY_MODEL_ARGS + me.args + plan.node_args


def _start(plan: SwarmPlan, index: int, bootstrap: str, node_cmd: list[str] | None) -> NodeProc:
    data_dir = plan.out / f"node{index}"
    data_dir.mkdir(parents=True, exist_ok=True)
    cmd = _node_command(plan, index, data_dir, bootstrap)
    if node_cmd is not None:  # tests substitute a stand-in for `swarmnode run`
        cmd = [*node_cmd, *cmd[4:]]
    log = (data_dir / "node.log").open("w", encoding="utf-8")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # N processes on one machine: split the cores instead of every process using all of them.
    total = plan.nodes + plan.alone
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // total)))
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    me = plan.members()[index]
    return NodeProc(
        index=index, proc=proc, data_dir=data_dir, log=log, cohort=me.cohort, note=me.note, alone=me.alone
    )


class Throttle:
    """Makes a node ``slow`` times slower: SIGCONT for one slice, SIGSTOP for ``slow - 1``."""

    def __init__(self, proc: subprocess.Popen[str], slow: float, slice_s: float = THROTTLE_SLICE_S) -> None:
        self.proc, self.slow, self.slice_s = proc, slow, slice_s
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"throttle-{proc.pid}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(self.slice_s) and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGSTOP)
            stopped = self._done.wait(self.slice_s * (self.slow - 1))
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGCONT)
            if stopped:
                break

    def stop(self) -> None:
        """Leave the process running (it must be, to handle SIGTERM)."""
        self._done.set()
        self._thread.join()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)


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
    throttles: list[Throttle] = []
    members = plan.members()
    try:
        nodes.append(_start(plan, 0, "", node_cmd))
        nodes[0].multiaddr = wait_multiaddr(nodes[0], plan.start_timeout_s)
        for i in range(1, len(members)):
            nodes.append(_start(plan, i, nodes[0].multiaddr, node_cmd))
        throttles = [Throttle(n.proc, m.slow) for n, m in zip(nodes, members, strict=True) if m.slow > 1]
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
        for t in throttles:
            t.stop()
        stop_all(nodes)
    if live:
        print(status_table(nodes))
    summary = summarize(nodes, plan.out)
    if live:
        print("\n".join(summary_lines(summary)))
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
    a(
        "--mix",
        default="",
        metavar="SPEC",
        help="kinds of nodes instead of --nodes: MODEL[:COUNT][:OPTION...], comma separated; MODEL is a "
        "tiny variant (tiny-64, tiny-128, tiny-64x3, tiny-64-w100: built locally), a dir or a hub id, each "
        "model its own cohort; OPTION is adamw or demo, slow=F (throttled F times) or KEY=VALUE (--KEY VALUE "
        "for those nodes), e.g. tiny-64:2,tiny-128:1,tiny-128:1:slow=3",
    )
    a(
        "--alone",
        type=int,
        default=DEMO_ALONE,
        metavar="N",
        help="nodes run alone beside the swarm (node 0's kind, no sharing, no merges) to compare with "
        "(default: %(default)s)",
    )
    a("node_args", nargs=argparse.REMAINDER, help="after --: extra flags passed to every `swarmnode run`")


def main(args: argparse.Namespace) -> int:
    steps, duration = args.steps, args.duration
    if steps == 0 and duration == 0:
        duration = DEMO_DURATION_S
    engines = [e.strip() for e in args.engines.split(",")] if args.engines else []
    try:
        mix = parse_mix(args.mix) if args.mix else []
        family = _family(args.node_args)
        for e in mix:
            e.model = _built(e.model, Path(args.out), family)
    except ValueError as exc:
        print(f"swarmnode local-swarm: {exc}", file=sys.stderr)
        return 2
    model = args.model
    if not model and "vllm" in engines:
        from swarmnode.tinymodel import build_vllm_tiny_policy

        model = str(build_vllm_tiny_policy(Path(args.out) / "tiny-model-vllm", family=family))
    elif not model and not mix:
        from swarmnode.tinymodel import build_tiny_policy

        model = str(build_tiny_policy(Path(args.out) / "tiny-model", family=family))
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
            mix=mix,
            alone=args.alone,
        )
    except ValueError as exc:
        print(f"swarmnode local-swarm: {exc}", file=sys.stderr)
        return 2
    summary = run_swarm(plan)
    return 0 if all(n["exit_code"] == 0 for n in summary["nodes"]) else 1


def _family(node_args: list[str]) -> str:
    """The task family the nodes will run (the last --family after --, else the tiny default)."""
    family = TINY_FAMILY
    for i, a in enumerate(node_args[:-1]):
        if a == "--family":
            family = node_args[i + 1]
    return family


def _built(model: str, out: Path, family: str) -> str:
    """A tiny variant name becomes its locally built dir; anything else is a dir or hub id already."""
    from swarmnode.tinymodel import build_tiny_variant, tiny_variant

    if tiny_variant(model) is None:
        return model
    return str(build_tiny_variant(out / "tiny-models" / f"{model}-{family}", model, family=family))
