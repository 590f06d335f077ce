"""A trio loop in a dedicated thread, callable from asyncio.

py-libp2p is trio-based while the daemon is asyncio. Trio guest mode stalled the asyncio loop up to 245 ms
on 8 MB messages, so the library gets its own thread and loop. asyncio → trio: `TrioToken.run_sync_soon`
starts the call in the thread's nursery and the result comes back through a `concurrent.futures.Future`.
trio → asyncio: `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, TypeVar

import trio

log = logging.getLogger(__name__)

T = TypeVar("T")


class BridgeClosed(RuntimeError):
    """The trio thread is gone (host closed or crashed); the call was not run."""


class _Call:
    """Lets the asyncio side cancel a call that is already running in trio."""

    __slots__ = ("cancelled", "scope")

    def __init__(self) -> None:
        self.scope: trio.CancelScope | None = None
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        if self.scope is not None:
            self.scope.cancel()


class TrioBridge:
    """Owns the trio thread. Use `open_trio_bridge` rather than constructing this directly."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._closed = False

    # -- asyncio side -------------------------------------------------------------------------------------------
    def start_soon(self, afn: Callable[..., Awaitable[Any]], *args: Any) -> concurrent.futures.Future[Any]:
        """Start `afn(*args)` in the trio nursery; the returned future resolves with its result."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._start(future, _Call(), afn, args)
        return future

    async def run(self, afn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Await `afn(*args)` run in trio. Cancelling the awaiting task cancels the trio call."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        call = _Call()
        self._start(future, call, afn, args)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            self.run_sync_soon(call.cancel)
            raise

    def run_sync_soon(self, fn: Callable[[], None]) -> bool:
        """Schedule `fn()` on the trio thread; returns False if the thread is already gone."""
        if self._token is None or self._closed:
            return False
        try:
            self._token.run_sync_soon(fn)
        except trio.RunFinishedError:
            return False
        return True

    def _start(
        self,
        future: concurrent.futures.Future[Any],
        call: _Call,
        afn: Callable[..., Awaitable[Any]],
        args: Any,
    ) -> None:
        def spawn() -> None:
            if self._nursery is None:
                future.set_exception(BridgeClosed("p2p host is closed"))
                return
            self._nursery.start_soon(self._run_into, future, call, afn, args)

        if not self.run_sync_soon(spawn):
            raise BridgeClosed("p2p host is closed")

    @staticmethod
    async def _run_into(
        future: concurrent.futures.Future[Any], call: _Call, afn: Callable[..., Awaitable[Any]], args: Any
    ) -> None:
        if not future.set_running_or_notify_cancel():
            return
        with trio.CancelScope() as scope:
            call.scope = scope
            if call.cancelled:
                scope.cancel()
            try:
                result = await afn(*args)
            except trio.Cancelled:
                future.set_exception(BridgeClosed("call cancelled (host closing or caller cancelled)"))
                raise
            except BaseException as exc:  # every outcome must reach the waiting future
                future.set_exception(exc)
                return
            future.set_result(result)
            return
        if not future.done():
            future.set_exception(BridgeClosed("call cancelled"))

    # -- trio side ----------------------------------------------------------------------------------------------
    def call_soon_in_asyncio(self, fn: Callable[..., None], *args: Any) -> bool:
        """Run `fn(*args)` on the asyncio loop; False if the loop is closed."""
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            return False
        return True


@asynccontextmanager
async def open_trio_bridge(
    setup: Callable[[TrioBridge, trio.Nursery], AbstractAsyncContextManager[T]],
    *,
    join_timeout: float = 1.0,
    name: str = "p2p-trio",
) -> AsyncIterator[tuple[TrioBridge, T]]:
    """Start a trio thread, enter `setup(bridge, nursery)` inside it, yield (bridge, what setup yielded).

    Leaving the block cancels the trio nursery (which exits `setup`) and joins the thread.
    """
    loop = asyncio.get_running_loop()
    bridge = TrioBridge(loop)
    ready: concurrent.futures.Future[Any] = concurrent.futures.Future()
    finished: concurrent.futures.Future[None] = concurrent.futures.Future()

    async def trio_main() -> None:
        bridge._token = trio.lowlevel.current_trio_token()
        try:
            async with trio.open_nursery() as nursery:
                bridge._nursery = nursery
                async with setup(bridge, nursery) as state:
                    ready.set_result(state)
                    await trio.sleep_forever()
        finally:
            bridge._nursery = None

    def thread_main() -> None:
        try:
            trio.run(trio_main)
        except BaseException as exc:  # reported through the futures below
            # Trio wraps a start-up failure (e.g. the port is taken) in a one-element group; show the cause.
            while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
                exc = exc.exceptions[0]
            if not ready.done():
                ready.set_exception(exc)
            else:
                log.exception("p2p trio thread crashed")
        finally:
            if not ready.done():
                ready.set_exception(BridgeClosed("p2p trio thread exited during start-up"))
            finished.set_result(None)

    thread = threading.Thread(target=thread_main, name=name, daemon=True)
    thread.start()
    try:
        state = await asyncio.wrap_future(ready)
        yield bridge, state
    finally:

        def cancel_all() -> None:
            if bridge._nursery is not None:
                bridge._nursery.cancel_scope.cancel()

        bridge.run_sync_soon(cancel_all)
        bridge._closed = True
        with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(finished)), join_timeout)
        await asyncio.to_thread(thread.join, 0.1)
        if thread.is_alive():
            log.warning(
                "p2p trio thread did not stop within %.1f s; leaving it (daemon thread)", join_timeout
            )
