"""local-swarm launcher: real processes. A stand-in node script checks process handling fast; the
real 3-node swarm (libp2p, torch) is marked slow."""

from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path

import pytest

from swarmnode.localswarm import SwarmPlan, run_swarm, status_table

# Speaks the daemon's contract: prints the multiaddr line, appends metrics rows to <data-dir>/metrics.jsonl.
FAKE_NODE = textwrap.dedent(
    """
    import json, signal, sys, time
    args = sys.argv[1:]
    data_dir = args[args.index("--data-dir") + 1]
    steps = int(args[args.index("--steps") + 1])
    hang = "--hang" in args and "--bootstrap" in args
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    print("swarmnode listening on /ip4/127.0.0.1/tcp/1234/p2p/QmFake", flush=True)
    with open(data_dir + "/metrics.jsonl", "a") as f:
        for step in range(1, steps + 1):
            row = {"step": step, "time": time.time(), "step_s": 0.01, "reward": step / steps,
                   "eval_acc": step / (2 * steps), "peers": 2, "external_groups": step, "round": 0}
            f.write(json.dumps(row) + "\\n"); f.flush()
            time.sleep(0.01)
    while hang:
        time.sleep(0.05)
    """
)


def _script(tmp_path: Path) -> list[str]:
    path = tmp_path / "fake_node.py"
    path.write_text(FAKE_NODE)
    return [sys.executable, str(path)]


def test_plan_validates() -> None:
    with pytest.raises(ValueError, match="nodes"):
        SwarmPlan(nodes=0, steps=1)
    with pytest.raises(ValueError, match="steps"):
        SwarmPlan(nodes=2)


def test_launcher_runs_nodes_and_writes_summary(tmp_path: Path) -> None:
    plan = SwarmPlan(nodes=3, steps=5, out=tmp_path / "out", start_timeout_s=20)
    summary = run_swarm(plan, node_cmd=_script(tmp_path), live=False)
    assert [n["steps"] for n in summary["nodes"]] == [5, 5, 5]
    assert all(n["exit_code"] == 0 for n in summary["nodes"])
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["nodes"][0]["eval_acc_last"] == 0.5
    assert (tmp_path / "out" / "summary.png").stat().st_size > 1000
    # The bootstrap address of the others is node 0's printed multiaddr.
    assert "QmFake" in (tmp_path / "out" / "node0" / "node.log").read_text()


def test_hanging_nodes_are_stopped_by_pid(tmp_path: Path) -> None:
    plan = SwarmPlan(
        nodes=2, steps=2, duration_s=0.5, out=tmp_path / "out", overrun_s=0.5, node_args=["--hang"]
    )
    t0 = time.monotonic()
    summary = run_swarm(plan, node_cmd=_script(tmp_path), live=False)
    assert time.monotonic() - t0 < 15
    assert summary["nodes"][1]["exit_code"] == 0  # SIGTERM handled gracefully
    assert "reward" in status_table([])
