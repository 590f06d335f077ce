"""``swarmnode run``: one swarm node as a long-running process.

Parses flags (over an optional TOML file), opens the libp2p host, builds the learner, prints the
node's full multiaddr (so others can bootstrap from it), runs the node until its step/time budget is
spent or SIGINT/SIGTERM arrives, then writes a final checkpoint. A restart with the same data dir
keeps its peer id and resumes from the newest checkpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from swarmnode.config import ConfigError, NodeConfig, add_config_arguments, config_from_args
from swarmnode.localswarm import MULTIADDR_PREFIX

log = logging.getLogger("swarmnode.daemon")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument(
        "--expect-peers",
        type=int,
        default=1,
        help="cohort peers to hear before the first step (local swarms)",
    )
    parser.add_argument(
        "--join-wait", type=float, default=3.0, help="longest wait for --expect-peers before training alone"
    )


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("libp2p", "multiaddr"):  # py-libp2p logs every dial at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = config_from_args(args)
    except ConfigError as exc:
        print(f"swarmnode run: {exc}", file=sys.stderr)
        return 2
    Path(cfg.network.data_dir).mkdir(parents=True, exist_ok=True)
    try:
        asyncio.run(serve(cfg, expect_peers=args.expect_peers, join_wait_s=args.join_wait))
    except KeyboardInterrupt:  # second Ctrl-C while stopping
        return 130
    return 0


async def serve(cfg: NodeConfig, *, expect_peers: int = 1, join_wait_s: float = 3.0) -> None:
    from swarmnode.gossip import DiLoCoMerger, ProtocolWire
    from swarmnode.node import Node, NodeSettings
    from swarmnode.node_learner import build_learner
    from swarmnode.p2p import HostConfig, open_host
    from swarmnode.telemetry import open_telemetry

    net, train, diloco = cfg.network, cfg.train, cfg.diloco
    data_dir = Path(net.data_dir)  # created by main()
    learner = await asyncio.to_thread(build_learner, cfg, data_dir)
    host_cfg = HostConfig(
        data_dir=data_dir,
        listen_host=net.listen_host,
        port=net.port,
        bootstrap=list(net.bootstrap),
        target_peers=net.target_peers,
    )
    async with open_host(host_cfg) as host, open_telemetry(cfg) as telemetry:
        for addr in host.listen_addrs:
            print(f"{MULTIADDR_PREFIX}{addr}", flush=True)
        settings = NodeSettings(
            swarm=cfg.swarm.id,
            steps=train.steps or 0,
            duration_s=train.duration_s or 0.0,
            eval_every=train.eval_every,
            share_rollouts=train.share_rollouts,
            merge_every=diloco.inner_steps if diloco.enabled and not diloco.round_seconds else 0,
            round_seconds=(diloco.round_seconds or 0.0) if diloco.enabled else 0.0,
            collect_seconds=diloco.collect_seconds,
            metrics_path=Path(cfg.telemetry.metrics or data_dir / "metrics.jsonl"),
            expect_peers=expect_peers,
            join_wait_s=join_wait_s,
        )
        wire = ProtocolWire(
            swarm=cfg.swarm.id,
            addrs=lambda: list(host.listen_addrs),
            engine=cfg.model.engine,
            hardware=cfg.model.device,
            verifier=learner.verify,
            samples=lambda: learner.samples_seen,
            demo_spec=learner.demo_spec,
            value_codec=cfg.demo.value_codec,
        )
        merger = DiLoCoMerger(learner.diloco, on_weights=learner.push_weights) if diloco.enabled else None
        node = Node(
            settings=settings,
            host=host,
            learner=learner,
            wire=wire,
            merger=merger,
            demo=learner.demo_exchange,
        )
        resumed = learner.resume()
        if resumed is not None:
            node.stats.step, node.stats.round = resumed
            log.info("resumed from checkpoint at step %d round %d", *resumed)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, node.stop)
        every = cfg.checkpoint.every

        step_topic = f"node/{host.peer_id}/step"

        def on_step(row: dict[str, object]) -> None:
            telemetry.publish_nowait(step_topic, dict(row))
            if every and node.stats.step % every == 0:
                learner.checkpoint(node.stats.step, node.stats.round)

        node.on_step = on_step
        try:
            await node.run()
        finally:
            # Graceful stop: the step in flight finished; keep what it learned.
            await asyncio.to_thread(learner.checkpoint, node.stats.step, node.stats.round)
            learner.close()
            log.info("stopped at step %d", node.stats.step)
