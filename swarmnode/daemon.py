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

from swarmnode.config import ConfigError, NodeConfig
from swarmnode.flags import add_config_arguments, config_from_args
from swarmnode.localswarm import MULTIADDR_PREFIX

log = logging.getLogger("swarmnode.daemon")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


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
        asyncio.run(serve(cfg))
    except KeyboardInterrupt:  # second Ctrl-C while stopping
        return 130
    except Exception as exc:  # e.g. the p2p transport died: the node cannot take part any more
        log.error("node stopped: %s", _describe(exc))
        print(f"swarmnode run: node stopped: {_describe(exc)} (final checkpoint written)", file=sys.stderr)
        return 1
    return 0


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"


async def serve(cfg: NodeConfig) -> None:
    """Open the host, build the node (``swarmnode.build``), run it; always a final checkpoint."""
    from swarmnode.build import build_learner, build_node
    from swarmnode.p2p import HostConfig, open_host
    from swarmnode.telemetry import open_telemetry

    net = cfg.network
    data_dir = Path(net.data_dir)  # created by main()
    learner = await asyncio.to_thread(build_learner, cfg, data_dir)
    host_cfg = HostConfig(
        data_dir=data_dir,
        listen_host=net.listen_host,
        port=net.port,
        bootstrap=list(net.bootstrap),
        target_peers=net.target_peers,
        max_blob_bytes=net.max_blob_bytes,
    )
    try:
        async with open_host(host_cfg) as host, open_telemetry(cfg) as telemetry:
            for addr in host.listen_addrs:
                print(f"{MULTIADDR_PREFIX}{addr}", flush=True)
            step_topic = f"node/{host.peer_id}/step"
            node = build_node(
                cfg,
                host,
                learner,
                data_dir=data_dir,
                on_step=lambda row: telemetry.publish_nowait(step_topic, dict(row)),
            )
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, node.stop)
            try:
                await node.run()
            finally:
                # Graceful stop or a crash: keep what the steps so far learned.
                if node.checkpoint is not None:
                    await asyncio.to_thread(node.checkpoint, node.step)
                log.info("stopped at step %d", node.step)
    finally:
        learner.close()
