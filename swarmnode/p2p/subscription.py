"""One topic's messages for one asyncio consumer: a bounded queue the host fills from the trio thread."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from swarmnode.p2p.config import Message


class Subscription:
    """Async iterator of messages on one topic; ends when the host closes or `aclose()` is called."""

    def __init__(self, owner: Any, topic: str, maxsize: int) -> None:
        self.topic = topic
        self._owner = owner
        self.queue: asyncio.Queue[Message | None] = asyncio.Queue(maxsize)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Message:
        item = await self.queue.get()
        if item is None:
            raise StopAsyncIteration
        return item

    async def aclose(self) -> None:
        self._owner._drop_subscription(self)
        self.end()

    def end(self) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(None)
            return
        # Full: make room for the end marker; the dropped message is counted.
        self.queue.get_nowait()
        self._owner._gossip.topic(self.topic).dropped += 1
        self.queue.put_nowait(None)
