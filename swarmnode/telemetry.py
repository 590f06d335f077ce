"""Telemetry: node metrics published to an MQTT broker, or nowhere.

``open_telemetry(url)`` yields a sink with ``async publish(topic, payload)`` and ``statistics()``.
With ``mqtt://host:port/prefix`` it is an ``MqttSink``: publish only enqueues (bounded), a background
task owned by the context manager sends to the broker and reconnects with exponential backoff. A dead
or slow broker therefore never blocks or crashes the node: when the queue is full the oldest message
is dropped and counted. With ``None`` it is a ``NullSink`` (STYLE.md rule 11) so the core never
branches on whether telemetry is configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiomqtt

__all__ = ["MqttSink", "MqttTarget", "NullSink", "TelemetrySink", "open_telemetry", "parse_mqtt_url"]

log = logging.getLogger(__name__)

# Telemetry is best effort: a few hundred pending messages cover a broker restart at one message
# per step without letting a long outage grow memory.
QUEUE_LIMIT = 512
BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 30.0
# On close, pending messages get this long to go out; shutdown must not hang on a dead broker.
FLUSH_TIMEOUT_S = 1.0


class TelemetrySink(Protocol):
    async def publish(self, topic: str, payload: dict[str, Any]) -> None: ...
    def publish_nowait(self, topic: str, payload: dict[str, Any]) -> None: ...
    def statistics(self) -> dict[str, Any]: ...


class NullSink:
    """Accepts everything, sends nothing."""

    def __init__(self) -> None:
        self._count = 0

    async def publish(self, topic: str, payload: dict[str, Any]) -> None:
        self.publish_nowait(topic, payload)

    def publish_nowait(self, topic: str, payload: dict[str, Any]) -> None:
        self._count += 1

    def statistics(self) -> dict[str, Any]:
        return {"kind": "null", "published": 0, "dropped": 0, "accepted": self._count}


@dataclass(kw_only=True, slots=True)
class MqttTarget:
    host: str
    port: int = 1883
    prefix: str = "swarmnode"

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("host must be non-empty")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in [1, 65535], got {self.port}")
        if any(c in self.prefix for c in "#+"):
            raise ValueError(f"prefix must not contain MQTT wildcards, got {self.prefix!r}")


def parse_mqtt_url(url: str) -> MqttTarget:
    """``mqtt://host[:port][/prefix]`` → target (default port 1883, prefix "swarmnode")."""
    parts = urlsplit(url)
    if parts.scheme != "mqtt" or not parts.hostname:
        raise ValueError(f"telemetry url must look like mqtt://host:port/prefix, got {url!r}")
    try:
        port = parts.port or 1883
    except ValueError:
        raise ValueError(f"telemetry url has a bad port: {url!r}") from None
    prefix = parts.path.strip("/") or "swarmnode"
    return MqttTarget(host=parts.hostname, port=port, prefix=prefix)


def _jsonable(value: Any) -> Any:
    # Strict JSON for other tools: NaN/inf (e.g. no eval yet) become null instead of bare NaN.
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, int | str | bool) or value is None:
        return value
    return str(value)


class MqttSink:
    """Queue + one sender task; see the module docstring."""

    def __init__(self, target: MqttTarget, *, queue_limit: int = QUEUE_LIMIT) -> None:
        self.target = target
        self._queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(maxsize=queue_limit)
        self._connected = asyncio.Event()
        self.published = 0
        self.dropped = 0
        self.reconnects = 0
        self.errors = 0
        self.last_error = ""

    async def publish(self, topic: str, payload: dict[str, Any]) -> None:
        self.publish_nowait(topic, payload)

    def publish_nowait(self, topic: str, payload: dict[str, Any]) -> None:
        """Enqueue without waiting; drops the oldest pending message if the queue is full."""
        data = json.dumps(_jsonable(payload), separators=(",", ":"), allow_nan=False).encode()
        full_topic = f"{self.target.prefix}/{topic.strip('/')}"
        if self._queue.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                self._queue.get_nowait()
                self._queue.task_done()
                self.dropped += 1
        self._queue.put_nowait((full_topic, data))

    def statistics(self) -> dict[str, Any]:
        return {
            "kind": "mqtt",
            "broker": f"{self.target.host}:{self.target.port}",
            "connected": self._connected.is_set(),
            "published": self.published,
            "dropped": self.dropped,
            "pending": self._queue.qsize(),
            "reconnects": self.reconnects,
            "errors": self.errors,
            "last_error": self.last_error,
        }

    async def wait_connected(self) -> None:
        """Until the broker accepted a connection (bound it with ``asyncio.timeout``)."""
        await self._connected.wait()

    async def wait_flushed(self) -> None:
        """Until every message enqueued so far was sent or dropped (bound it with ``asyncio.timeout``)."""
        await self._queue.join()

    async def run(self) -> None:
        """Sender loop: connect, drain the queue, on any broker error back off and reconnect.
        Runs until cancelled."""
        backoff = BACKOFF_INITIAL_S
        pending: tuple[str, bytes] | None = None
        while True:
            try:
                async with aiomqtt.Client(self.target.host, self.target.port, timeout=5.0) as client:
                    self._connected.set()
                    backoff = BACKOFF_INITIAL_S
                    while True:
                        if pending is None:
                            pending = await self._queue.get()
                        await client.publish(pending[0], pending[1], qos=0)
                        self.published += 1
                        pending = None
                        self._queue.task_done()
            except (aiomqtt.MqttError, OSError) as e:
                self.errors += 1
                self.last_error = str(e)
                if self._connected.is_set():
                    self.reconnects += 1
                    log.info("telemetry broker lost (%s); reconnecting", e)
                self._connected.clear()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)


def _url_of(config: Any) -> str | None:
    """Accept a url, a ``NodeConfig`` or its telemetry section."""
    if config is None or isinstance(config, str):
        return config or None
    telemetry = getattr(config, "telemetry", config)
    url = getattr(telemetry, "mqtt", None)
    return str(url) if url else None


@contextlib.asynccontextmanager
async def open_telemetry(config: Any = None) -> AsyncIterator[TelemetrySink]:
    """``None``/no mqtt url → ``NullSink``; ``mqtt://host:port/prefix`` → ``MqttSink`` whose sender
    task lives exactly as long as this context (pending messages get a short bounded flush)."""
    url = _url_of(config)
    if url is None:
        yield NullSink()
        return
    sink = MqttSink(parse_mqtt_url(url))
    task = asyncio.create_task(sink.run(), name="telemetry-mqtt")
    try:
        yield sink
        if sink.statistics()["connected"]:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FLUSH_TIMEOUT_S):
                    await sink.wait_flushed()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
