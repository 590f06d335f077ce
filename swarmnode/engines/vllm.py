"""Rollout engine on vLLM, in-process (GPU; optional extra ``pip install 'swarmnode[vllm]'``).

vLLM runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so weights can be pushed without a
serving round trip: ``collective_rpc`` reaches the worker, whose ``model_runner.model.load_weights``
takes (name, tensor) pairs in the Hugging Face naming; the prefix cache is then reset because cached
KV blocks were computed with the old weights. ``logprobs_mode="processed_logprobs"`` makes the
returned logprobs those of the temperature/top-p-processed distribution the tokens were sampled from,
the same quantity the HF engine reports.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch

from swarmnode.engines.base import Sample, SamplingParams

INSTALL_HINT = (
    "vLLM is not installed; install the optional extra: pip install 'swarmnode[vllm]' (needs a CUDA GPU)"
)


def _import_vllm() -> Any:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    return vllm


def _load_weights_on_worker(worker: Any, weights: list[tuple[str, torch.Tensor]]) -> int:
    # Runs inside the vLLM worker via collective_rpc; tensors move to the worker's device there.
    model = worker.model_runner.model
    device = next(model.parameters()).device
    model.load_weights(weights=[(n, t.to(device)) for n, t in weights])
    return len(weights)


class VLLMEngine:
    name = "vllm"

    def __init__(
        self,
        policy: Any,
        *,
        gpu_memory_utilization: float = 0.5,
        max_model_len: int | None = None,
        dtype: str = "auto",
        enforce_eager: bool = True,
        **llm_options: Any,
    ) -> None:
        vllm = _import_vllm()
        if not torch.cuda.is_available():
            raise RuntimeError("VLLMEngine needs a CUDA GPU; use the 'hf' engine on this machine")
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        if not policy.path or not os.path.isdir(policy.path):
            raise ValueError(f"VLLMEngine loads the policy from its directory; {policy.path!r} is not one")
        self._vllm = vllm
        self.policy = policy
        self.tokenizer = policy.tokenizer
        options: dict[str, Any] = {
            "model": policy.path,
            "gpu_memory_utilization": gpu_memory_utilization,
            "dtype": dtype,
            "enforce_eager": enforce_eager,
            "logprobs_mode": "processed_logprobs",
            **llm_options,
        }
        if max_model_len is not None:
            options["max_model_len"] = max_model_len
        self.llm = vllm.LLM(**options)
        # The policy's weights may already differ from the directory (resumed or merged).
        self.update_weights(policy.model.named_parameters())

    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[Sample]]:
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
        weights = [(n, t.detach().cpu()) for n, t in named_tensors]
        self.llm.collective_rpc(_load_weights_on_worker, args=(weights,))
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        self.llm = None
        if llm is not None:
            del llm
            torch.cuda.empty_cache()
