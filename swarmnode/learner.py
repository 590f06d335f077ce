"""The node's learner: policy + rollout engine + GRPO trainer + replay buffer + verification +
checkpoints, behind the small interface the node drives (collect, train, evaluate) and the rollout
exchange feeds (verify, add_external, sample_external). ``swarmnode.build`` assembles it; torch
specifics stay here, so the node loop is testable with fakes.
"""

from __future__ import annotations

import copy
import logging
import math
import random
from typing import Any

import torch

log = logging.getLogger(__name__)


class Learner:
    def __init__(
        self,
        *,
        policy: Any,
        engine: Any,
        trainer: Any,
        replay: Any,
        verify: Any,
        heldout: list[Any],
        external_groups: int,
        diloco: Any,
        checkpoints: Any,
        seed: int = 0,
        meta: dict[str, Any] | None = None,
    ) -> None:
        # What a checkpoint must match to be resumed (task family, optimizer): a mismatch is an error.
        self.meta = dict(meta or {})
        self.policy = policy
        self.engine = engine
        self.trainer = trainer
        self.replay = replay
        self._verify = verify
        self.heldout = heldout
        self.external_groups = external_groups
        self.diloco = diloco
        self.checkpoints = checkpoints
        self.fingerprint: str = policy.fingerprint
        self.samples_seen = 0
        self.last_eval = float("nan")
        self.rng = random.Random(seed)
        self.rejects: dict[str, int] = {}
        # Verification runs in its own worker thread while generation runs in another; a HF fast
        # tokenizer is not thread-safe (a call without padding switches padding off under a batched
        # call in flight: "Unable to create tensor"), so verification gets its own copy.
        self._verify_tokenizer = copy.deepcopy(policy.tokenizer)

    def demo_spec(self, name: str) -> tuple[tuple[int, ...], int, int]:
        """(shape, n_chunks, chunk_numel) of the DeMo optimizer's transform for tensor ``name``."""
        demo = self._inner_optimizer()
        return (
            tuple(demo._by_name[name].shape),
            demo.transforms[name].n_chunks,
            demo.transforms[name].chunk_numel,
        )

    # -- what Node calls ---------------------------------------------------------------------------

    def collect_local(self, step: int) -> list[Any]:
        groups: list[Any] = self.trainer.collect_local(step)
        return groups

    def train_step(self, local: list[Any], external: list[Any], step: int | None = None) -> dict[str, float]:
        metrics: dict[str, float] = self.trainer.train_step(local, external, step=step)
        self.samples_seen += sum(len(getattr(g, "rewards", ())) for g in [*local, *external])
        return metrics

    def evaluate(self) -> float:
        self.last_eval = float(self.trainer.evaluate(self.heldout)) if self.heldout else float("nan")
        return self.last_eval

    def add_external(self, groups: list[Any], step: int) -> None:
        self.replay.add(groups, step=step)

    def sample_external(self, step: int) -> list[Any]:
        if self.external_groups == 0:
            return []
        out: list[Any] = self.replay.sample(self.external_groups, step, self.rng)
        return out

    def verify(self, batch: Any) -> tuple[list[Any], int]:
        """Regenerate each problem from its task reference and re-score locally; count why not."""
        groups, rejects = self._verify(batch, self._verify_tokenizer, local_fingerprint=self.fingerprint)
        if isinstance(rejects, dict):
            for reason, n in rejects.items():
                self.rejects[reason] = self.rejects.get(reason, 0) + int(n)
            return list(groups), sum(int(n) for n in rejects.values())
        return list(groups), int(rejects) if not isinstance(rejects, list) else len(rejects)

    # -- weights, checkpoints ----------------------------------------------------------------------

    def push_weights(self) -> None:
        """After a merge or catch-up the policy changed outside the trainer: tell the engine."""
        self.engine.update_weights(self.policy.model.named_parameters())

    def checkpoint(self, step: int, round_: int) -> None:
        tensors = {f"model.{n}": p.detach().cpu() for n, p in self.policy.model.state_dict().items()}
        state: dict[str, Any] = {
            "step": step,
            "round": round_,
            "samples_seen": self.samples_seen,
            "last_eval": None if math.isnan(self.last_eval) else self.last_eval,
            **self.meta,
        }
        tensors["rng.torch"] = torch.get_rng_state()
        if self.diloco is not None:
            ds = self.diloco.state_dict(copy=False)  # written before the next outer step can run
            tensors.update({f"diloco.{k}": v for k, v in ds.items() if isinstance(v, torch.Tensor)})
            state["diloco"] = {k: v for k, v in ds.items() if not isinstance(v, torch.Tensor)}
        from swarmnode.checkpoint import optimizer_to_tensors

        opt_tensors, state["optimizer"] = optimizer_to_tensors(self._inner_optimizer())
        tensors.update(opt_tensors)
        self.checkpoints.save(step, tensors, state)

    def _inner_optimizer(self) -> Any:
        opt = self.trainer.optimizer
        return getattr(opt, "demo", opt)  # exchange.demo.GossipingDeMo wraps the DeMo optimizer

    def resume(self) -> tuple[int, int] | None:
        loaded = self.checkpoints.load_latest()
        if loaded is None:
            return None
        step, tensors, state = loaded
        for key, want in self.meta.items():
            if key in state and state[key] != want:
                raise ValueError(
                    f"checkpoint in {self.checkpoints.directory} was made with {key}={state[key]!r}, "
                    f"this run has {key}={want!r}; use a fresh data dir"
                )
        model_sd = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        self.policy.model.load_state_dict(model_sd)
        if self.diloco is not None and any(k.startswith("diloco.") for k in tensors):
            ds: dict[str, Any] = {
                k[len("diloco.") :]: v for k, v in tensors.items() if k.startswith("diloco.")
            }
            ds.update(state.get("diloco", {}))
            self.diloco.load_state_dict(ds, reset_local=False)
        if "optimizer" in state:
            from swarmnode.checkpoint import optimizer_from_tensors

            optimizer_from_tensors(self._inner_optimizer(), tensors, state["optimizer"])
        self.samples_seen = int(state.get("samples_seen", 0))
        if "rng.torch" in tensors:
            torch.set_rng_state(tensors["rng.torch"])
        if state.get("last_eval") is not None:
            self.last_eval = float(state["last_eval"])
        self.push_weights()
        return int(step), int(state.get("round", 0))

    def close(self) -> None:
        self.engine.close()
