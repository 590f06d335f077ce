from __future__ import annotations

import json

import pytest

from swarmnode.policy import load_policy, model_fingerprint
from swarmnode.tinymodel import BUILD_INFO, build_tiny_policy, build_tokenizer


def test_load_policy_and_fingerprint_is_stable(tiny_policy_dir):
    a = load_policy(tiny_policy_dir)
    b = load_policy(str(tiny_policy_dir))
    assert a.fingerprint == b.fingerprint
    assert len(a.fingerprint) == 64
    assert a.tokenizer.padding_side == "left"
    assert a.path == str(tiny_policy_dir)
    assert model_fingerprint(a.model.config, a.tokenizer) == a.fingerprint


def test_fingerprint_changes_with_architecture_or_tokenizer(tiny_policy_dir):
    p = load_policy(tiny_policy_dir)
    cfg = p.model.config.to_dict()
    cfg["num_hidden_layers"] += 1
    assert model_fingerprint(cfg, p.tokenizer) != p.fingerprint
    tok = build_tokenizer()
    tok.add_tokens(["@"])
    assert model_fingerprint(p.model.config, tok) != p.fingerprint


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model at"):
        load_policy(tmp_path / "absent")


def test_tokenizer_round_trips_characters(tiny_policy_dir):
    tok = load_policy(tiny_policy_dir).tokenizer
    text = "cnt:a:abc d=12+3"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert tok.encode(text, add_special_tokens=True)[0] == tok.bos_token_id


def test_build_is_cached(tiny_policy_dir):
    info = json.loads((tiny_policy_dir / BUILD_INFO).read_text())
    mtime = (tiny_policy_dir / "model.safetensors").stat().st_mtime_ns
    out = build_tiny_policy(
        tiny_policy_dir, **{k: info["spec"][k] for k in ("family", "seed", "warmup_steps")}
    )
    assert out == tiny_policy_dir
    assert (tiny_policy_dir / "model.safetensors").stat().st_mtime_ns == mtime


def test_build_is_deterministic(tmp_path):
    a = build_tiny_policy(tmp_path / "a", warmup_steps=2)
    b = build_tiny_policy(tmp_path / "b", warmup_steps=2)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_build_rejects_unknown_family(tmp_path):
    with pytest.raises(KeyError, match="unknown task family"):
        build_tiny_policy(tmp_path / "x", family="nope", warmup_steps=1)


def test_rescoring_family_is_warmed_up_on_its_base_questions():
    from swarmnode.tinymodel import WARMUP_STEPS, default_warmup_steps

    assert default_warmup_steps("reverse") == WARMUP_STEPS["reverse"]
    assert default_warmup_steps("reverse-exact") == WARMUP_STEPS["reverse-exact"]
    assert default_warmup_steps("count-exact") == WARMUP_STEPS["count"]  # no entry of its own
    with pytest.raises(KeyError, match="unknown task family"):
        default_warmup_steps("nope")
