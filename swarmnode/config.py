"""Node configuration: one typed ``NodeConfig`` assembled from a TOML file and CLI flags (flags win).

Layout of the TOML file (every key optional; unknown keys are errors, so typos never pass silently)::

    [swarm]      id, genesis
    [network]    data_dir, listen_host, port, bootstrap, target_peers, expect_peers, join_wait_s,
                 presence_interval_s, peer_timeout_s, max_blob_bytes, link_mbps
    [model]      model, engine, device, dtype
    [task]       family, seed
    [train]      optimizer, steps, duration_s, eval_every, eval_prompts, group_size, local_groups,
                 external_groups, lr, max_new_tokens, temperature, staleness_steps,
                 external_prefer, share_rollouts
    [demo]       topk, chunk, use_dct, value_codec, gossip, window_s, max_publishers
    [diloco]     enabled, inner_steps, round_seconds, outer_lr, momentum, collect_seconds, delta_codec,
                 merge_fanin, relay_branching
    [checkpoint] every, keep
    [telemetry]  metrics, mqtt

Each section validates itself in ``__post_init__`` (ValueError naming the field and the allowed
range); ``load_config`` turns that into ``ConfigError`` naming the file and the ``section.key``.
Optional values (``swarm.genesis``, ``train.steps``, ``telemetry.mqtt``...) are unset by leaving them
out; TOML has no null, so the string ``"none"`` also unsets them.

Every default lives in the section dataclasses below and nowhere else: the flags default to "not
given", and ``--help`` shows the dataclass defaults.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from swarmnode.protocol.errors import ProtocolError
from swarmnode.protocol.records import SWARM_RE
from swarmnode.protocol.topics import validate_swarm_id

__all__ = [
    "SWARM_ID_RE",
    "CheckpointSection",
    "ConfigError",
    "DemoSection",
    "DilocoSection",
    "ModelSection",
    "NetworkSection",
    "NodeConfig",
    "SwarmSection",
    "TaskSection",
    "TelemetrySection",
    "TrainSection",
    "check_swarm_id",
    "load_config",
]


class ConfigError(ValueError):
    """A bad configuration value from a file or a flag; the message names where and what is allowed."""


def _range(name: str, value: float, lo: float | None = None, hi: float | None = None) -> None:
    ok = isinstance(value, int | float) and math.isfinite(value)
    ok = ok and (lo is None or value >= lo) and (hi is None or value <= hi)
    if not ok:
        lo_s = "-inf" if lo is None else lo
        hi_s = "inf" if hi is None else hi
        raise ValueError(f"{name} must be in [{lo_s}, {hi_s}], got {value!r}")


# The swarm id goes into every topic and record, so its rule is the wire protocol's; defined there once.
SWARM_ID_RE = SWARM_RE


def check_swarm_id(value: str, name: str = "id") -> str:
    """``value`` if it is a valid swarm id, else ``ValueError`` naming the field ``name``."""
    try:
        return validate_swarm_id(value)  # the wire's rule: the id is in every topic name
    except ProtocolError:
        raise ValueError(f"{name} must be 1-64 characters from a-z, 0-9 and '-', got {value!r}") from None


@dataclass(kw_only=True, slots=True)
class SwarmSection:
    id: str = "default"  # topic namespace; shared by every member
    genesis: float | None = None  # unix time of round 0; None: derived from the id (rounds.py)

    def __post_init__(self) -> None:
        check_swarm_id(self.id)
        if self.genesis is not None:
            _range("genesis", self.genesis, 0.0)


@dataclass(kw_only=True, slots=True)
class NetworkSection:
    data_dir: Path = Path("swarmnode-data")
    listen_host: str = "0.0.0.0"
    port: int = 0  # 0: any free port
    bootstrap: list[str] = field(default_factory=list)  # multiaddrs ending in /p2p/<peer id>
    target_peers: int = 8
    expect_peers: int = 1  # cohort peers to hear before the first step (bounded by join_wait_s)
    join_wait_s: float = 3.0  # longest wait for expect_peers before training alone
    presence_interval_s: float = 2.0
    peer_timeout_s: float = 15.0  # a peer not heard from for this long is no longer expected
    # Ceiling over the caps derived from the model (a dense int8 Δ is ~1 B/param): 8 GiB fits a
    # 7B model; a model whose Δ exceeds it is refused at start, naming this setting.
    max_blob_bytes: int = 8 << 30
    link_mbps: float = 100.0  # this node's link, Mbit/s: sizes the default DiLoCo collection window

    def __post_init__(self) -> None:
        _range("port", self.port, 0, 65535)
        _range("target_peers", self.target_peers, 1, 1000)
        _range("expect_peers", self.expect_peers, 0, 100_000)
        _range("join_wait_s", self.join_wait_s, 0.0, 3600.0)
        _range("presence_interval_s", self.presence_interval_s, 1e-3, 3600.0)
        _range("peer_timeout_s", self.peer_timeout_s, 1e-3, 86_400.0)
        if self.peer_timeout_s <= self.presence_interval_s:
            # every peer would count as gone between two of its own presences
            raise ValueError(
                f"peer_timeout_s must be > presence_interval_s ({self.presence_interval_s}), "
                f"got {self.peer_timeout_s}"
            )
        _range("max_blob_bytes", self.max_blob_bytes, 1 << 20, 1 << 40)
        _range("link_mbps", self.link_mbps, 0.1, 1e6)
        if not self.listen_host:
            raise ValueError("listen_host must be non-empty")
        for addr in self.bootstrap:
            if not addr.startswith("/"):
                raise ValueError(f"bootstrap entries must be multiaddrs starting with '/', got {addr!r}")


@dataclass(kw_only=True, slots=True)
class ModelSection:
    model: str = "tiny"  # a local HF model dir, a hub id (already cached), or "tiny" (built locally)
    engine: Literal["hf", "vllm"] = "hf"
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] | None = None

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model must be non-empty (a path, a hub id or 'tiny')")


@dataclass(kw_only=True, slots=True)
class TaskSection:
    # reverse: the built-in family the tiny CPU model learns by RL within minutes (add is capacity-bound there)
    family: str = "reverse"
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.family:
            raise ValueError("family must be non-empty")
        _range("seed", self.seed, 0, 2**63 - 1)


@dataclass(kw_only=True, slots=True)
class TrainSection:
    optimizer: Literal["adamw", "demo"] = "adamw"
    steps: int | None = None  # None: run until stopped
    duration_s: float | None = None  # None: no wall-clock limit
    eval_every: int = 5
    # held-out problems per evaluation (greedy exact match): accuracy moves in steps of 1/eval_prompts
    eval_prompts: int = 64
    group_size: int = 8
    # Borrowed groups come on top of a full local batch, never instead of it: inside a merging cohort
    # 4 local / 4 borrowed did worse than 8 / 0 (the merge already pools the cohort's experience), and
    # 8 / +4 did best (README, bench_swarm); across cohorts borrowing is the only channel.
    local_groups: int = 8
    external_groups: int = 4
    lr: float = 1e-5
    max_new_tokens: int = 64
    temperature: float = 1.0
    staleness_steps: int = 4
    # which verified external groups a step takes first: "best" (highest-scoring solutions to the
    # problems the sender found hardest) or "fresh" (newest); see swarmnode.replay
    external_prefer: Literal["best", "fresh"] = "best"
    share_rollouts: bool = True

    def __post_init__(self) -> None:
        if self.steps is not None:
            _range("steps", self.steps, 1)
        if self.duration_s is not None:
            _range("duration_s", self.duration_s, 0.0)
        _range("eval_every", self.eval_every, 1)
        _range("eval_prompts", self.eval_prompts, 1, 100_000)
        _range("group_size", self.group_size, 2, 1024)  # GRPO advantages need >= 2 samples
        _range("local_groups", self.local_groups, 0, 4096)
        _range("external_groups", self.external_groups, 0, 4096)
        if self.local_groups + self.external_groups == 0:
            raise ValueError("local_groups + external_groups must be >= 1")
        _range("lr", self.lr, 0.0, 1.0)
        if self.lr == 0:
            raise ValueError("lr must be > 0")
        _range("max_new_tokens", self.max_new_tokens, 1, 32768)
        _range("temperature", self.temperature, 0.0, 10.0)
        _range("staleness_steps", self.staleness_steps, 0, 1_000_000)


@dataclass(kw_only=True, slots=True)
class DemoSection:
    topk: int = 32
    chunk: int = 64
    use_dct: bool = True
    value_codec: Literal["int8", "sign"] = "int8"  # the codecs compression/values.py implements
    gossip: bool = True
    window_s: float = 0.0  # > 0: a step waits up to this long for one peer's whole step of components
    # Peers that publish components in one step: a rotating choice of this many of the cohort
    # (exchange.fanin), so a node receives at most this many peers' components a step. 0: all.
    max_publishers: int = 8

    def __post_init__(self) -> None:
        _range("window_s", self.window_s, 0.0, 600.0)
        _range("max_publishers", self.max_publishers, 0, 100_000)
        _range("chunk", self.chunk, 2, 4096)
        _range("topk", self.topk, 1, self.chunk * self.chunk)


@dataclass(kw_only=True, slots=True)
class DilocoSection:
    enabled: bool = False
    inner_steps: int = 50  # H: inner steps per round (step-based rounds)
    round_seconds: float | None = None  # set: wall-clock rounds from the swarm genesis instead of H
    # Outer step; unset: the delta codec's default (resolved when the section is built, so the
    # field always holds a number). int8: lr 0.7, Nesterov momentum 0.9 (DiLoCo / PRIME values).
    # sparse: lr 1.0, momentum 0 (SparseLoCo's recipe: error feedback already accumulates what was
    # not sent; with momentum 0.9 on top the outer step overshoots and a 4-replica proxy ended 23x
    # worse than not merging at all, see compression/sparsedelta.py).
    outer_lr: float = None  # type: ignore[assignment]
    momentum: float = None  # type: ignore[assignment]
    # How long a round waits for peers' pseudo-gradients at most; None: from the model's Δ size,
    # the expected peers and network.link_mbps (rounds.collect_window).
    collect_seconds: float | None = None
    # How this node codes its pseudo-gradient: dense int8 (~1.016 B/param) or sparse (top-k per
    # 4096 values, 2-bit values, error feedback kept locally: ~0.018 B/param; compression.sparsedelta).
    # sparse-dct: the same in the DCT domain (keeps more of a real Δ, but its decode is a float32
    # matmul: only for a cohort whose nodes share one BLAS build, or anchors may differ in the last
    # bits). A merge accepts any of them from peers, by the blob's header.
    delta_codec: Literal["int8", "sparse", "sparse-dct"] = "int8"
    # Contributors per round: with more live members, a rotating choice of this many contributes and
    # every member pulls only theirs, through relay trees of relay_branching (exchange.fanin); the
    # others carry their whole progress to a later round. 0: every member, pulled from its author.
    merge_fanin: int = 8
    relay_branching: int = 2

    def __post_init__(self) -> None:
        sparse = self.delta_codec != "int8"
        if self.outer_lr is None:
            self.outer_lr = 1.0 if sparse else 0.7
        if self.momentum is None:
            self.momentum = 0.0 if sparse else 0.9
        _range("inner_steps", self.inner_steps, 1)
        if self.round_seconds is not None:
            _range("round_seconds", self.round_seconds, 1e-3)
            if self.collect_seconds is not None and self.collect_seconds > self.round_seconds:
                raise ValueError(
                    f"collect_seconds must be <= round_seconds ({self.round_seconds}), got {self.collect_seconds}"
                )
        _range("outer_lr", self.outer_lr, 1e-6, 10.0)
        _range("momentum", self.momentum, 0.0, 0.999)
        if self.collect_seconds is not None:
            _range("collect_seconds", self.collect_seconds, 1e-3, 3600.0)
        if self.merge_fanin == 1:
            raise ValueError("merge_fanin must be 0 (every member) or >= 2, got 1")
        _range("merge_fanin", self.merge_fanin, 0, 100_000)
        _range("relay_branching", self.relay_branching, 1, 64)


@dataclass(kw_only=True, slots=True)
class CheckpointSection:
    every: int = 50  # steps; 0 disables checkpoints
    keep: int = 3

    def __post_init__(self) -> None:
        _range("every", self.every, 0)
        _range("keep", self.keep, 1, 1000)


@dataclass(kw_only=True, slots=True)
class TelemetrySection:
    metrics: Path | None = None  # JSONL path; None: <data_dir>/metrics.jsonl is the daemon's choice
    mqtt: str | None = None  # mqtt://host:port/prefix; None: telemetry off (NullSink)

    def __post_init__(self) -> None:
        if self.mqtt is None:
            return
        if self.mqtt.startswith("mqtts://"):
            raise ValueError(
                f"mqtt: TLS (mqtts://) is not implemented, got {self.mqtt!r}; use mqtt://host:port/prefix "
                "to a broker on a trusted network, or through a local TLS tunnel"
            )
        if not re.fullmatch(r"mqtt://[^/:]+(:\d+)?(/.*)?", self.mqtt):
            raise ValueError(f"mqtt must look like mqtt://host:port/prefix, got {self.mqtt!r}")


@dataclass(kw_only=True, slots=True)
class NodeConfig:
    swarm: SwarmSection = field(default_factory=SwarmSection)
    network: NetworkSection = field(default_factory=NetworkSection)
    model: ModelSection = field(default_factory=ModelSection)
    task: TaskSection = field(default_factory=TaskSection)
    train: TrainSection = field(default_factory=TrainSection)
    demo: DemoSection = field(default_factory=DemoSection)
    diloco: DilocoSection = field(default_factory=DilocoSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    telemetry: TelemetrySection = field(default_factory=TelemetrySection)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain values (paths as strings), e.g. for the run's metrics header."""
        out: dict[str, dict[str, Any]] = {}
        for f in dataclasses.fields(self):
            sec = getattr(self, f.name)
            out[f.name] = {
                k.name: str(v) if isinstance(v, Path) else v
                for k in dataclasses.fields(sec)
                for v in [getattr(sec, k.name)]
            }
        return out


# -- loading ------------------------------------------------------------------------------------

_SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(NodeConfig)}  # type: ignore[misc]


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return " or ".join(_describe(a) for a in typing.get_args(tp) if a is not type(None)) + " (or 'none')"
    if typing.get_origin(tp) is list:
        return "a list of strings"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string", Path: "a path"}.get(
        tp, str(tp)
    )


def _coerce(value: Any, tp: Any) -> Any:
    """Check ``value`` against the field type; raise TypeError (with what was expected) if it fails."""
    origin = typing.get_origin(tp)
    if isinstance(tp, types.UnionType) or origin is typing.Union:
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() == "none")):
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise TypeError(_describe(tp))
    if origin is list:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise TypeError(_describe(tp))
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Path and isinstance(value, str | Path) and str(value):
        return Path(value)
    raise TypeError(_describe(tp))


def _resolve_key(key: str) -> tuple[str, str]:
    """``section.key`` as is; a bare key if exactly one section has it."""
    if "." in key:
        sec, _, name = key.partition(".")
        return sec, name
    owners = [s for s, cls in _SECTIONS.items() if key in _hints(cls)]
    if len(owners) != 1:
        raise KeyError(key)
    return owners[0], key


def load_config(path: Path | None, overrides: dict[str, Any] | None = None) -> NodeConfig:
    """Defaults ← TOML file ← ``overrides`` (``{"train.lr": 1e-5, ...}``; None values are ignored)."""
    where = str(path) if path is not None else "<defaults>"
    raw: dict[str, dict[str, Any]] = {s: {} for s in _SECTIONS}
    origin: dict[tuple[str, str], str] = {}  # where each value came from, for error messages
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as e:
            raise ConfigError(f"{where}: cannot read config file: {e.strerror}") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{where}: not valid TOML: {e}") from e
        for sec, body in data.items():
            if sec not in _SECTIONS:
                raise ConfigError(f"{where}: unknown section [{sec}] (allowed: {', '.join(_SECTIONS)})")
            if not isinstance(body, dict):
                raise ConfigError(f"{where}: {sec} must be a [section] table")
            raw[sec].update(body)
            origin.update({(sec, k): where for k in body})
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        try:
            sec, name = _resolve_key(key)
        except KeyError:
            raise ConfigError(f"command line: unknown or ambiguous setting {key!r}") from None
        if sec not in _SECTIONS:
            raise ConfigError(f"command line: unknown section in {key!r} (allowed: {', '.join(_SECTIONS)})")
        raw[sec][name] = value
        origin[(sec, name)] = "command line"
    sections: dict[str, Any] = {}
    for sec, cls in _SECTIONS.items():
        hints = _hints(cls)
        kwargs: dict[str, Any] = {}
        for name, value in raw[sec].items():
            src = origin.get((sec, name), where)
            if name not in hints:
                raise ConfigError(f"{src}: unknown key {sec}.{name} (allowed: {', '.join(hints)})")
            try:
                kwargs[name] = _coerce(value, hints[name])
            except TypeError as e:
                raise ConfigError(f"{src}: {sec}.{name} must be {e}, got {value!r}") from None
        try:
            sections[sec] = cls(**kwargs)
        except ValueError as e:
            # the section names its field; say which sources fed the section
            srcs = sorted({origin[(sec, n)] for n in raw[sec]}) or [where]
            raise ConfigError(f"{' + '.join(srcs)}: {sec}.{e}") from None
    return NodeConfig(**sections)
