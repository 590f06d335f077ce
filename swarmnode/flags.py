"""Command-line flags for ``NodeConfig``: one flag per setting, its type, choices and shown default
taken from the section dataclass in ``swarmnode.config`` (defaults live only there); flags win over
the TOML file."""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

from swarmnode.config import _SECTIONS, ConfigError, NodeConfig, _hints, load_config

__all__ = ["SETTING_FLAGS", "add_config_arguments", "config_from_args"]


# -- command line -------------------------------------------------------------------------------

# (flag, setting, help, metavar). The type, the choices and the default shown by --help come from the
# section dataclass, so a flag cannot drift from its setting. Every setting has a flag except
# network.bootstrap (--bootstrap, repeatable) and the pair --listen sets.
_FLAGS: list[tuple[str, str, str, str | None]] = [
    ("--swarm", "swarm.id", "swarm id: the topic namespace every member shares", "ID"),
    ("--genesis", "swarm.genesis", "unix time of round 0", "UNIX_TIME"),
    ("--data-dir", "network.data_dir", "identity key, checkpoints and metrics", "DIR"),
    ("--host", "network.listen_host", "listen address", "ADDR"),
    ("--port", "network.port", "TCP port (0: any free one)", "PORT"),
    ("--target-peers", "network.target_peers", "peers to stay connected to", "N"),
    ("--expect-peers", "network.expect_peers", "cohort peers to hear before the first step", "N"),
    (
        "--join-wait",
        "network.join_wait_s",
        "longest wait for --expect-peers before training alone",
        "SECONDS",
    ),
    (
        "--presence-interval",
        "network.presence_interval_s",
        "seconds between presence announcements",
        "SECONDS",
    ),
    (
        "--peer-timeout",
        "network.peer_timeout_s",
        "a peer unheard this long is no longer waited for",
        "SECONDS",
    ),
    (
        "--max-blob-bytes",
        "network.max_blob_bytes",
        "largest pseudo-gradient or state blob from a peer",
        "BYTES",
    ),
    (
        "--link-mbps",
        "network.link_mbps",
        "this node's link speed, sizes the default collection window",
        "MBIT",
    ),
    ("--model", "model.model", "model dir, hub id (already cached) or 'tiny' (built locally)", "MODEL"),
    ("--engine", "model.engine", "rollout engine", None),
    ("--device", "model.device", "torch device, e.g. cpu or cuda:0", "DEVICE"),
    ("--dtype", "model.dtype", "weights dtype", None),
    ("--family", "task.family", "task family", "FAMILY"),
    ("--seed", "task.seed", "problem and sampling seed", "N"),
    ("--optimizer", "train.optimizer", "inner optimizer", None),
    ("--steps", "train.steps", "training steps (0: until stopped)", "N"),
    ("--duration", "train.duration_s", "seconds to run (0: no limit)", "SECONDS"),
    ("--eval-every", "train.eval_every", "steps between held-out evaluations", "N"),
    ("--eval-prompts", "train.eval_prompts", "held-out problems per evaluation", "N"),
    ("--group-size", "train.group_size", "completions per problem (one GRPO group)", "N"),
    ("--local-groups", "train.local_groups", "groups this node generates per step", "N"),
    ("--external-groups", "train.external_groups", "verified peer groups a step takes at most", "N"),
    ("--lr", "train.lr", "inner learning rate", "LR"),
    ("--max-new-tokens", "train.max_new_tokens", "longest completion, in tokens", "N"),
    ("--temperature", "train.temperature", "sampling temperature", "T"),
    ("--staleness-steps", "train.staleness_steps", "oldest peer rollouts taken, in steps behind ours", "N"),
    ("--external-prefer", "train.external_prefer", "which verified peer groups a step takes first", None),
    ("--share-rollouts", "train.share_rollouts", "publish this node's rollouts to the swarm", None),
    ("--topk", "demo.topk", "DeMo: components kept per chunk", "K"),
    ("--chunk", "demo.chunk", "DeMo: chunk side (chunk x chunk for matrices)", "N"),
    ("--dct", "demo.use_dct", "DeMo: DCT before the top-k", None),
    ("--value-codec", "demo.value_codec", "DeMo: how component values are coded on the wire", None),
    ("--gossip", "demo.gossip", "DeMo: exchange components with the cohort", None),
    ("--demo-window", "demo.window_s", "DeMo: wait this long for peers' components (0: never)", "SECONDS"),
    ("--demo-publishers", "demo.max_publishers", "DeMo: peers that publish a step, rotating (0: all)", "D"),
    ("--diloco", "diloco.enabled", "DiLoCo outer rounds", None),
    ("--inner-steps", "diloco.inner_steps", "H: inner steps per round", "H"),
    ("--round-seconds", "diloco.round_seconds", "wall-clock rounds of this length instead of H", "SECONDS"),
    ("--outer-lr", "diloco.outer_lr", "outer (Nesterov) learning rate", "LR"),
    ("--outer-momentum", "diloco.momentum", "outer momentum", "M"),
    ("--collect-seconds", "diloco.collect_seconds", "longest a round waits for pseudo-gradients", "SECONDS"),
    (
        "--delta-codec",
        "diloco.delta_codec",
        "how the pseudo-gradient is coded (sparse: top-k of a Walsh-Hadamard transform, 2-bit values, "
        "error feedback, 0.018 B/param; sparse-dct: the same after a DCT, for cohorts on one BLAS build)",
        None,
    ),
    ("--merge-fanin", "diloco.merge_fanin", "contributors per round, rotating (0: every member)", "K"),
    ("--relay-branching", "diloco.relay_branching", "pullers each relay serves a contributor's Δ to", "B"),
    ("--checkpoint-every", "checkpoint.every", "steps between checkpoints (0: none)", "N"),
    ("--checkpoint-keep", "checkpoint.keep", "checkpoints kept on disk", "N"),
    ("--metrics", "telemetry.metrics", "metrics JSONL path", "PATH"),
    ("--mqtt", "telemetry.mqtt", "telemetry broker mqtt://host:port/prefix", "URL"),
]

# What an unset optional setting means, shown by --help as its default; 'none' on the command line
# (or leaving the key out of the file) unsets it.
_UNSET: dict[str, str] = {
    "swarm.genesis": "derived from the swarm id",
    "model.dtype": "as the model loads",
    "diloco.collect_seconds": "from the model size, expected peers and --link-mbps",
    "diloco.outer_lr": "0.7 with --delta-codec int8, 1.0 with sparse",
    "diloco.momentum": "0.9 with --delta-codec int8, 0 with sparse (error feedback is its momentum)",
    "train.steps": "until stopped",
    "train.duration_s": "no limit",
    "diloco.round_seconds": "rounds of H steps",
    "telemetry.metrics": "DIR/metrics.jsonl",
    "telemetry.mqtt": "off",
}

# setting -> its flag, for messages and tests
SETTING_FLAGS: dict[str, str] = {setting: flag for flag, setting, _, _ in _FLAGS} | {
    "network.bootstrap": "--bootstrap"
}


def _dest(setting: str) -> str:
    return "cfg_" + setting.replace(".", "_")


def _default(setting: str) -> tuple[Any, Any]:
    """(type hint, default value) of a ``section.key`` setting, read off its dataclass."""
    sec, name = setting.split(".")
    cls = _SECTIONS[sec]
    (f,) = [f for f in dataclasses.fields(cls) if f.name == name]
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[operator]
    return _hints(cls)[name], default


def _show(setting: str, value: Any) -> str:
    if value is None:
        return _UNSET[setting]
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ", ".join(value) or "none"
    return str(value)


def _or_none(parse: Any) -> Any:
    """``parse``, but 'none' passes through: it unsets an optional value the file set."""

    def convert(text: str) -> Any:
        return "none" if text.lower() == "none" else parse(text)

    convert.__name__ = parse.__name__  # argparse names the type in its error message
    return convert


def _flag_options(setting: str, help_text: str, metavar: str | None) -> dict[str, Any]:
    tp, default = _default(setting)
    optional = isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union
    if optional:
        (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
    opts: dict[str, Any] = {"help": f"{help_text} (default: {_show(setting, default)})".replace("%", "%%")}
    if typing.get_origin(tp) is Literal:
        opts["choices"] = list(typing.get_args(tp))  # shown as {a,b}: no metavar
    elif tp is bool:
        opts["action"] = argparse.BooleanOptionalAction
    else:
        if tp in (int, float):
            opts["type"] = _or_none(tp) if optional else tp
        # str and Path stay strings: load_config converts them, and 'none' unsets an optional one
        assert metavar is not None, f"{setting} needs a metavar"
        opts["metavar"] = metavar
    return opts


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config FILE`` plus one flag per setting, grouped by TOML section (flags win over the file).

    Every flag defaults to None ("not given"), so only the flags given override the file."""
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help="TOML config file; each flag below sets the key of its [section] and wins over the file",
    )
    groups = {sec: parser.add_argument_group(f"[{sec}]") for sec in _SECTIONS}
    groups["network"].add_argument(
        "--listen",
        default=None,
        metavar="MULTIADDR",
        help="listen multiaddr /ip4/HOST/tcp/PORT (sets --host and --port)",
    )
    groups["network"].add_argument(
        "--bootstrap",
        action="append",
        default=None,
        metavar="MULTIADDR",
        help="peer to join through, /ip4/.../tcp/.../p2p/PEER_ID, repeatable (default: none)",
    )
    for flag, setting, help_text, metavar in _FLAGS:
        groups[setting.partition(".")[0]].add_argument(
            flag, dest=_dest(setting), default=None, **_flag_options(setting, help_text, metavar)
        )


def _parse_listen(addr: str) -> tuple[str, int]:
    m = re.fullmatch(r"/ip[46]/([^/]+)/tcp/(\d+)", addr)
    if not m:
        raise ConfigError(f"command line: --listen must look like /ip4/HOST/tcp/PORT, got {addr!r}")
    return m.group(1), int(m.group(2))


def config_from_args(args: argparse.Namespace) -> NodeConfig:
    """The ``NodeConfig`` for parsed flags from ``add_config_arguments``."""
    overrides: dict[str, Any] = {}
    listen = getattr(args, "listen", None)
    if listen:
        overrides["network.listen_host"], overrides["network.port"] = _parse_listen(listen)
    if getattr(args, "bootstrap", None):
        overrides["network.bootstrap"] = [a for a in args.bootstrap if a]
    for _flag, setting, _help, _metavar in _FLAGS:
        value = getattr(args, _dest(setting), None)
        if value is None:
            continue
        if setting == "train.steps" and value == 0:
            value = "none"  # 0 on the command line: until stopped
        if setting == "train.duration_s" and value == 0:
            value = "none"
        overrides[setting] = value
    return load_config(getattr(args, "config", None), overrides)
