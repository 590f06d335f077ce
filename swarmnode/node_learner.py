"""The node's learner: policy + rollout engine + GRPO trainer + replay buffer + checkpoints, behind the
small interface ``Node`` drives (collect, train, evaluate, take/give external groups).

Kept apart from ``node`` so the node loop stays testable with fakes and free of torch specifics.
"""

from __future__ import annotations

import copy
import logging
import random
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


class TrainerLearner:
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
    ) -> None:
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
        self.rng = random.Random(seed)
        self.rejects: dict[str, int] = {}
        # Verification runs on the event loop while generation runs in a worker thread; a HF fast
        # tokenizer is not thread-safe (a call without padding switches padding off under a batched
        # call in flight: "Unable to create tensor"), so verification gets its own copy.
        self._verify_tokenizer = copy.deepcopy(policy.tokenizer)
        self.demo_exchange: Any = None  # gossip.DemoExchange when DeMo components are gossiped
        self.demo_spec: Any = None

    # -- what Node calls ---------------------------------------------------------------------------

    def collect_local(self, step: int) -> list[Any]:
        groups: list[Any] = self.trainer.collect_local(step)
        return groups

    def train_step(self, local: list[Any], external: list[Any]) -> dict[str, float]:
        metrics: dict[str, float] = self.trainer.train_step(local, external)
        self.samples_seen += sum(len(getattr(g, "rewards", ())) for g in [*local, *external])
        return metrics

    def evaluate(self) -> float:
        return float(self.trainer.evaluate(self.heldout))

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
        state: dict[str, Any] = {"step": step, "round": round_, "samples_seen": self.samples_seen}
        if self.diloco is not None:
            ds = self.diloco.state_dict()
            tensors.update({f"diloco.{k}": v for k, v in ds.items() if isinstance(v, torch.Tensor)})
            state["diloco"] = {k: v for k, v in ds.items() if not isinstance(v, torch.Tensor)}
        from swarmnode.checkpoint import optimizer_to_tensors

        opt_tensors, state["optimizer"] = optimizer_to_tensors(self._inner_optimizer())
        tensors.update(opt_tensors)
        self.checkpoints.save(step, tensors, state)

    def _inner_optimizer(self) -> Any:
        opt = self.trainer.optimizer
        return getattr(opt, "demo", opt)  # DemoExchange wraps the DeMo optimizer

    def resume(self) -> tuple[int, int] | None:
        loaded = self.checkpoints.load_latest()
        if loaded is None:
            return None
        step, tensors, state = loaded
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
        self.push_weights()
        return int(step), int(state.get("round", 0))

    def close(self) -> None:
        self.engine.close()


def build_learner(cfg: Any, data_dir: Path) -> TrainerLearner:
    """Everything heavy, built once in a worker thread before the host starts."""
    from swarmnode.checkpoint import CheckpointManager
    from swarmnode.engines import SamplingParams, make_engine  # noqa: F401 - engine options below
    from swarmnode.optim import OptimConfig, build_optimizer
    from swarmnode.optim.diloco import DiLoCo
    from swarmnode.policy import load_policy
    from swarmnode.replay import ReplayBuffer, ReplayConfig
    from swarmnode.tasks import heldout_problems
    from swarmnode.trainer import GRPOConfig, Trainer
    from swarmnode.verify import verify_external

    model_path = cfg.model.model
    if model_path == "tiny":
        from swarmnode.tinymodel import build_tiny_policy

        model_path = str(build_tiny_policy(data_dir.parent / "tiny-model", family=cfg.task.family))
    torch.manual_seed(cfg.task.seed)
    policy = load_policy(model_path, device=cfg.model.device)
    engine = make_engine(cfg.model.engine, policy)
    t = cfg.train
    grpo = GRPOConfig(
        task=cfg.task.family,
        seed=cfg.task.seed,
        group_size=t.group_size,
        local_groups=t.local_groups,
        external_groups=t.external_groups,
        lr=t.lr,
        max_new_tokens=t.max_new_tokens,
        temperature=t.temperature,
        staleness_steps=t.staleness_steps,
    )
    d = cfg.demo
    optim_cfg = OptimConfig(lr=t.lr, demo_k=d.topk, demo_chunk=d.chunk, demo_use_dct=d.use_dct)
    optimizer: Any = build_optimizer(t.optimizer, policy.model.named_parameters(), optim_cfg)
    demo = None
    if t.optimizer == "demo" and d.gossip:
        from swarmnode.gossip import DemoExchange

        # The node sets the publish callback; the trainer steps the exchange like any optimizer.
        demo = optimizer
        optimizer = DemoExchange(optimizer, publish=lambda step, comps: None)
    trainer = Trainer(policy, engine, optimizer, grpo, None)
    diloco = None
    if cfg.diloco.enabled:
        diloco = DiLoCo(policy.model.named_parameters(), lr=cfg.diloco.outer_lr, momentum=cfg.diloco.momentum)
    learner = TrainerLearner(
        policy=policy,
        engine=engine,
        trainer=trainer,
        replay=ReplayBuffer(ReplayConfig(staleness_steps=t.staleness_steps, prefer=t.external_prefer)),
        seed=cfg.task.seed,
        verify=verify_external,
        heldout=heldout_problems(cfg.task.family, cfg.train.eval_prompts),
        external_groups=t.external_groups,
        diloco=diloco,
        checkpoints=CheckpointManager(data_dir / "checkpoints", keep=cfg.checkpoint.keep),
    )
    if demo is not None:
        learner.demo_exchange = optimizer
        learner.demo_spec = lambda name: (
            tuple(demo._by_name[name].shape),
            demo.transforms[name].n_chunks,
            demo.transforms[name].chunk_numel,
        )
    return learner
