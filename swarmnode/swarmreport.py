"""What a local swarm shows: the live status table, the summary JSON and the PNG plot, read from each
node's metrics file."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from swarmnode.localswarm import NodeProc


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Rows written so far; a half-written last line (the node is still writing) is skipped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _fmt(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def status_table(nodes: list[NodeProc]) -> str:
    lines = [
        f"{'node':>4} {'state':>7} {'step':>5} {'reward':>7} {'acc':>6} {'peers':>5} {'ext':>5} {'merges':>6}"
    ]
    for n in nodes:
        rows = read_metrics(n.metrics_path)
        last = rows[-1] if rows else {}
        accs = [r["eval_acc"] for r in rows if r.get("eval_acc") is not None]
        code = n.proc.poll()
        state = "running" if code is None else f"exit {code}"
        lines.append(
            f"{n.index:>4} {state:>7} {_fmt(last.get('step'), 'd'):>5} {_fmt(last.get('reward'), '.3f'):>7} "
            f"{_fmt(accs[-1] if accs else None, '.3f'):>6} {_fmt(last.get('peers'), 'd'):>5} "
            f"{_fmt(last.get('external_groups'), 'd'):>5} {_fmt(last.get('merges'), 'd'):>6}"
        )
    return "\n".join(lines)


def summarize(nodes: list[NodeProc], out: Path) -> dict[str, Any]:
    per_node = []
    for n in nodes:
        rows = read_metrics(n.metrics_path)
        rewards = [r["reward"] for r in rows if r.get("reward") is not None]
        accs = [r["eval_acc"] for r in rows if r.get("eval_acc") is not None]
        per_node.append(
            {
                "node": n.index,
                "exit_code": n.proc.returncode,
                "steps": rows[-1]["step"] if rows else 0,
                "cumulative_reward": sum(rewards),
                "mean_reward_first": rewards[0] if rewards else None,
                "mean_reward_last": rewards[-1] if rewards else None,
                "eval_acc_first": accs[0] if accs else None,
                "eval_acc_last": accs[-1] if accs else None,
                "external_groups": rows[-1].get("external_groups", 0) if rows else 0,
                "merges": rows[-1].get("merges", 0) if rows else 0,
                "anchor_hash": rows[-1].get("anchor_hash", "") if rows else "",
                "bytes_sent": rows[-1].get("bytes_sent", 0) if rows else 0,
            }
        )
    summary = {"nodes": per_node, "plot": str(out / "summary.png")}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot(nodes, out / "summary.png")
    return summary


REWARD_WINDOW = 50


def moving_average(xs: list[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values (fewer at the start)."""
    out, total = [], 0.0
    for i, x in enumerate(xs):
        total += x
        if i >= window:
            total -= xs[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot(nodes: list[NodeProc], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    fig, (ax_r, ax_a) = plt.subplots(1, 2, figsize=(11, 4))
    for n in nodes:
        rows = read_metrics(n.metrics_path)
        if not rows:
            continue
        t0 = rows[0]["time"] - rows[0].get("step_s", 0.0)
        scored = [r for r in rows if r.get("reward") is not None]
        ax_r.plot(
            [r["time"] - t0 for r in scored],
            moving_average([r["reward"] for r in scored], REWARD_WINDOW),
            label=f"node {n.index}",
        )
        ev = [r for r in rows if r.get("eval_acc") is not None]
        ax_a.plot(
            [r["time"] - t0 for r in ev],
            [r["eval_acc"] for r in ev],
            marker="o",
            markersize=3,
            label=f"node {n.index}",
        )
    # one step's reward is the mean of a few groups: too noisy to read a trend from unsmoothed
    ax_r.set(title=f"reward (mean of the last {REWARD_WINDOW} steps)", xlabel="seconds", ylabel="reward")
    ax_a.set(title="held-out accuracy (greedy)", xlabel="seconds", ylabel="accuracy", ylim=(0, 1))
    ax_r.legend()
    ax_a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
