"""NodeConfig: TOML + flags (flags win), and clear errors for unknown keys, wrong types, bad ranges."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path

import pytest

from swarmnode.config import (
    SWARM_ID_RE,
    ConfigError,
    DemoSection,
    NodeConfig,
    check_swarm_id,
    load_config,
)
from swarmnode.flags import SETTING_FLAGS, add_config_arguments, config_from_args

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


def test_flags_file_and_dataclasses_give_the_same_defaults(tmp_path: Path) -> None:
    from swarmnode.cli import build_parser

    args = build_parser(["run"]).parse_args(["run"])
    from_cli = config_from_args(args)
    from_file = load_config(_write(tmp_path, ""), {})
    assert from_cli == from_file == load_config(None, {}) == NodeConfig()


def test_flags_carry_no_defaults_of_their_own() -> None:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    assert all(v is None for v in vars(parser.parse_args([])).values())


def test_every_setting_is_a_flag() -> None:
    cfg = NodeConfig()
    settings = {
        f"{sec.name}.{key.name}"
        for sec in dataclasses.fields(cfg)
        for key in dataclasses.fields(getattr(cfg, sec.name))
    }
    assert settings == set(SETTING_FLAGS)


def test_network_and_demo_window_settings() -> None:
    cfg = _parse(
        [
            "--expect-peers", "0", "--join-wait", "20", "--presence-interval", "0.5",
            "--peer-timeout", "4", "--max-blob-bytes", str(1 << 30), "--demo-window", "1.5",
        ]
    )  # fmt: skip
    net = cfg.network
    assert (net.expect_peers, net.join_wait_s, net.presence_interval_s) == (0, 20.0, 0.5)
    assert (net.peer_timeout_s, net.max_blob_bytes, cfg.demo.window_s) == (4.0, 1 << 30, 1.5)
    defaults = NodeConfig()
    assert (defaults.network.expect_peers, defaults.network.join_wait_s) == (1, 3.0)
    assert (defaults.network.presence_interval_s, defaults.network.peer_timeout_s) == (2.0, 15.0)
    assert (defaults.network.max_blob_bytes, defaults.demo.window_s) == (8 << 30, 0.0)
    assert defaults.diloco.collect_seconds is None  # derived from the model (rounds.collect_window)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"network.expect_peers": -1}, r"network\.expect_peers must be in \[0, "),
        ({"network.join_wait_s": -0.5}, r"network\.join_wait_s must be in \[0\.0, "),
        ({"network.presence_interval_s": 0.0}, r"network\.presence_interval_s must be in \[0\.001, "),
        ({"network.peer_timeout_s": 0.0}, r"network\.peer_timeout_s must be in \[0\.001, "),
        (
            {"network.presence_interval_s": 5.0, "network.peer_timeout_s": 5.0},
            r"network\.peer_timeout_s must be > presence_interval_s \(5\.0\), got 5\.0",
        ),
        ({"network.max_blob_bytes": 1000}, r"network\.max_blob_bytes must be in \[1048576, "),
        ({"demo.window_s": -1.0}, r"demo\.window_s must be in \[0\.0, "),
    ],
)
def test_new_settings_reject_out_of_range_values(overrides: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError, match="command line: " + message):
        load_config(None, overrides)


def test_value_codecs_are_the_ones_that_exist(tmp_path: Path) -> None:
    from swarmnode.compression.values import CODECS

    assert typing.get_args(typing.get_type_hints(DemoSection)["value_codec"]) == CODECS
    path = _write(tmp_path, '[demo]\nvalue_codec = "fp16"\n')
    with pytest.raises(ConfigError, match=r"node\.toml: demo\.value_codec must be one of 'int8', 'sign'"):
        load_config(path, {})
    with pytest.raises(SystemExit):
        _parse(["--value-codec", "fp16"])


def test_mqtts_is_rejected_until_tls_exists(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"telemetry\.mqtt: TLS \(mqtts://\) is not implemented"):
        _parse(["--mqtt", "mqtts://broker.example:8883/swarmnode"])
    path = _write(tmp_path, '[telemetry]\nmqtt = "mqtts://broker.example:8883"\n')
    with pytest.raises(ConfigError, match=r"node\.toml: telemetry\.mqtt: TLS"):
        load_config(path, {})
    assert _parse(["--mqtt", "mqtt://127.0.0.1:1883/x"]).telemetry.mqtt == "mqtt://127.0.0.1:1883/x"


def test_none_on_the_command_line_unsets_an_optional_file_value(tmp_path: Path) -> None:
    path = _write(tmp_path, "[swarm]\ngenesis = 1700000000\n[diloco]\nround_seconds = 20\n")
    assert load_config(path, {}).diloco.round_seconds == 20.0
    cfg = _parse(["--config", str(path), "--round-seconds", "none", "--genesis", "None"])
    assert cfg.diloco.round_seconds is None
    assert cfg.swarm.genesis is None
    with pytest.raises(SystemExit):
        _parse(["--round-seconds", "soon"])


def test_swarm_id_rule_is_the_wire_rule() -> None:
    from swarmnode.protocol.records import SWARM_RE

    assert SWARM_ID_RE is SWARM_RE
    assert check_swarm_id("lab-1") == "lab-1"
    for bad in ["", "Lab", "a_b", "x" * 65]:
        with pytest.raises(ValueError, match=r"^swarm must be 1-64 characters"):
            check_swarm_id(bad, "swarm")
    with pytest.raises(ConfigError, match=r"command line: swarm\.id must be 1-64 characters"):
        _parse(["--swarm", "Bad Name"])


def test_the_default_collection_window_grows_with_the_model_and_shrinks_with_the_link() -> None:
    from swarmnode.rounds import COLLECT_FLOOR_S, collect_window

    tiny = collect_window(100_000, 3, 100.0)
    half_b = collect_window(500_000_000, 3, 100.0)  # a 0.5 B model's int8 Δ, 3 peers, 100 Mbit/s
    assert tiny < COLLECT_FLOOR_S + 1
    assert half_b > 3 * 3 * 40  # three pulls of 40 s each, with the safety factor
    assert collect_window(500_000_000, 3, 1000.0) < half_b
    assert collect_window(500_000_000, 3, 100.0, round_seconds=60.0) == 60.0
