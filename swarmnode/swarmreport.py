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


def _kind(n: NodeProc) -> str:
    """The cohort column: the node's model, then alone / optimizer / throttle if any."""
    return " ".join(x for x in (n.cohort, n.note) if x) or "-"


def health(row: dict[str, Any]) -> str:
    """ "ok", or which channel keeps failing and why (``demo_health``, ``diloco_health``)."""
    problems = [
        f"{label}: {row[key]}"
        for key, label in (("demo_health", "demo"), ("diloco_health", "merge"))
        if row.get(key) not in (None, "ok")
    ]
    return "; ".join(problems) or "ok"


def status_table(nodes: list[NodeProc]) -> str:
    width = max([len(_kind(n)) for n in nodes] + [6])
    lines = [
        f"{'node':>4} {'cohort':<{width}} {'state':>7} {'step':>5} {'reward':>7} {'acc':>6} {'peers':>5} "
        f"{'ext':>5} {'merges':>6} health"
    ]
    for n in nodes:
        rows = read_metrics(n.metrics_path)
        last = rows[-1] if rows else {}
        accs = [r["eval_acc"] for r in rows if r.get("eval_acc") is not None]
        code = n.proc.poll()
        state = "running" if code is None else f"exit {code}"
        lines.append(
            f"{n.index:>4} {_kind(n):<{width}} {state:>7} {_fmt(last.get('step'), 'd'):>5} "
            f"{_fmt(last.get('reward'), '.3f'):>7} {_fmt(accs[-1] if accs else None, '.3f'):>6} "
            f"{_fmt(last.get('peers'), 'd'):>5} {_fmt(last.get('external_groups'), 'd'):>5} "
            f"{_fmt(last.get('merges'), 'd'):>6} {health(last)[:60]}"
        )
    return "\n".join(lines)


def _mean(xs: list[Any]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _pct(new: float | None, base: float | None) -> float | None:
    if new is None or base is None or base <= 0:
        return None
    return round(100.0 * (new - base) / base, 1)


def node_summary(n: NodeProc) -> dict[str, Any]:
    rows = read_metrics(n.metrics_path)
    # the final row (``train/final``) is written once the round in flight merged: not a step
    steps = [r for r in rows if not r.get("train/final")]
    rewards = [r["reward"] for r in steps if r.get("reward") is not None]
    accs = [r["eval_acc"] for r in rows if r.get("eval_acc") is not None]
    last = rows[-1] if rows else {}
    elapsed = float(last.get("elapsed_s") or 0.0)
    return {
        "node": n.index,
        "cohort": n.cohort,
        "role": "alone" if n.alone else "swarm",
        "note": n.note,
        "exit_code": n.proc.returncode,
        "steps": last.get("step", 0),
        "cumulative_reward": sum(rewards),
        "mean_reward_first": rewards[0] if rewards else None,
        "mean_reward_last": rewards[-1] if rewards else None,
        # the last REWARD_WINDOW steps: a steadier "where it ended" than one step's reward
        "mean_reward_end": _mean(rewards[-REWARD_WINDOW:]),
        "eval_acc_first": accs[0] if accs else None,
        "eval_acc_last": accs[-1] if accs else None,
        "external_groups": last.get("external_groups", 0),
        "merges": last.get("merges", 0),
        "anchor_hash": last.get("anchor_hash", ""),
        "bytes_sent": last.get("bytes_sent", 0),
        "samples": last.get("samples", None),
        "elapsed_s": elapsed,
        "blocked_on_network_pct": 100.0 * float(last.get("blocked_on_network_s") or 0.0) / elapsed
        if elapsed
        else 0.0,
    }


def by_cohort(per_node: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Means per (cohort, role): "tiny-64" for the swarm's nodes of that model, "tiny-64 alone" for
    the nodes that ran alone."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for n in per_node:
        key = n["cohort"] + (" alone" if n["role"] == "alone" else "")
        groups.setdefault(key, []).append(n)
    return {
        key: {
            "nodes": [n["node"] for n in ns],
            "steps": _mean([n["steps"] for n in ns]),
            "cumulative_reward": _mean([n["cumulative_reward"] for n in ns]),
            "mean_reward_end": _mean([n["mean_reward_end"] for n in ns]),
            "eval_acc_last": _mean([n["eval_acc_last"] for n in ns]),
        }
        for key, ns in groups.items()
    }


def swarm_vs_alone(cohorts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """For each cohort that also ran alone: the swarm's nodes against the alone node(s), same time."""
    out = {}
    for key, alone in cohorts.items():
        if not key.endswith(" alone") or key[: -len(" alone")] not in cohorts:
            continue
        swarm = cohorts[key[: -len(" alone")]]
        out[key[: -len(" alone")]] = {
            "cumulative_reward_swarm": swarm["cumulative_reward"],
            "cumulative_reward_alone": alone["cumulative_reward"],
            "cumulative_reward_gain_pct": _pct(swarm["cumulative_reward"], alone["cumulative_reward"]),
            "eval_acc_swarm": swarm["eval_acc_last"],
            "eval_acc_alone": alone["eval_acc_last"],
            "mean_reward_end_swarm": swarm["mean_reward_end"],
            "mean_reward_end_alone": alone["mean_reward_end"],
        }
    return out


def summarize(nodes: list[NodeProc], out: Path) -> dict[str, Any]:
    per_node = [node_summary(n) for n in nodes]
    cohorts = by_cohort(per_node)
    summary = {
        "nodes": per_node,
        "cohorts": cohorts,
        "swarm_vs_alone": swarm_vs_alone(cohorts),
        "plot": str(out / "summary.png"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot(nodes, out / "summary.png")
    return summary


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """What a newcomer reads at the end of a run: each cohort, and the swarm against alone."""
    lines = []
    for key, c in summary["cohorts"].items():
        lines.append(
            f"{key:<20} nodes {','.join(map(str, c['nodes'])):<8} steps {_fmt(c['steps'], '.0f'):>5}  "
            f"cumulative reward {_fmt(c['cumulative_reward'], '.1f'):>7}  held-out accuracy "
            f"{_fmt(c['eval_acc_last'], '.3f')}"
        )
    for cohort, v in summary["swarm_vs_alone"].items():
        gain = v["cumulative_reward_gain_pct"]
        lines.append(
            f"{cohort}: in the swarm {_fmt(v['cumulative_reward_swarm'], '.1f')} cumulative reward vs "
            f"{_fmt(v['cumulative_reward_alone'], '.1f')} alone ({'+' if gain and gain > 0 else ''}"
            f"{_fmt(gain, '.1f')} %), reward over the last {REWARD_WINDOW} steps "
            f"{_fmt(v['mean_reward_end_swarm'], '.3f')} vs {_fmt(v['mean_reward_end_alone'], '.3f')}, "
            f"held-out accuracy {_fmt(v['eval_acc_swarm'], '.3f')} vs {_fmt(v['eval_acc_alone'], '.3f')}"
        )
    return lines


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

    fig, (ax_r, ax_a) = plt.subplots(1, 2, figsize=(12, 4.5))
    # one colour per cohort; the nodes that ran alone dashed, in their cohort's colour
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colours: dict[str, str] = {}
    for n in nodes:
        colours.setdefault(n.cohort, palette[len(colours) % len(palette)])
    for n in nodes:
        rows = read_metrics(n.metrics_path)
        if not rows:
            continue
        t0 = rows[0]["time"] - rows[0].get("step_s", 0.0)
        label = f"node {n.index} {_kind(n)}"
        style = {"color": colours[n.cohort], "linestyle": "--" if n.alone else "-"}
        scored = [r for r in rows if r.get("reward") is not None]
        ax_r.plot(
            [r["time"] - t0 for r in scored],
            moving_average([r["reward"] for r in scored], REWARD_WINDOW),
            label=label,
            linewidth=2.2 if n.alone else 1.2,
            **style,
        )
        ev = [r for r in rows if r.get("eval_acc") is not None]  # every row repeats the last one
        ax_a.step(
            [r["time"] - t0 for r in ev],
            [r["eval_acc"] for r in ev],
            where="post",
            label=label,
            linewidth=2.2 if n.alone else 1.2,
            **style,
        )
    # one step's reward is the mean of a few groups: too noisy to read a trend from unsmoothed
    ax_r.set(title=f"reward (mean of the last {REWARD_WINDOW} steps)", xlabel="seconds", ylabel="reward")
    ax_a.set(title="held-out accuracy (greedy)", xlabel="seconds", ylabel="accuracy", ylim=(0, 1))
    if any(n.alone for n in nodes):
        fig.suptitle("swarm (solid) vs the same node alone (dashed), same share of the machine")
    ax_r.legend(fontsize="small")
    ax_a.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
