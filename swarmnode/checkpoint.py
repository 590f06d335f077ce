"""Atomic, hash-verified checkpoints: safetensors for tensors, JSON for everything else. No pickle.

Layout: ``<dir>/step-00000042/{tensors.safetensors, state.json, manifest.json}``. A checkpoint is written
into a temporary sibling directory, every file and the directory are fsynced, and only then is the
directory renamed into place, so a crash leaves either the old set or the new one, never half of one.
``load_latest`` re-hashes every file against the manifest and falls back to the previous checkpoint
when the newest one is torn or corrupt (a disk can still lie after rename).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

log = logging.getLogger(__name__)

_PREFIX = "step-"
_TMP_PREFIX = ".tmp-"
_FILES = ("tensors.safetensors", "state.json")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """``tensors`` in the safetensors format, written one tensor at a time from its own memory:
    ``safetensors.torch.save_file`` builds every tensor's bytes first, a second full copy of a
    checkpoint (at 0.5 B parameters: weights, fp32 anchor, DeMo state, ~5 GB) on top of the first."""
    names = sorted(tensors)
    header: dict[str, Any] = {}
    at = 0
    for name in names:
        t = tensors[name]
        if t.dtype not in _ST_DTYPES:
            raise ValueError(f"checkpoint tensor {name}: dtype {t.dtype} has no safetensors name")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [at, at + n]}
        at += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in names:
            t = tensors[name].detach().to("cpu").contiguous()  # a copy only if it was not contiguous
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)


class CheckpointManager:
    """Keeps the last ``keep`` checkpoints of one node under ``directory``."""

    def __init__(self, directory: str | Path, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"keep: expected >= 1, got {keep}")
        self.directory = Path(directory)
        self.keep = keep
        self.directory.mkdir(parents=True, exist_ok=True)

    def _checkpoints(self) -> list[tuple[int, Path]]:
        found = []
        for p in self.directory.iterdir():
            if p.is_dir() and p.name.startswith(_PREFIX) and p.name[len(_PREFIX) :].isdigit():
                found.append((int(p.name[len(_PREFIX) :]), p))
        return sorted(found)

    def save(self, step: int, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> Path:
        if step < 0:
            raise ValueError(f"step: expected >= 0, got {step}")
        final = self.directory / f"{_PREFIX}{step:08d}"
        tmp = self.directory / f"{_TMP_PREFIX}{step:08d}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        write_safetensors(tmp / "tensors.safetensors", tensors)
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, sort_keys=True), encoding="utf-8")
        manifest = {"step": step, "files": {name: _sha256(tmp / name) for name in _FILES}}
        (tmp / "manifest.json").write_text(json.dumps(manifest, sort_keys=True), encoding="utf-8")
        for name in (*_FILES, "manifest.json"):
            _fsync_file(tmp / name)
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step (e.g. final checkpoint right after a periodic one)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.directory)
        self._prune()
        return final

    def _prune(self) -> None:
        for _, path in self._checkpoints()[: -self.keep]:
            shutil.rmtree(path, ignore_errors=True)
        # Temp dirs are leftovers of crashed saves (ours are renamed away before we get here).
        for p in self.directory.iterdir():
            if p.name.startswith(_TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)

    def _load(self, path: Path) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]]:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        for name in _FILES:
            expected = manifest["files"][name]
            if _sha256(path / name) != expected:
                raise ValueError(f"{path / name}: sha256 does not match the manifest")
        tensors = load_file(str(path / "tensors.safetensors"))
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        return int(manifest["step"]), tensors, state

    def load_latest(self) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]] | None:
        """Newest checkpoint whose files match their manifest; torn or corrupt ones are skipped."""
        for _, path in reversed(self._checkpoints()):
            try:
                return self._load(path)
            except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
                log.warning("skipping checkpoint %s: %s", path, exc)
        return None


# --- torch optimizer state <-> named tensors + JSON (no pickle) ---------------------------------


def optimizer_to_tensors(
    opt: torch.optim.Optimizer, prefix: str = "optim."
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten ``opt.state_dict()``: tensors become ``{prefix}{param_index}.{key}``, the rest JSON."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    meta = {"param_groups": groups, "scalars": scalars, "prefix": prefix}
    json.dumps(meta)  # fail here, not at save time, if an optimizer keeps non-JSON state
    return tensors, meta


def optimizer_from_tensors(
    opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    """Inverse of :func:`optimizer_to_tensors`; loads into ``opt`` in place."""
    prefix = meta["prefix"]
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if not name.startswith(prefix):
            continue
        index, key = name[len(prefix) :].split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for index, entry in meta["scalars"].items():
        state.setdefault(int(index), {}).update(entry)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    opt.load_state_dict({"state": state, "param_groups": groups})
