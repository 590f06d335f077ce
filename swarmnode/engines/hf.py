"""Rollout engine on transformers ``generate``: batched, KV-cached, seeded, with per-token logprobs."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from swarmnode.engines.base import Sample, SamplingParams


class _MaskPastVocab(LogitsProcessor):
    """Output ids at or past ``n`` (rows of a padded vocabulary the tokenizer cannot decode) get -inf."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores[:, self.n :] = float("-inf")
        return scores


class HFEngine:
    """Generates with the policy's own model object.

    Sharing the trainer's model means an optimizer step is already visible here, so ``update_weights``
    skips tensors that *are* the model's parameters (same storage) and copies anything else in place.
    ``batch_size`` bounds how many prompts go through ``generate`` at once (memory on small machines).
    """

    name = "hf"

    def __init__(self, policy: Any, *, batch_size: int = 64) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.policy = policy
        self.model = policy.model
        self.tokenizer = policy.tokenizer
        self.batch_size = batch_size
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; batched generation needs one")
        if self.tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos token; completions could not end")
        self._closed = False
        from swarmnode.policy import decodable_vocab

        self.vocab = decodable_vocab(self.model, self.tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[Sample]]:
        if self._closed:
            raise RuntimeError("HFEngine is closed")
        out: list[list[Sample]] = []
        # One RNG stream per call, forked so the caller's global torch RNG is left untouched.
        with torch.random.fork_rng(devices=[] if self.device.type == "cpu" else [self.device]):
            if params.seed is not None:
                torch.manual_seed(params.seed)
            for i in range(0, len(prompts), self.batch_size):
                out.extend(self._generate_batch(prompts[i : i + self.batch_size], params))
        return out

    @torch.no_grad()
    def _generate_batch(self, prompts: list[str], params: SamplingParams) -> list[list[Sample]]:
        if not prompts:
            return []
        tok = self.tokenizer
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=True).to(self.device)
        kwargs: dict[str, Any] = {
            "max_new_tokens": params.max_new_tokens,
            "num_return_sequences": params.n,
            "return_dict_in_generate": True,
            "output_scores": True,
            "pad_token_id": tok.pad_token_id,
            "eos_token_id": tok.eos_token_id,
        }
        if self.vocab is not None:
            kwargs["logits_processor"] = LogitsProcessorList([_MaskPastVocab(self.vocab)])
        if params.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
        was_training = self.model.training
        self.model.eval()
        try:
            gen = self.model.generate(**enc, **kwargs)
        finally:
            self.model.train(was_training)
        new = gen.sequences[:, enc["input_ids"].shape[1] :].cpu()
        # scores[t] are the processed logits (temperature, top-p) the token at step t was drawn from.
        if gen.scores:
            logp = torch.stack([torch.log_softmax(s.float(), dim=-1) for s in gen.scores], dim=1).cpu()
            chosen = logp.gather(-1, new[:, : logp.shape[1]].unsqueeze(-1)).squeeze(-1)
        else:
            chosen = torch.zeros(new.shape)
        samples: list[Sample] = []
        for row in range(new.shape[0]):
            ids = new[row].tolist()
            if tok.eos_token_id in ids:
                ids = ids[: ids.index(tok.eos_token_id) + 1]  # keep EOS: the policy must learn to stop
            else:
                ids = [t for t in ids if t != tok.pad_token_id]
            text = tok.decode(ids, skip_special_tokens=True)
            samples.append(Sample(token_ids=ids, text=text, logprobs=chosen[row, : len(ids)].tolist()))
        return [samples[i * params.n : (i + 1) * params.n] for i in range(len(prompts))]

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        own = dict(self.model.named_parameters())
        own.update(dict(self.model.named_buffers()))
        for name, tensor in named_tensors:
            target = own.get(name)
            if target is None:
                raise KeyError(f"update_weights: the model has no tensor named {name!r}")
            if target is tensor or (
                target.device == tensor.device and target.data_ptr() == tensor.data_ptr()
            ):
                continue  # shared with the trainer: already up to date
            if target.shape != tensor.shape:
                raise ValueError(
                    f"update_weights: {name} has shape {tuple(tensor.shape)}, want {tuple(target.shape)}"
                )
            target.copy_(tensor.detach())

    def close(self) -> None:
        self._closed = True
