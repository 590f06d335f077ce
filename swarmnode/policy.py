"""The policy: a Hugging Face causal LM + tokenizer, and the fingerprint that names its cohort.

Nodes whose fingerprints match run the same architecture with the same tokenizer, so they can share
gradient components and merge weights; everything else shares only rollouts (text).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# Architecture fields that decide whether two models' tensors line up one-to-one. Anything not in a
# given config is simply absent from the hash (configs differ by model type).
_ARCH_KEYS = (
    "model_type",
    "architectures",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "tie_word_embeddings",
    "rope_theta",
    "hidden_act",
)


@dataclass(slots=True)
class Policy:
    model: Any
    tokenizer: Any
    fingerprint: str
    path: str


def decodable_vocab(model: Any, tokenizer: Any) -> int | None:
    """How many output ids the tokenizer can decode, when the model's output layer has more rows.

    Padded vocabularies are common (Qwen2.5: 151,936 rows for 151,665 tokens). Rows past the
    tokenizer decode to nothing, so a completion sampled there scores nothing and teaches nothing; a
    randomly initialised model of real size puts almost all its mass there. The sampler and the trainer
    mask those ids (one distribution for both). None when nothing needs masking.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    rows = int(head.weight.shape[0]) if head is not None and hasattr(head, "weight") else 0
    n = len(tokenizer) if hasattr(tokenizer, "__len__") else 0
    return n if 0 < n < rows else None


def model_fingerprint(model_config: Any, tokenizer: Any) -> str:
    """sha256 hex over the architecture config and the tokenizer's vocabulary and special tokens."""
    cfg = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    arch = {k: cfg[k] for k in _ARCH_KEYS if cfg.get(k) is not None}
    vocab = sorted(tokenizer.get_vocab().items())
    special = {
        k: getattr(tokenizer, k, None)
        for k in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")
    }
    blob = json.dumps({"arch": arch, "vocab": vocab, "special": special}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _looks_local(path_or_id: str) -> bool:
    # Hub ids are "name" or "org/name"; anything absolute, relative-dotted or deeper is a path.
    return (
        os.path.isabs(path_or_id)
        or path_or_id.startswith(("./", "../", "~"))
        or path_or_id.count("/") > 1
        or Path(path_or_id).exists()
    )


def _resolve_dtype(dtype: Any) -> Any:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype != "auto":
        value = getattr(torch, dtype, None)
        if not isinstance(value, torch.dtype):
            raise ValueError(f"dtype must be a torch dtype name such as 'bfloat16', got {dtype!r}")
        return value
    return dtype


# A tokenizer saved as the generic class: AutoTokenizer would pick the class of the model type instead
# (Qwen2Tokenizer for a qwen2 model) and replace our character pre-tokenizer with byte-level BPE rules.
_GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    cfg_path = Path(name) / "tokenizer_config.json"
    if cfg_path.is_file() and (Path(name) / "tokenizer.json").is_file():
        try:
            cls = json.loads(cfg_path.read_text()).get("tokenizer_class")
        except ValueError as exc:
            raise ValueError(f"{cfg_path} is not valid JSON: {exc}") from exc
        if cls in _GENERIC_TOKENIZERS:
            return PreTrainedTokenizerFast.from_pretrained(name)
    return AutoTokenizer.from_pretrained(name)


def load_policy(path_or_hub_id: str | os.PathLike[str], *, device: str = "cpu", dtype: Any = None) -> Policy:
    """Load model + tokenizer from a local directory or a hub id; the tokenizer pads on the left."""
    from transformers import AutoModelForCausalLM

    name = os.fspath(path_or_hub_id)
    if _looks_local(name):
        local = Path(name).expanduser()
        if not (local / "config.json").is_file():
            raise FileNotFoundError(
                f"no model at {local}: expected a Hugging Face model directory with config.json "
                "(build the tiny one with swarmnode.tinymodel.build_tiny_policy)"
            )
        name = str(local)
    tokenizer = _load_tokenizer(name)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        # Generation batches need a pad token; reusing EOS is the standard choice for causal LMs.
        tokenizer.pad_token = tokenizer.eos_token
    kwargs: dict[str, Any] = {}
    resolved = _resolve_dtype(dtype)
    if resolved is not None:
        kwargs["dtype"] = resolved
    model: Any = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    model = model.to(device)
    model.eval()
    return Policy(
        model=model, tokenizer=tokenizer, fingerprint=model_fingerprint(model.config, tokenizer), path=name
    )
