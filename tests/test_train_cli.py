"""``swarmnode train``: argument defaults, and a real process killed mid-run resumes from its checkpoint."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from swarmnode import train
from swarmnode.checkpoint import CheckpointManager


def test_arguments_and_defaults(tmp_path):
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    args = parser.parse_args(["--data-dir", str(tmp_path), "--optimizer", "demo", "--steps", "3"])
    assert args.optimizer == "demo"
    assert args.steps == 3
    assert args.model is None
    assert train.DEFAULT_LR["demo"] > train.DEFAULT_LR["adamw"]  # sign steps: see optim.demo
    with pytest.raises(SystemExit):
        parser.parse_args(["--data-dir", str(tmp_path), "--optimizer", "sgd"])


@pytest.fixture
def model_dir(request) -> Path:
    pytest.importorskip("swarmnode.tinymodel")
    pytest.importorskip("swarmnode.engines")
    try:
        return Path(request.getfixturevalue("tiny_policy_dir"))
    except pytest.FixtureLookupError:
        pytest.skip("the shared tiny_policy_dir fixture is not available")


def _cmd(model: Path, data: Path, steps: int) -> list[str]:
    return [
        sys.executable, "-m", "swarmnode.cli", "train", "--model", str(model), "--data-dir", str(data),
        "--steps", str(steps), "--checkpoint-every", "2", "--eval-every", "0", "--eval-n", "8",
        "--group-size", "4", "--local-groups", "2", "--max-new-tokens", "4", "--no-progress",
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sigkill_mid_run_resumes_from_last_checkpoint(tmp_path, model_dir):
    data = tmp_path / "node"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        _cmd(model_dir, data, 1000), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 90
        mgr = CheckpointManager(data / "checkpoints")
        while time.monotonic() < deadline and proc.poll() is None:
            loaded = mgr.load_latest() if (data / "checkpoints").exists() else None
            if loaded is not None and loaded[0] >= 4:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
        proc.send_signal(signal.SIGKILL)  # no chance to write a final checkpoint
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
    killed_at = CheckpointManager(data / "checkpoints").load_latest()[0]
    assert killed_at >= 4
    target = killed_at + 2
    out = subprocess.run(_cmd(model_dir, data, target), env=env, capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"resumed from checkpoint at step {killed_at}" in out.stdout
    step, _, state = CheckpointManager(data / "checkpoints").load_latest()
    assert step == target
    assert state["optimizer_name"] == "adamw"
    rows = [line for line in (data / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(rows) >= target  # the killed run's steps plus the resumed ones
