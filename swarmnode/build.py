"""The one composition root: ``NodeConfig`` → learner, membership, exchanges, node.

``build_learner`` does everything heavy (model, engine, optimizer, trainer) and runs in a worker
thread before the host starts; ``build_node`` wires the learner to an open host. ``swarmnode run``,
``swarmnode train`` and the benchmarks all come through here, so every default is the config's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from swarmnode.config import NodeConfig
from swarmnode.exchange.base import Exchange, Host
from swarmnode.learner import Learner
from swarmnode.membership import Membership, MembershipConfig, Status
from swarmnode.node import LoopConfig, Node

log = logging.getLogger(__name__)


def build_learner(
    cfg: NodeConfig, data_dir: Path, *, tiny_dir: Path | None = None, metrics: Any = None
) -> Learner:
    """Policy, engine, optimizer, trainer, replay, verification and checkpoints from ``cfg``.

    ``model.model = "tiny"`` builds the tiny local model into ``tiny_dir`` (default: beside the data
    dir, shared by a local swarm's nodes); ``metrics`` receives the trainer's per-step rows."""
    from swarmnode.checkpoint import CheckpointManager
    from swarmnode.engines import make_engine
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

        tiny = tiny_dir if tiny_dir is not None else data_dir.parent / "tiny-model"
        model_path = str(build_tiny_policy(tiny, family=cfg.task.family))
    torch.manual_seed(cfg.task.seed)
    policy = load_policy(model_path, device=cfg.model.device, dtype=cfg.model.dtype)
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
    trainer = Trainer(policy, engine, optimizer, grpo, metrics)
    diloco = None
    if cfg.diloco.enabled:
        diloco = DiLoCo(
            policy.model.named_parameters(),
            lr=cfg.diloco.outer_lr,
            momentum=cfg.diloco.momentum,
            spill_dir=data_dir / "diloco",
        )
    return Learner(
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
        meta={"task": cfg.task.family, "optimizer_name": t.optimizer},
    )


def build_node(cfg: NodeConfig, host: Host, learner: Learner, *, data_dir: Path, on_step: Any = None) -> Node:
    """Membership and one exchange per enabled channel around ``learner``, on an open ``host``."""
    from swarmnode.exchange.demo import DemoExchange, DemoGossipConfig
    from swarmnode.exchange.diloco import DiLoCoExchange
    from swarmnode.exchange.rollouts import RolloutExchange, RolloutsConfig
    from swarmnode.rounds import RoundsConfig

    net, train, dl = cfg.network, cfg.train, cfg.diloco
    swarm = cfg.swarm.id
    node: Node | None = None
    diloco_ex: DiLoCoExchange | None = None

    def current_round() -> int:
        return diloco_ex.round if diloco_ex is not None else 0

    def status() -> Status:
        return Status(
            step=node.step if node is not None else 0,
            round=current_round(),
            anchor_hash=diloco_ex.anchor_hash if diloco_ex is not None else "",
            samples=learner.samples_seen,
            observing=diloco_ex.observing if diloco_ex is not None else False,
            step_s=diloco_ex.step_seconds if diloco_ex is not None else 0.0,
        )

    membership = Membership(
        MembershipConfig(
            swarm=swarm, presence_interval_s=net.presence_interval_s, peer_timeout_s=net.peer_timeout_s
        ),
        host=host,
        cohort=learner.fingerprint,
        engine=cfg.model.engine,
        hardware=cfg.model.device,
        addrs=lambda: list(getattr(host, "listen_addrs", [])),
        status=status,
    )
    exchanges: list[Exchange] = [
        RolloutExchange(
            RolloutsConfig(swarm=swarm, share=train.share_rollouts),
            host=host,
            cohort=learner.fingerprint,
            verify=learner.verify,
            add_external=learner.add_external,
            sample_external=learner.sample_external,
        )
    ]
    if train.optimizer == "demo" and cfg.demo.gossip:
        demo_ex = DemoExchange(
            DemoGossipConfig(
                swarm=swarm,
                value_codec=cfg.demo.value_codec,
                window_s=cfg.demo.window_s,
                max_publishers=cfg.demo.max_publishers,
            ),
            host=host,
            cohort=learner.fingerprint,
            demo=learner.trainer.optimizer,
            spec=learner.demo_spec,
            members=membership.cohort_peers,
        )
        learner.trainer.optimizer = demo_ex.optimizer  # the trainer now steps through the exchange
        exchanges.append(demo_ex)
    if dl.enabled:
        from swarmnode.compression.pseudograd import encoded_size
        from swarmnode.rounds import collect_window

        collect = dl.collect_seconds
        if collect is None:
            collect = collect_window(
                encoded_size(learner.diloco.shapes(), dl.delta_codec),
                # pulls per round: the chosen contributors (relays spread the uploads over the cohort)
                max(min(net.expect_peers, dl.merge_fanin or net.expect_peers), 1),
                net.link_mbps,
                round_seconds=dl.round_seconds or 0.0,
            )
        diloco_ex = DiLoCoExchange(
            RoundsConfig(
                swarm=swarm,
                merge_every=0 if dl.round_seconds else dl.inner_steps,
                round_seconds=dl.round_seconds or 0.0,
                genesis=cfg.swarm.genesis,
                collect_seconds=collect,
                max_blob_bytes=net.max_blob_bytes,
                codec=dl.delta_codec,
                expect_peers=net.expect_peers,
                join_wait_s=net.join_wait_s,
                merge_fanin=dl.merge_fanin,
                relay_branching=dl.relay_branching,
            ),
            host=host,
            membership=membership,
            diloco=learner.diloco,
            on_weights=learner.push_weights,
            scratch_dir=data_dir / "incoming",
            # A state only one network vouches for (a bootstrap-only joiner) is loaded only if its
            # held-out accuracy is within 0.1 of ours (``swarmnode.trust.accept_probe``).
            probe=learner.evaluate if getattr(learner, "heldout", None) else None,
        )
        exchanges.append(diloco_ex)
    resumed = learner.resume()
    step = 0
    if resumed is not None:
        step = resumed[0]
        if diloco_ex is not None:
            diloco_ex.round = resumed[1]
        log.info("resumed from checkpoint at step %d round %d", *resumed)
    every = cfg.checkpoint.every
    node = Node(
        LoopConfig(
            steps=train.steps or 0,
            duration_s=train.duration_s or 0.0,
            eval_every=train.eval_every,
            checkpoint_every=every,
            metrics_path=Path(cfg.telemetry.metrics or data_dir / "metrics.jsonl"),
        ),
        learner=learner,
        membership=membership,
        exchanges=exchanges,
        step=step,
        on_step=on_step,
        checkpoint=lambda step: learner.checkpoint(step, current_round()),
        host_statistics=getattr(host, "statistics", None),
    )
    return node
