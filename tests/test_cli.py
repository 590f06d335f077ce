"""The command line: --version, readable --help, and one set of defaults behind `run`, the TOML file
and `local-swarm` (whose nodes differ from the `run` defaults only where the plan says so)."""

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from swarmnode import __version__
from swarmnode.cli import build_parser
from swarmnode.config import NodeConfig
from swarmnode.flags import SETTING_FLAGS, config_from_args
from swarmnode.localswarm import TINY_MODEL_ARGS, SwarmPlan, _node_command


def test_version_flag() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "swarmnode.cli", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"swarmnode {__version__}"
    assert __version__ != "0.0.0+unknown"


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser([name])
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices[name]


def test_run_help_names_every_flag_with_a_metavar_and_its_default() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "swarmnode.cli", "run", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "CFG_" not in out
    assert "--lr LR" in out
    assert "--expect-peers N" in out
    assert f"(default: {NodeConfig().train.lr})" in out
    assert "--value-codec {int8,sign}" in out
    assert "mqtts" not in out
    for flag in SETTING_FLAGS.values():
        assert flag in out
    for action in _subparser("run")._actions:
        if not action.option_strings or action.dest in ("help", "config", "listen"):
            continue
        assert action.help, action.option_strings
        assert "(default: " in action.help, action.option_strings
        assert action.nargs == 0 or action.choices or action.metavar, action.option_strings


def test_bad_settings_stop_run_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from swarmnode import daemon

    data_dir = tmp_path / "data"
    argv = ["run", "--data-dir", str(data_dir), "--mqtt", "mqtts://broker.example:8883/x"]
    args = build_parser(argv).parse_args(argv)
    assert daemon.main(args) == 2
    assert "telemetry.mqtt: TLS (mqtts://) is not implemented" in capsys.readouterr().err
    assert not data_dir.exists()


def _settings(cfg: NodeConfig) -> dict[str, Any]:
    return {f"{sec}.{key}": v for sec, body in cfg.to_dict().items() for key, v in body.items()}


def test_tiny_model_overrides_are_listed() -> None:
    assert {s for s, flag in SETTING_FLAGS.items() if flag in TINY_MODEL_ARGS} == {
        "task.family",
        "train.lr",
        "train.max_new_tokens",
        "train.eval_every",
        "diloco.collect_seconds",
        "network.join_wait_s",
    }


@pytest.mark.parametrize(
    ("plan", "per_plan"),
    [
        (SwarmPlan(steps=5), {"train.steps": 5, "diloco.round_seconds": 8.0}),
        (
            SwarmPlan(nodes=2, duration_s=30.0, merge_every=10, model="org/model", engines=["hf", "vllm"]),
            {
                "train.duration_s": 30.0,
                "diloco.inner_steps": 10,
                "model.model": "org/model",
                "model.engine": "vllm",
            },
        ),
    ],
)
def test_local_swarm_nodes_run_on_the_run_defaults(
    tmp_path: Path, plan: SwarmPlan, per_plan: dict[str, Any]
) -> None:
    boot = "/ip4/127.0.0.1/tcp/4001/p2p/QmBoot"
    cmd = _node_command(plan, 1, tmp_path / "node1", boot)
    assert cmd[1:4] == ["-m", "swarmnode.cli", "run"]
    run = _subparser("run")
    cfg = config_from_args(run.parse_args(cmd[4:]))
    tiny_cfg = _settings(config_from_args(run.parse_args(TINY_MODEL_ARGS)))
    tiny = {s: tiny_cfg[s] for s, flag in SETTING_FLAGS.items() if flag in TINY_MODEL_ARGS}
    per_node = {
        "network.data_dir": str(tmp_path / "node1"),
        "network.listen_host": "127.0.0.1",
        "network.bootstrap": [boot],
        "network.expect_peers": plan.nodes - 1,
        "swarm.id": plan.swarm,
        "task.seed": 1,
        "diloco.enabled": True,
    }
    # every other setting is the `run` default: local-swarm has no defaults of its own
    assert _settings(cfg) == {**_settings(NodeConfig()), **tiny, **per_node, **per_plan}


def test_local_swarm_flags_default_to_the_plan() -> None:
    args = build_parser(["local-swarm"]).parse_args(["local-swarm"])
    plan = SwarmPlan(steps=1)
    assert (args.nodes, args.out, args.model, args.swarm) == (plan.nodes, plan.out, plan.model, plan.swarm)
    assert (args.round_seconds, args.merge_every, args.engines) == (plan.round_seconds, plan.merge_every, "")
    assert (args.steps, args.duration) == (0, 0.0)


def test_local_swarm_plan_checks_the_swarm_id() -> None:
    with pytest.raises(ValueError, match=r"^swarm must be 1-64 characters"):
        SwarmPlan(steps=1, swarm="My Swarm")
    assert SwarmPlan(steps=1, merge_every=5).round_seconds == 0.0  # step rounds win
