"""local-swarm launcher: real processes. A stand-in node script checks process handling fast; the
real 3-node swarm (libp2p, torch) is marked slow."""

from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path

import pytest

from swarmnode.localswarm import SwarmPlan, run_swarm
from swarmnode.swarmreport import status_table

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


# -- real swarms: `swarmnode run` processes with libp2p, torch and the tiny model ------------------

REAL_ARGS = [
    "--group-size",
    "4",
    "--local-groups",
    "2",
    "--external-groups",
    "2",
    "--max-new-tokens",
    "6",
    "--eval-every",
    "100",
    "--collect-seconds",
    "8",
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    from swarmnode.tinymodel import build_tiny_policy

    return str(build_tiny_policy(tmp_path_factory.mktemp("model") / "tiny"))


def _last(node_dir: Path) -> dict:
    from swarmnode.swarmreport import read_metrics

    rows = read_metrics(node_dir / "metrics.jsonl")
    return rows[-1] if rows else {}


@pytest.mark.slow
def test_three_real_nodes_share_and_merge(tmp_path: Path, tiny_model: str) -> None:
    plan = SwarmPlan(nodes=3, steps=4, merge_every=2, out=tmp_path, model=tiny_model, node_args=REAL_ARGS)
    summary = run_swarm(plan, live=False)
    nodes = summary["nodes"]
    assert all(n["exit_code"] == 0 for n in nodes), nodes
    assert all(n["external_groups"] > 0 for n in nodes), "every node trained on verified swarm rollouts"
    assert all(n["merges"] == 2 for n in nodes)
    assert len({n["anchor_hash"] for n in nodes}) == 1, "replicas agree after the merge"


@pytest.mark.slow
def test_killed_node_does_not_stall_the_rest(tmp_path: Path, tiny_model: str) -> None:
    from swarmnode.localswarm import _start, stop_all, wait_multiaddr

    plan = SwarmPlan(nodes=3, steps=4, merge_every=2, out=tmp_path, model=tiny_model, node_args=REAL_ARGS)
    nodes = [_start(plan, 0, "", None)]
    boot = wait_multiaddr(nodes[0], 120)
    nodes += [_start(plan, i, boot, None) for i in (1, 2)]
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and _last(nodes[2].data_dir).get("step", 0) < 1:
            time.sleep(0.2)
        nodes[2].proc.kill()  # SIGKILL: no goodbye, its blobs vanish mid-round
        for n in nodes[:2]:
            n.proc.wait(timeout=240)
    finally:
        stop_all(nodes, grace_s=5)
    for n in nodes[:2]:
        last = _last(n.data_dir)
        assert n.proc.returncode == 0
        assert last["step"] == 4
        assert last["merges"] == 2
        # at most one full collection window per round was spent waiting on the dead peer
        assert last["blocked_on_network_s"] <= 2 * 8 + 5


@pytest.mark.slow
def test_late_joiner_catches_up(tmp_path: Path, tiny_model: str) -> None:
    from swarmnode.localswarm import _start, stop_all, wait_multiaddr

    # The first two run far longer than the test needs (the test stops them), so however slowly the
    # joiner loads torch and its model on a loaded machine, there is a live cohort to catch up with.
    plan = SwarmPlan(nodes=2, steps=5000, merge_every=20, out=tmp_path, model=tiny_model, node_args=REAL_ARGS)
    nodes = [_start(plan, 0, "", None)]
    try:
        boot = wait_multiaddr(nodes[0], 120)
        nodes.append(_start(plan, 1, boot, None))
        deadline = time.monotonic() + 240
        # Start the joiner once the cohort is clearly ahead (round 3): a joiner that starts while the
        # cohort is still at round 0 or 1 is within ordinary skew and merges without a catch-up.
        while time.monotonic() < deadline and _last(nodes[0].data_dir).get("round", 0) < 3:
            time.sleep(0.2)
        # A plan with the joiner in it (node index 2); it expects the 2 cohort peers before its
        # first step.
        joiner_plan = SwarmPlan(
            nodes=3,
            steps=5000,
            merge_every=20,
            out=tmp_path,
            model=tiny_model,
            node_args=[*REAL_ARGS, "--seed", "7"],
        )
        nodes.append(_start(joiner_plan, 2, boot, None))
        # Wait until the joiner has caught up and then merged twice (it contributes within 2 rounds).
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and _last(nodes[2].data_dir).get("merges", 0) < 2:
            assert all(n.proc.poll() is None for n in nodes), "a node exited early"
            time.sleep(0.2)
    finally:
        stop_all(nodes, grace_s=5)
    joiner = _last(nodes[2].data_dir)
    assert joiner["catchups"] == 1
    assert joiner["merges"] >= 1
    # The joiner lands on the cohort's anchor. Not necessarily in its very first round: a round
    # where one replica missed a contribution (e.g. a blob fetch lost while the joiner dialled in)
    # diverges until the majority re-sync, and the last round can differ when a peer stops mid-
    # collection; so look for agreement round by round.
    joiner_anchors = _anchors_by_round(nodes[2].data_dir)
    boot_anchors = _anchors_by_round(nodes[0].data_dir)
    common = sorted(joiner_anchors.keys() & boot_anchors.keys())
    assert common, "the joiner never finished a round the bootstrap node also finished"
    assert any(joiner_anchors[r] == boot_anchors[r] for r in common), (joiner_anchors, boot_anchors)


def _anchors_by_round(node_dir: Path) -> dict[int, str]:
    """Anchor hash each node held at the start of a round (i.e. right after the previous merge)."""
    from swarmnode.swarmreport import read_metrics

    out: dict[int, str] = {}
    for row in read_metrics(node_dir / "metrics.jsonl"):
        if row.get("anchor_hash") and row.get("merges", 0) >= 1:
            out.setdefault(int(row["round"]), row["anchor_hash"])
    return out


def test_node_command_picks_wall_clock_or_step_rounds(tmp_path: Path) -> None:
    from swarmnode.localswarm import _node_command

    timed = _node_command(SwarmPlan(nodes=2, steps=5, round_seconds=8.0), 1, tmp_path, "/ip4/x")
    assert timed[timed.index("--round-seconds") + 1] == "8.0"
    assert "--inner-steps" not in timed
    stepped = _node_command(SwarmPlan(nodes=2, steps=5, merge_every=20), 1, tmp_path, "/ip4/x")
    assert stepped[stepped.index("--inner-steps") + 1] == "20"
    assert "--round-seconds" not in stepped
    with pytest.raises(ValueError, match="round seconds"):
        SwarmPlan(nodes=2, steps=5, round_seconds=-1.0)


def test_moving_average_is_a_trailing_mean() -> None:
    from swarmnode.swarmreport import moving_average

    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert moving_average([], 5) == []


# -- heterogeneous swarms: the mix, the alone node, the throttle ----------------------------------


def test_mix_parses_models_counts_optimizers_throttles_and_flags() -> None:
    from swarmnode.localswarm import parse_mix

    a, b, c = parse_mix("tiny-64:2, tiny-128:demo:slow=3:lr=5e-4 ,/models/x:3")
    assert (a.model, a.count, a.optimizer, a.slow, a.args) == ("tiny-64", 2, "", 1.0, [])
    assert (b.model, b.count, b.optimizer, b.slow, b.args) == ("tiny-128", 1, "demo", 3.0, ["--lr", "5e-4"])
    assert (c.model, c.count) == ("/models/x", 3)
    for bad, match in [
        ("tiny-64:0", "count"),
        ("tiny-64:fast", "unknown option"),
        ("tiny-64:slow=x", "slow"),
    ]:
        with pytest.raises(ValueError, match=match):
            parse_mix(bad)


def test_mixed_plan_gives_each_cohort_its_own_peer_count_and_the_alone_node_no_swarm(tmp_path: Path) -> None:
    from swarmnode.localswarm import _node_command, parse_mix

    plan = SwarmPlan(steps=5, mix=parse_mix("m64:2,m128:1:demo,m128:1:slow=3"), alone=1)
    assert plan.nodes == 4
    members = plan.members()
    assert [(m.cohort, m.note) for m in members] == [
        ("m64", ""),
        ("m64", ""),
        ("m128", "demo"),
        ("m128", "slow x3"),
        ("m64", "alone"),
    ]
    cmds = [_node_command(plan, i, tmp_path / f"n{i}", "/ip4/boot") for i in range(5)]

    def flag(cmd: list[str], name: str) -> str:
        return cmd[len(cmd) - 1 - cmd[::-1].index(name) + 1]  # the last one given wins

    assert [flag(c, "--model") for c in cmds] == ["m64", "m64", "m128", "m128", "m64"]
    assert [flag(c, "--expect-peers") for c in cmds] == ["1", "1", "1", "1", "0"]
    assert flag(cmds[2], "--optimizer") == "demo"
    alone = cmds[4]
    assert flag(alone, "--swarm") == "local-alone4"
    assert "--no-share-rollouts" in alone
    assert "--bootstrap" not in alone
    assert "--diloco" not in alone
    assert all("--diloco" in c and "--bootstrap" in c for c in cmds[:4])


def test_alone_node_runs_beside_the_swarm_and_the_summary_compares_them(tmp_path: Path) -> None:
    plan = SwarmPlan(nodes=2, steps=5, out=tmp_path / "out", start_timeout_s=20, alone=1)
    summary = run_swarm(plan, node_cmd=_script(tmp_path), live=False)
    assert [n["role"] for n in summary["nodes"]] == ["swarm", "swarm", "alone"]
    assert set(summary["cohorts"]) == {"tiny", "tiny alone"}
    versus = summary["swarm_vs_alone"]["tiny"]
    assert versus["cumulative_reward_swarm"] == versus["cumulative_reward_alone"] == 3.0
    assert versus["cumulative_reward_gain_pct"] == 0.0
    from swarmnode.swarmreport import summary_lines

    assert any("alone" in line for line in summary_lines(summary))


def test_status_table_shows_each_nodes_cohort(tmp_path: Path) -> None:
    from swarmnode.localswarm import parse_mix

    plan = SwarmPlan(steps=3, out=tmp_path / "out", mix=parse_mix("a64:1,b128:1:slow=2"), start_timeout_s=20)
    summary = run_swarm(plan, node_cmd=_script(tmp_path), live=False)
    assert [n["cohort"] for n in summary["nodes"]] == ["a64", "b128"]
    assert summary["nodes"][1]["note"] == "slow x2"


def test_throttle_slows_a_process_by_its_factor(tmp_path: Path) -> None:
    import subprocess

    from swarmnode.localswarm import Throttle

    counter = tmp_path / "count.py"
    # counts wall-clock slices of 10 ms in which it got to run, for 1.5 s
    counter.write_text(
        "import time\nn=0\nend=time.time()+1.5\nwhile time.time()<end:\n    t=time.time()\n"
        "    while time.time()-t<0.01: pass\n    n+=1\nprint(n)\n"
    )
    procs = [
        subprocess.Popen([sys.executable, str(counter)], stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    throttle = Throttle(procs[1], 3.0, slice_s=0.05)
    outs = [int(p.communicate(timeout=30)[0]) for p in procs]
    throttle.stop()
    assert outs[1] < 0.6 * outs[0]  # about a third; generous for a loaded machine


def test_the_status_table_says_which_channel_keeps_failing() -> None:
    from swarmnode.swarmreport import health

    assert health({"demo_health": "ok", "diloco_health": "ok"}) == "ok"
    assert health({}) == "ok"
    bad = health({"demo_health": "ok", "diloco_health": "merges incomplete 3 rounds in a row (window)"})
    assert bad == "merge: merges incomplete 3 rounds in a row (window)"
