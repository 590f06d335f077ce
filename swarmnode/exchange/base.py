"""What the node knows about an exchange, and the pieces every exchange shares.

Per step the node calls, on every exchange in order::

    step = await ex.before_step(step)         # DiLoCo: apply a finished round, or catch up
    external += await ex.on_collected(step, local)   # rollouts: share ours, take the swarm's
    ...train (worker thread; DeMo sits inside the optimizer)...
    await ex.after_step(step, samples)        # DiLoCo: publish when a round ends

``start(tg)`` puts the exchange's long-lived tasks (subscriptions, publishers) in the node's task
group; ``finish(stopped)`` runs once when the budget is spent (DiLoCo merges the round in flight and
serves its last contribution); ``statistics()`` is merged into every metrics row.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger(__name__)


class Host(Protocol):
    """The part of ``swarmnode.p2p.Host`` the exchanges use."""

    peer_id: Any

    async def publish(self, topic: str, data: bytes) -> None: ...
    def subscribe(self, topic: str) -> AsyncIterator[Any]: ...
    def set_request_handler(
        self, protocol_id: str, handler: Callable[[str, bytes], Awaitable[bytes]]
    ) -> None: ...
    async def request(self, peer_id: str, protocol_id: str, data: bytes) -> bytes: ...
    def provide_blob(self, data: bytes) -> str: ...
    def provide_view(self, content_hash: str, size: int, read: Callable[[int, int], bytes]) -> None: ...
    def remove_blob(self, content_hash: str) -> None: ...
    def expect_blob(self, content_hash: str, timeout: float) -> None: ...
    def unexpect_blob(self, content_hash: str) -> None: ...
    async def fetch(
        self,
        content_hash: str,
        providers: list[str],
        *,
        max_size: int,
        timeout: float = ...,  # noqa: ASYNC109
    ) -> bytes: ...
    async def fetch_file(
        self,
        content_hash: str,
        providers: list[str],
        path: str | os.PathLike[str],
        *,
        max_size: int,
        timeout: float = ...,  # noqa: ASYNC109
    ) -> int: ...
    def connected_peers(self) -> list[str]: ...


class Exchange(Protocol):
    name: str

    def start(self, tg: asyncio.TaskGroup) -> None: ...
    async def before_step(self, step: int) -> int: ...
    async def on_collected(self, step: int, local: list[Any]) -> list[Any]: ...
    async def after_step(self, step: int, samples: int) -> None: ...
    async def finish(self, stopped: bool) -> None: ...
    def statistics(self) -> dict[str, Any]: ...


class BaseExchange:
    """No-op hooks; an exchange overrides the ones it needs."""

    name = "base"

    def start(self, tg: asyncio.TaskGroup) -> None:
        return None

    async def before_step(self, step: int) -> int:
        return step

    async def on_collected(self, step: int, local: list[Any]) -> list[Any]:
        return []

    async def after_step(self, step: int, samples: int) -> None:
        return None

    async def finish(self, stopped: bool) -> None:
        return None

    def statistics(self) -> dict[str, Any]:
        return {}


@dataclass(slots=True)
class Traffic:
    """Bytes and messages one channel moved; what it dropped, by reason."""

    bytes_sent: int = 0
    bytes_received: int = 0
    messages_received: int = 0
    dropped: int = 0

    def as_dict(self, prefix: str) -> dict[str, int]:
        return {
            f"{prefix}/bytes_sent": self.bytes_sent,
            f"{prefix}/bytes_received": self.bytes_received,
            f"{prefix}/dropped": self.dropped,
        }


async def receive_loop(
    host: Host,
    topic: str,
    me: str,
    handle: Callable[[str, bytes], Awaitable[None] | None],
    traffic: Traffic,
) -> None:
    """Deliver every peer message on ``topic`` to ``handle(origin, data)``.

    Own messages (gossip echoes them back) are skipped. Nothing a peer sends may end the node: a
    ``ValueError`` (``ProtocolError`` is one) is a malformed message, anything else a bug in a
    handler; both are counted as dropped and the loop goes on. If the subscription itself ends, the
    transport is gone: that raises, so the node's task group stops the node with a clear error.
    """
    async for message in host.subscribe(topic):
        origin = str(message.origin)
        if origin == me:
            continue
        traffic.bytes_received += len(message.data)
        traffic.messages_received += 1
        try:
            result = handle(origin, message.data)
            if result is not None:
                await result
        except ValueError as exc:
            traffic.dropped += 1
            log.info("dropped message from %s on %s: %s", origin, topic, exc)
        except Exception:
            traffic.dropped += 1
            log.exception("error handling a message from %s on %s", origin, topic)
    raise TransportClosed(f"subscription to {topic} ended: the p2p transport is gone")


class TransportClosed(RuntimeError):
    """A subscription ended underneath the node: it cannot take part in the swarm any more."""
