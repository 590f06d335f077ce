"""The joiner's state stream: chunked, verified per chunk, resumable across donors, checked against
our model before anything is pulled, and loaded without a second copy."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch
from fakes import Bus, FakeHost
from swarmnode.compression.state import MIN_CHUNK

from swarmnode.exchange.catchup import (
    CatchupError,
    StateServer,
    StateTransfer,
    expected_layout,
    load_state_file,
    snapshot_of,
)
from swarmnode.optim.diloco import DiLoCo

COHORT = "ab" * 16


def _replica(seed: int, *, steps: int = 1) -> tuple[torch.nn.Module, DiLoCo]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 64))
    diloco = DiLoCo(model.named_parameters())
    for _ in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
        diloco.outer_step(diloco.pseudo_gradient())
    return model, diloco


def _serve(bus: Bus, name: str, diloco: DiLoCo) -> tuple[FakeHost, StateServer]:
    host = FakeHost(bus, name)
    server = StateServer(host, COHORT)
    server.update(snapshot_of(diloco, round=3, step=30, chunk=MIN_CHUNK))
    from swarmnode.exchange.catchup import STATE_PROTOCOL

    host.set_request_handler(STATE_PROTOCOL, server.handle)
    return host, server


class FlakyHost(FakeHost):
    """A joiner's host whose pulls from ``donor`` fail after ``ok`` chunks (the donor died)."""

    def __init__(self, bus: Bus, name: str, donor: str, ok: int) -> None:
        super().__init__(bus, name)
        self.donor, self.ok, self.pulls = donor, ok, 0

    async def fetch(self, content_hash: str, providers: list[str], *, max_size: int) -> bytes:
        if providers == [self.donor] and content_hash in self.bus.hosts[self.donor].views:
            self.pulls += 1
            if self.pulls > self.ok:
                raise ConnectionError(f"{self.donor} went away")
        return await super().fetch(content_hash, providers, max_size=max_size)


def _pull(host: Any, donors: list[str], path: Path, diloco: DiLoCo) -> tuple[StateTransfer, Any, Any]:
    transfer = StateTransfer(host, COHORT, path, expected_layout(diloco))

    async def go() -> tuple[Any, Any]:
        last: Exception | None = None
        for donor in donors:
            try:
                return await transfer.pull(donor)
            except Exception as exc:
                last = exc
        raise CatchupError(f"every donor failed: {last}")

    manifest, index = asyncio.run(go())
    return transfer, manifest, index


def test_a_transfer_resumes_from_another_donor_and_loads_exactly(tmp_path: Path) -> None:
    _, src = _replica(0)
    bus = Bus()
    _serve(bus, "donor1", src)
    _serve(bus, "donor2", src)  # same state: same index, same chunks
    _joiner_model, joiner = _replica(9, steps=0)
    host = FlakyHost(bus, "joiner", "donor1", ok=2)
    path = tmp_path / "state.part"
    transfer, manifest, index = _pull(host, ["donor1", "donor2"], path, joiner)
    assert len(index.chunks) > 3
    assert transfer.chunks_kept >= 2  # what donor1 sent before dying was not pulled again
    load_state_file(joiner, path, index, anchor_hash=manifest.anchor_hash)
    assert joiner.anchor_hash() == src.anchor_hash()
    for name, t in src.buffers.items():
        assert torch.equal(joiner.buffers[name], t)


def test_a_corrupted_chunk_is_refused_and_the_next_donor_serves_it(tmp_path: Path) -> None:
    _, src = _replica(0)
    bus = Bus()
    evil, _ = _serve(bus, "evil", src)
    size, _read = next(iter(evil.views.values()))
    digest = next(iter(evil.views))
    evil.views[digest] = (size, lambda a, b: b"\x00" * (b - a))  # a chunk that lies about its bytes
    _serve(bus, "honest", src)
    _, joiner = _replica(9, steps=0)
    path = tmp_path / "state.part"
    with pytest.raises(CatchupError):
        _pull(FakeHost(bus, "j1"), ["evil"], path, joiner)
    _, manifest, index = _pull(FakeHost(bus, "j2"), ["evil", "honest"], tmp_path / "s2", joiner)
    load_state_file(joiner, tmp_path / "s2", index, anchor_hash=manifest.anchor_hash)
    assert joiner.anchor_hash() == src.anchor_hash()


def test_a_state_for_another_model_is_refused_before_any_chunk_is_pulled(tmp_path: Path) -> None:
    torch.manual_seed(1)
    other = torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.Linear(128, 64))
    bus = Bus()
    _serve(bus, "donor", DiLoCo(other.named_parameters()))
    _, joiner = _replica(9, steps=0)
    host = FlakyHost(bus, "joiner", "donor", ok=10**6)
    with pytest.raises(CatchupError, match="our model needs"):
        _pull(host, ["donor"], tmp_path / "s", joiner)
    assert host.pulls == 0


def test_a_state_whose_anchor_is_not_the_announced_one_is_not_loaded(tmp_path: Path) -> None:
    _, src = _replica(0)
    bus = Bus()
    _serve(bus, "donor", src)
    _joiner_model, joiner = _replica(9, steps=0)
    before = joiner.anchor_hash()
    path = tmp_path / "s"
    _, _manifest, index = _pull(FakeHost(bus, "j"), ["donor"], path, joiner)
    with pytest.raises(CatchupError, match="anchor hashes"):
        load_state_file(joiner, path, index, anchor_hash="f" * 64)
    assert joiner.anchor_hash() == before
