"""NodeConfig: TOML + flags (flags win), and clear errors for unknown keys, wrong types, bad ranges."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from swarmnode.config import ConfigError, NodeConfig, add_config_arguments, config_from_args, load_config

TOML = """
[swarm]
id = "lab-swarm"

[network]
port = 4001
bootstrap = ["/ip4/10.0.0.1/tcp/4001/p2p/QmPeer"]

[train]
optimizer = "demo"
lr = 2e-5
steps = 100

[diloco]
enabled = true
inner_steps = 20

[telemetry]
mqtt = "mqtt://127.0.0.1:1883/swarmnode"
"""


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "node.toml"
    p.write_text(text)
    return p


def _parse(argv: list[str]) -> NodeConfig:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def test_defaults() -> None:
    cfg = load_config(None, {})
    assert cfg.diloco.outer_lr == 0.7
    assert cfg.diloco.momentum == 0.9
    assert cfg.train.steps is None
    assert cfg.telemetry.mqtt is None
    assert cfg.model.model == "tiny"


def test_file_values_and_flag_precedence(tmp_path: Path) -> None:
    path = _write(tmp_path, TOML)
    cfg = load_config(path, {})
    assert cfg.swarm.id == "lab-swarm"
    assert cfg.network.port == 4001
    assert cfg.train.optimizer == "demo"
    assert cfg.diloco.enabled
    assert cfg.train.lr == 2e-5
    cfg = _parse(["--config", str(path), "--lr", "3e-5", "--steps", "7", "--no-diloco", "--mqtt", "none"])
    assert cfg.train.lr == 3e-5
    assert cfg.train.steps == 7
    assert not cfg.diloco.enabled
    assert cfg.telemetry.mqtt is None
    assert cfg.network.port == 4001  # not overridden: the file's value stays
    assert cfg.swarm.id == "lab-swarm"


def test_launcher_flags(tmp_path: Path) -> None:
    cfg = _parse(
        [
            "--data-dir", str(tmp_path), "--listen", "/ip4/127.0.0.1/tcp/0", "--swarm", "local",
            "--steps", "0", "--bootstrap", "/ip4/127.0.0.1/tcp/5000/p2p/QmX", "--seed", "2",
        ]
    )  # fmt: skip
    assert cfg.network.data_dir == tmp_path
    assert (cfg.network.listen_host, cfg.network.port) == ("127.0.0.1", 0)
    assert cfg.train.steps is None  # 0 on the command line: until stopped
    assert cfg.network.bootstrap == ["/ip4/127.0.0.1/tcp/5000/p2p/QmX"]
    assert cfg.task.seed == 2


def test_eval_prompts_flag_and_range() -> None:
    assert load_config(None, {}).train.eval_prompts == 64
    assert _parse(["--eval-prompts", "200"]).train.eval_prompts == 200
    with pytest.raises(
        ConfigError, match=r"command line: train\.eval_prompts must be in \[1, 100000\], got 0"
    ):
        load_config(None, {"train.eval_prompts": 0})


def test_bare_override_keys_resolve() -> None:
    cfg = load_config(None, {"lr": 1e-4, "diloco.outer_lr": 0.5, "topk": None})
    assert cfg.train.lr == 1e-4
    assert cfg.diloco.outer_lr == 0.5
    assert cfg.demo.topk == 32


def test_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    path = _write(tmp_path, "[train]\nlearning_rate = 1e-5\n")
    with pytest.raises(ConfigError, match=r"node\.toml.*train\.learning_rate.*allowed:.*lr"):
        load_config(path, {})
    path = _write(tmp_path, "[trian]\nlr = 1e-5\n")
    with pytest.raises(ConfigError, match=r"unknown section \[trian\]"):
        load_config(path, {})
    with pytest.raises(ConfigError, match=r"command line.*nonsense"):
        load_config(None, {"nonsense": 1})


def test_wrong_type(tmp_path: Path) -> None:
    path = _write(tmp_path, '[train]\ngroup_size = "eight"\n')
    with pytest.raises(ConfigError, match=r"node\.toml: train\.group_size must be an integer, got 'eight'"):
        load_config(path, {})
    path = _write(tmp_path, "[train]\nshare_rollouts = 1\n")
    with pytest.raises(ConfigError, match="true/false"):
        load_config(path, {})
    path = _write(tmp_path, '[model]\nengine = "onnx"\n')
    with pytest.raises(ConfigError, match=r"model\.engine must be one of 'hf', 'vllm'"):
        load_config(path, {})


def test_out_of_range_values(tmp_path: Path) -> None:
    path = _write(tmp_path, "[network]\nport = 70000\n")
    with pytest.raises(ConfigError, match=r"node\.toml: network\.port must be in \[0, 65535\], got 70000"):
        load_config(path, {})
    with pytest.raises(ConfigError, match=r"command line: diloco\.momentum must be in \[0.0, 0.999\]"):
        load_config(None, {"diloco.momentum": 1.5})
    with pytest.raises(ConfigError, match=r"swarm\.id must be"):
        load_config(None, {"swarm.id": "Bad Name"})
    with pytest.raises(ConfigError, match="mqtt must look like"):
        load_config(None, {"telemetry.mqtt": "http://x"})


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path, "[train\n"), {})
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml", {})
    with pytest.raises(ConfigError, match="--listen"):
        _parse(["--listen", "127.0.0.1:4000"])


def test_config_error_is_value_error() -> None:
    assert issubclass(ConfigError, ValueError)
