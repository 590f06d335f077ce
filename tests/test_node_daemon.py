"""`swarmnode run` entry point: flags and config errors (the running daemon is covered by
test_localswarm.py's real-process tests)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from swarmnode import daemon


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    daemon.add_arguments(parser)
    return parser.parse_args(argv)


def test_bad_flags_exit_2_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert daemon.main(_parse(["--data-dir", str(tmp_path), "--listen", "tcp:4001"])) == 2
    assert "--listen" in capsys.readouterr().err
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[train]\nbogus = 1\n")
    assert daemon.main(_parse(["--config", str(cfg)])) == 2
    assert "train.bogus" in capsys.readouterr().err


def test_flags_win_over_file(tmp_path: Path) -> None:
    from swarmnode.flags import config_from_args

    cfg = tmp_path / "node.toml"
    cfg.write_text('[swarm]\nid = "from-file"\n[train]\nsteps = 5\n')
    args = _parse(
        ["--config", str(cfg), "--steps", "7", "--expect-peers", "2", "--listen", "/ip4/127.0.0.1/tcp/0"]
    )
    resolved = config_from_args(args)
    assert resolved.swarm.id == "from-file"
    assert resolved.train.steps == 7
    assert (resolved.network.listen_host, resolved.network.port) == ("127.0.0.1", 0)
    assert resolved.network.expect_peers == 2
