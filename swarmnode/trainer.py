"""GRPO with SAPO experience sharing: I local groups + J verified external groups per step.

Loss choices (documented because they change what the numbers mean):

- Advantages are group-normalised, ``(r - mean) / (std + eps)``; zero-variance groups carry no signal and
  are skipped (counted as ``skipped_groups``).
- The clipped-ratio loss is normalised **per token over the whole batch** (DAPO style): every completion
  token weighs the same, so long wrong answers are not diluted the way per-sequence means dilute them.
- beta = 0: no reference model. The KL reported is the k3 estimate of KL(sampler || current policy)
  from the sampling logprobs, a drift monitor only.
- "Old" logprobs are recomputed under the current policy before the update, so with ``ppo_epochs=1`` the
  ratio is exactly 1 and the loss is the plain policy gradient; later epochs are clipped.
- External groups are re-tokenised from their TEXT with the local tokenizer (another model may tokenise
  differently), plus EOS (see ``swarmnode.verify``). Only when the sender is in our cohort (same
  fingerprint, so same tokenizer and token ids) and its token ids are exactly that re-tokenisation do
  its ids and logprobs get used; then each token gets the truncated importance weight
  ``min(1, pi_local / pi_sender)`` (detached), which damps tokens the sender liked much more than we do.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from swarmnode.metrics import MetricsWriter


@dataclass(kw_only=True, slots=True)
class GRPOConfig:
    task: str = "reverse"
    seed: int = 0
    group_size: int = 8
    local_groups: int = 4
    external_groups: int = 4
    lr: float = 1e-4
    clip_low: float = 0.2
    clip_high: float = 0.28
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    staleness_steps: int = 8
    grad_clip: float = 1.0
    ppo_epochs: int = 1
    micro_batch: int = 32
    eval_batch: int = 64
    adv_eps: float = 1e-4

    def __post_init__(self) -> None:
        for name in (
            "group_size",
            "local_groups",
            "max_new_tokens",
            "ppo_epochs",
            "micro_batch",
            "eval_batch",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.group_size < 2:
            raise ValueError(f"group_size: expected >= 2 (advantages need a group), got {self.group_size}")
        if self.external_groups < 0 or self.staleness_steps < 0:
            raise ValueError("external_groups, staleness_steps: expected >= 0")
        if not self.lr > 0:
            raise ValueError(f"lr: expected > 0, got {self.lr}")
        if not 0 <= self.clip_low < 1 or not self.clip_high >= 0:
            raise ValueError(
                f"clip_low/clip_high: expected 0 <= clip_low < 1, clip_high >= 0, got {self.clip_low}, {self.clip_high}"
            )
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")
        if not self.grad_clip > 0:
            raise ValueError(f"grad_clip: expected > 0, got {self.grad_clip}")


@dataclass(kw_only=True, slots=True)
class Group:
    """G completions of one problem. ``samples`` have ``.text`` and, for local ones, ``.token_ids``/``.logprobs``.

    ``sender_logprobs`` is set only for same-cohort external groups (see module docstring).
    """

    problem: Any
    samples: list[Any]
    rewards: list[float]
    source: str = "local"
    policy_step: int = 0
    sender_logprobs: list[list[float]] | None = None
    # Token ids to train on for external groups, set by verification (EOS included, so a shared
    # completion also teaches where to stop); None: re-tokenise the text.
    completion_ids: list[list[int]] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def group_advantages(rewards: list[float] | torch.Tensor, eps: float = 1e-4) -> torch.Tensor | None:
    """(r - mean) / (std + eps), or None for a zero-variance group (no learning signal)."""
    r = torch.as_tensor(rewards, dtype=torch.float32)
    std = r.std(unbiased=False)
    if r.numel() < 2 or float(std) < 1e-6:
        return None
    return (r - r.mean()) / (std + eps)


def clipped_token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    weights: torch.Tensor | None = None,
    n_tokens: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-level clipped surrogate. Shapes: logp/old_logp/mask/weights [B, T], advantages [B].

    Returns the loss summed over tokens and divided by ``n_tokens`` (default: tokens in this batch), so
    micro-batches of one step can be accumulated and still be a per-token mean over the step.
    """
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(1)
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * adv)
    per_token = -surrogate
    if weights is not None:
        per_token = per_token * weights
    denom = float(mask.sum()) if n_tokens is None else n_tokens
    loss = (per_token * mask).sum() / max(denom, 1.0)
    with torch.no_grad():
        clipped = ((ratio < 1 - clip_low) | (ratio > 1 + clip_high)).float()
        frac = float((clipped * mask).sum() / mask.sum().clamp_min(1))
    return loss, {"clip_frac": frac}


def k3_kl(sample_logp: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor) -> float:
    """k3 estimator of KL(sampler || current) per token: E[exp(d) - d - 1], d = logp - sample_logp."""
    d = (logp - sample_logp).clamp(-20, 20)
    kl = torch.exp(d) - d - 1
    return float((kl * mask).sum() / mask.sum().clamp_min(1))


@dataclass(slots=True)
class _Row:
    prompt_ids: list[int]
    completion_ids: list[int]
    advantage: float
    sample_logp: list[float] | None
    sender_logp: list[float] | None


class Trainer:
    """Owns one policy, its rollout engine and optimizer. Synchronous: callers wrap in ``asyncio.to_thread``."""

    def __init__(
        self,
        policy: Any,
        engine: Any,
        optimizer: torch.optim.Optimizer,
        config: GRPOConfig,
        metrics: MetricsWriter | None = None,
    ) -> None:
        self.policy = policy
        self.model = policy.model
        self.tokenizer = policy.tokenizer
        self.engine = engine
        self.optimizer = optimizer
        self.config = config
        self.metrics = metrics or MetricsWriter(None)
        self.samples_seen = 0
        self._family: Any = None
        from swarmnode.policy import decodable_vocab

        self.vocab = decodable_vocab(self.model, self.tokenizer)  # mask output ids past the tokenizer

    # --- rollouts -------------------------------------------------------------------------------

    @property
    def family(self) -> Any:
        if self._family is None:
            from swarmnode.tasks import get_family

            self._family = get_family(self.config.task)
        return self._family

    def step_seed(self, step: int) -> int:
        # Distinct nodes (seeds) draw distinct problems; the same node replays the same ones on resume.
        return (self.config.seed * 1_000_003 + step) % (2**31 - 1)

    def collect_local(self, step: int) -> list[Group]:
        from swarmnode.engines import SamplingParams

        cfg = self.config
        seed = self.step_seed(step)
        problems = [self.family.problem(seed, i) for i in range(cfg.local_groups)]
        params = SamplingParams(
            n=cfg.group_size,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            seed=seed,
        )
        outputs = self.engine.generate([p.prompt for p in problems], params)
        groups = []
        for problem, samples in zip(problems, outputs, strict=True):
            rewards = [float(self.family.score(problem, s.text)) for s in samples]
            groups.append(Group(problem=problem, samples=list(samples), rewards=rewards, policy_step=step))
        return groups

    # --- training -------------------------------------------------------------------------------

    def _encode(self, text: str, special: bool) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=special))

    def _rows(self, groups: list[Group]) -> tuple[list[_Row], int]:
        rows, skipped = [], 0
        for g in groups:
            adv = group_advantages(g.rewards, self.config.adv_eps)
            if adv is None:
                skipped += 1
                continue
            prompt_ids = self._encode(g.problem.prompt, True)
            for i, s in enumerate(g.samples):
                local = g.source == "local" and getattr(s, "token_ids", None)
                if local:
                    ids = list(s.token_ids)
                elif g.completion_ids is not None:
                    ids = list(g.completion_ids[i])
                else:
                    ids = self._encode(s.text, False)
                ids = ids[: self.config.max_new_tokens * 4]  # bound foreign text re-tokenised by us
                if not ids:
                    continue
                slp = (
                    list(s.logprobs) if local and len(getattr(s, "logprobs", []) or []) == len(ids) else None
                )
                sender = g.sender_logprobs[i] if g.sender_logprobs is not None else None
                if sender is not None and len(sender) != len(ids):
                    sender = None  # re-tokenisation changed the token count: weights would be misaligned
                rows.append(_Row(prompt_ids, ids, float(adv[i]), slp, sender))
        return rows, skipped

    def _batch_logp(self, rows: list[_Row]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token logprobs of each completion under the current model: ([B, Tc], mask [B, Tc])."""
        device = next(self.model.parameters()).device
        seqs = [r.prompt_ids + r.completion_ids for r in rows]
        width = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, : len(s)] = torch.tensor(s)
            attn[b, : len(s)] = 1
        ids, attn = ids.to(device), attn.to(device)
        logits = self.model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
        if self.vocab is not None:
            logits[..., self.vocab :] = float("-inf")  # as the sampler: ids the tokenizer cannot decode
        logp_all = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        tc = max(len(r.completion_ids) for r in rows)
        out = torch.zeros((len(rows), tc), device=device)
        mask = torch.zeros((len(rows), tc), device=device)
        for b, r in enumerate(rows):
            start, n = len(r.prompt_ids) - 1, len(r.completion_ids)
            out[b, :n] = logp_all[b, start : start + n]
            mask[b, :n] = 1
        return out, mask

    @staticmethod
    def _pad(values: list[list[float] | None], like: torch.Tensor) -> torch.Tensor | None:
        if all(v is None for v in values):
            return None
        out = torch.full_like(like, float("nan"))
        for b, v in enumerate(values):
            if v is not None:
                out[b, : len(v)] = torch.tensor(v, dtype=out.dtype)
        return out

    def train_step(
        self, local: list[Group], external: list[Group], step: int | None = None
    ) -> dict[str, float]:
        cfg = self.config
        t0 = time.perf_counter()
        now = step if step is not None else max((g.policy_step for g in local), default=0)
        # Peers' step counters are not ours: external age counts from arrival when the buffer stamped it.
        fresh = [g for g in external if now - _arrival(g) <= cfg.staleness_steps]
        groups = local + fresh
        rows, skipped = self._rows(groups)
        all_rewards = [r for g in groups for r in g.rewards]
        m: dict[str, float] = {
            "reward": sum(r for g in local for r in g.rewards) / max(1, sum(len(g.rewards) for g in local)),
            "reward_all": sum(all_rewards) / max(1, len(all_rewards)),
            "groups_local": len(local),
            "groups_external": len(fresh),
            "stale_dropped": len(external) - len(fresh),
            "skipped_groups": skipped,
            "loss": 0.0,
            "grad_norm": 0.0,
            "kl": float("nan"),
            "clip_frac": 0.0,
        }
        advs = [r.advantage for r in rows]
        m["adv_mean"] = sum(advs) / len(advs) if advs else 0.0
        m["adv_std"] = math.sqrt(sum((a - m["adv_mean"]) ** 2 for a in advs) / len(advs)) if advs else 0.0
        self.samples_seen += sum(len(g.samples) for g in groups)
        if not rows:  # every group had zero variance: nothing to learn from
            if getattr(self.optimizer, "step_without_signal", False):
                # A gossiping optimizer still sends what its momentum holds and applies its peers' step.
                self.optimizer.zero_grad(set_to_none=True)
                self.optimizer.step()
                self.engine.update_weights(self.model.named_parameters())
            m["tokens_per_s"] = 0.0
            m["step_s"] = time.perf_counter() - t0
            self.metrics.write({"step": now, **m})
            return m
        self.model.train()
        n_tokens = float(sum(len(r.completion_ids) for r in rows))
        chunks = [rows[i : i + cfg.micro_batch] for i in range(0, len(rows), cfg.micro_batch)]
        with torch.no_grad():  # "old" policy = current policy before the update
            olds = [self._batch_logp(c)[0] for c in chunks]
        kls, clips = [], []
        for _epoch in range(cfg.ppo_epochs):
            self.optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for c, old in zip(chunks, olds, strict=True):
                logp, mask = self._batch_logp(c)
                adv = torch.tensor([r.advantage for r in c], device=logp.device)
                weights = None
                sender = self._pad([r.sender_logp for r in c], logp)
                if sender is not None:
                    w = torch.exp(old - sender).clamp(max=1.0)
                    weights = torch.where(torch.isnan(w), torch.ones_like(w), w).detach()
                loss, st = clipped_token_loss(
                    logp,
                    old,
                    adv,
                    mask,
                    clip_low=cfg.clip_low,
                    clip_high=cfg.clip_high,
                    weights=weights,
                    n_tokens=n_tokens,
                )
                loss.backward()
                total += float(loss.detach())
                clips.append(st["clip_frac"])
                sample = self._pad([r.sample_logp for r in c], logp)
                if sample is not None and _epoch == 0:
                    valid = mask * (~torch.isnan(sample)).float()
                    kls.append(k3_kl(torch.nan_to_num(sample), old, valid))
            params = [p for p in self.model.parameters() if p.grad is not None]
            m["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
            self.optimizer.step()
            m["loss"] = total
        self.optimizer.zero_grad(set_to_none=True)  # the gradients are spent: free them between steps
        energy = getattr(self.optimizer, "last_energy_ratio", None)  # DeMo: momentum energy sent
        if energy is not None:
            m["demo_energy"] = float(energy)
        self.model.eval()
        if kls:
            m["kl"] = sum(kls) / len(kls)
        m["clip_frac"] = sum(clips) / len(clips)
        self.engine.update_weights(self.model.named_parameters())
        m["tokens"] = n_tokens
        m["step_s"] = time.perf_counter() - t0
        m["tokens_per_s"] = n_tokens * cfg.ppo_epochs / max(m["step_s"], 1e-9)
        self.metrics.write({"step": now, **m})
        return m

    # --- evaluation -----------------------------------------------------------------------------

    def evaluate(self, problems: list[Any]) -> float:
        """Greedy (temperature 0) exact-match accuracy, in batches of ``eval_batch`` prompts."""
        from swarmnode.engines import SamplingParams
        from swarmnode.tasks import get_family

        if not problems:
            return float("nan")
        params = SamplingParams(n=1, max_new_tokens=self.config.max_new_tokens, temperature=0.0, seed=0)
        correct = 0
        for i in range(0, len(problems), self.config.eval_batch):
            batch = problems[i : i + self.config.eval_batch]
            outs = self.engine.generate([p.prompt for p in batch], params)
            for p, samples in zip(batch, outs, strict=True):
                correct += int(bool(get_family(p.family).is_correct(p, samples[0].text)))
        return correct / len(problems)


def _arrival(g: Group) -> int:
    return int(g.meta.get("arrival_step", g.policy_step))


def rng_for(seed: int, step: int) -> random.Random:
    """Per-step RNG (replay sampling etc.): resuming at a step reproduces its draws without saved state."""
    return random.Random(seed * 1_000_003 + step)
