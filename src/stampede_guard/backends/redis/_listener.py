"""Pub/sub listeners: one connection per backend (so per process), shared by all waiters.

A waiter subscribes to its key's channel; the listener (a daemon thread for
`RedisBackend`, a task for `AsyncRedisBackend`) owns the pub/sub connection, applies
subscribe and unsubscribe requests between reads, and hands each message, decoded once,
to every subscription of its channel. Notices only make waiting faster: when any of
this fails, waiters still poll, so errors here are logged and retried, never raised.

A connection can also die without an error: half-open, black-holed by a firewall or a
NAT that forgot it, it accepts what is sent and answers nothing. So the listener keeps
each connection honest. After `QUIET` seconds without a word from the server it sends
a PING (answered in subscribed mode by a "pong" message); when a PING or a (un)SUBSCRIBE
has gone `DEAD` seconds without any reply, the connection counts as dead, and is
replaced like one that failed: a silent connection is given up within
``QUIET + DEAD`` (3 s). One warning per outage; an info line once it is over.

While the listener has no connection it trusts (since a failure, or since a waiter's
SUBSCRIBE went unconfirmed, until the server is heard from again), new waiters do not
wait for a confirmation that is unlikely to come: they poll at once, and are woken by
notices again as soon as the channels are resubscribed. These decisions live in
`Hub`, which does no I/O; the thread and the task only carry them out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from stampede_guard._entry import Notice
from stampede_guard._near import Near
from stampede_guard.backends.redis._codec import RedisCodec
from stampede_guard.backends.redis._hub import Hub

__all__ = ["AsyncListener", "Listener"]

logger = logging.getLogger("stampede_guard")

_POLL = 0.05  # seconds between applying (un)subscribe requests while messages are read
_IDLE = 30.0  # seconds without subscriptions after which the listener stops
_CONFIRM = 1.0  # seconds a new subscriber waits for the server to confirm SUBSCRIBE
_RETRY = 0.5  # seconds before reconnecting after a pub/sub connection error
_CLOSE = 1.0  # seconds closing a dead asyncio connection may take; then it is left
# Not redis-py's own health-check payload: its reply would be swallowed, unseen.
_PING = "stampede_guard"


class _Subscription:
    """A thread's subscription to one key."""

    def __init__(self, listener: Listener, key: str, channel: str) -> None:
        self.listener, self.key, self.channel = listener, key, channel
        self.notices: queue.SimpleQueue[Notice] = queue.SimpleQueue()
        self.settled = threading.Event()  # confirmed, or not worth waiting for

    def confirm(self) -> None:
        self.settled.set()

    def deliver(self, notice: Notice) -> None:
        self.notices.put(notice)

    def wait(self, seconds: float) -> Notice | None:
        try:
            return self.notices.get(timeout=seconds)
        except queue.Empty:
            return None

    def close(self) -> None:
        self.listener.unsubscribe(self)


class Listener:
    """The pub/sub listener of one `RedisBackend`: a daemon thread, started on demand."""

    def __init__(
        self,
        pubsub: Callable[[], Any] | None,
        codec: RedisCodec,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pubsub = pubsub
        self._hub = Hub(codec, clock)
        self._start = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._requests: queue.SimpleQueue[tuple[bool, str] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._hub.reset()

    def subscribe(self, key: str) -> _Subscription:
        """Subscribe to notices about *key*; wait (briefly) until the server confirms.

        The wait ends after `_CONFIRM` seconds, or at once while the listener has no
        connection it trusts; the subscriber then polls, and hears notices again
        once the listener has (re)subscribed the channel.
        """
        if self._pid != os.getpid():
            self._reset()  # a forked child: the parent's thread and connection are not ours
        subscription = _Subscription(self, key, self._hub.codec.channel(key))
        if self._pubsub is None:
            return subscription  # nothing to listen with: it hears nothing, so it polls
        if self._hub.add(subscription):
            self._requests.put((True, subscription.channel))
        self._ensure_running()
        if not subscription.settled.wait(_CONFIRM):
            self._hub.waited_out()
        return subscription

    def unsubscribe(self, subscription: _Subscription) -> None:
        """Drop *subscription*; the channel is unsubscribed when nobody is left on it."""
        if self._hub.remove(subscription):
            self._requests.put((False, subscription.channel))

    def keep(self, near: Near) -> None:
        """Subscribe *near*'s channel for as long as the listener runs; do not wait.

        The near cache fills once the server confirms (see ``stampede_guard._near``).
        """
        if self._pid != os.getpid():
            self._reset()  # a forked child (see `subscribe`)
        if self._pubsub is None:
            return
        if self._hub.keep_near(near):
            self._requests.put((True, near.channel))
        self._ensure_running()

    def stop(self) -> None:
        """Stop the thread and wait for it (it also stops by itself when idle)."""
        with self._start:
            thread = self._thread
        if thread is not None:
            self._requests.put(None)
            thread.join(_CONFIRM + _POLL)

    def _ensure_running(self) -> None:
        with self._start:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="stampede_guard-listener", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        try:
            self._listen()
        finally:
            self._hub.stopped()

    def _listen(self) -> None:
        assert self._pubsub is not None  # noqa: S101 - no thread without it
        while True:
            pubsub = None
            try:
                pubsub = self._pubsub()
                self._hub.opened()
                if not self._serve(pubsub):
                    return
            except Exception as exc:  # noqa: BLE001 - any failure: reconnect, waiters poll
                for channel in self._hub.lost(exc):
                    self._requests.put((True, channel))
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        pubsub.close()
            threading.Event().wait(_RETRY)

    def _serve(self, pubsub: Any) -> bool:
        """Route messages and apply requests; return False when it is time to stop."""
        hub = self._hub
        while True:
            if pubsub.subscribed:
                if not self._drain(pubsub):
                    return self._stopped()
                message = pubsub.get_message(timeout=_POLL)
                if message is not None:
                    hub.route(message)
                if hub.ping_due():
                    pubsub.ping(_PING)
                    hub.sent()
                continue
            try:
                request = self._requests.get(timeout=_IDLE)
            except queue.Empty:
                with self._start:  # exit only if no subscriber arrived meanwhile
                    if hub.may_stop(requests_pending=not self._requests.empty()):
                        self._thread = None
                        return False
                continue
            if not _apply(pubsub, request):
                return self._stopped()
            hub.sent(anew=True)  # replies owed from before the idle spell do not count

    def _drain(self, pubsub: Any) -> bool:
        """Apply the requests that came meanwhile; False for the request to stop."""
        while True:
            try:
                request = self._requests.get_nowait()
            except queue.Empty:
                return True
            if not _apply(pubsub, request):
                return False
            self._hub.sent()

    def _stopped(self) -> bool:
        with self._start:
            self._thread = None
        return False


def _apply(pubsub: Any, request: tuple[bool, str] | None) -> bool:
    """Carry out one (un)subscribe request; False for the request to stop."""
    if request is None:
        return False
    subscribe, channel = request
    (pubsub.subscribe if subscribe else pubsub.unsubscribe)(channel)
    return True


class _AsyncSubscription:
    """A task's subscription to one key."""

    def __init__(self, listener: AsyncListener, key: str, channel: str) -> None:
        self.listener, self.key, self.channel = listener, key, channel
        self.notices: asyncio.Queue[Notice] = asyncio.Queue()
        self.settled = asyncio.Event()  # confirmed, or not worth waiting for

    def confirm(self) -> None:
        self.settled.set()

    def deliver(self, notice: Notice) -> None:
        self.notices.put_nowait(notice)

    async def wait(self, seconds: float) -> Notice | None:
        try:
            return await asyncio.wait_for(self.notices.get(), seconds)
        except TimeoutError:
            return None

    async def close(self) -> None:
        self.listener.unsubscribe(self)


class AsyncListener:
    """The pub/sub listener of one `AsyncRedisBackend`: a task in its event loop.

    Without a *pubsub* factory (valkey-py's asyncio cluster client has none), its
    subscriptions hear nothing and waiters poll.
    """

    def __init__(
        self,
        pubsub: Callable[[], Any] | None,
        codec: RedisCodec,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pubsub = pubsub
        self._hub = Hub(codec, clock)
        self._requests: asyncio.Queue[tuple[bool, str] | None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def subscribe(self, key: str) -> _AsyncSubscription:
        """Subscribe to notices about *key*; wait (briefly) until the server confirms.

        See `Listener.subscribe`.
        """
        subscription = _AsyncSubscription(self, key, self._hub.codec.channel(key))
        if self._pubsub is None:
            return subscription  # nothing to listen with: it hears nothing, so it polls
        self._ensure_running()
        assert self._requests is not None  # noqa: S101 - made with the task
        if self._hub.add(subscription):
            self._requests.put_nowait((True, subscription.channel))
        try:
            await asyncio.wait_for(subscription.settled.wait(), _CONFIRM)
        except TimeoutError:
            self._hub.waited_out()
        return subscription

    def unsubscribe(self, subscription: _AsyncSubscription) -> None:
        """Drop *subscription*; the channel is unsubscribed when nobody is left on it."""
        if self._hub.remove(subscription) and self._requests is not None:
            self._requests.put_nowait((False, subscription.channel))

    def keep(self, near: Near) -> None:
        """See `Listener.keep`; from a coroutine of the listener's event loop."""
        if self._pubsub is None:
            return
        self._ensure_running()
        assert self._requests is not None  # noqa: S101 - made with the task
        if self._hub.keep_near(near):
            self._requests.put_nowait((True, near.channel))

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._requests = asyncio.Queue()
            self._stopping = False
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop the task (it also stops by itself after a while with nothing to do).

        The cancellation is backed by a request to stop: a cancellation can be lost
        (Python 3.11's ``wait_for`` drops one that lands as its awaitable finishes),
        and the task would then sit out its 30 s idle wait. Bounded either way.
        """
        task = self._task
        if task is not None and not task.done():
            self._stopping = True
            if self._requests is not None:
                self._requests.put_nowait(None)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), _CONFIRM + _CLOSE)
        self._task = None

    async def _run(self) -> None:
        try:
            await self._listen()
        finally:
            self._hub.stopped()

    async def _listen(self) -> None:
        requests = self._requests
        assert requests is not None  # noqa: S101 - made with the task
        assert self._pubsub is not None  # noqa: S101 - no task without it
        while True:
            pubsub, serving = None, True
            try:
                pubsub = self._pubsub()
                self._hub.opened()
                serving = await self._serve(pubsub, requests)
            except Exception as exc:  # noqa: BLE001 - any failure: reconnect, waiters poll
                for channel in self._hub.lost(exc):
                    requests.put_nowait((True, channel))
            finally:
                if pubsub is not None:
                    # Bounded: closing must not hang on the connection it gives up.
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(asyncio.shield(pubsub.aclose()), _CLOSE)
            if self._stopping:
                return
            if serving:
                await asyncio.sleep(_RETRY)
            # A subscriber may have come while the connection was closing.
            elif self._hub.may_stop(requests_pending=not requests.empty()):
                return

    async def _serve(
        self, pubsub: Any, requests: asyncio.Queue[tuple[bool, str] | None]
    ) -> bool:
        """Route messages and apply requests; return False when it is time to stop."""
        hub = self._hub
        while True:
            if pubsub.subscribed:
                while not requests.empty():
                    if not await _apply_async(pubsub, requests.get_nowait()):
                        return False
                    hub.sent()
                message = await pubsub.get_message(timeout=_POLL)
                if message is not None:
                    hub.route(message)
                if hub.ping_due():
                    await pubsub.ping(_PING)
                    hub.sent()
                continue
            try:
                request = await asyncio.wait_for(requests.get(), _IDLE)
            except TimeoutError:
                if hub.may_stop(requests_pending=not requests.empty()):
                    return False
                continue
            if not await _apply_async(pubsub, request):
                return False
            hub.sent(anew=True)  # replies owed from before the idle spell do not count


async def _apply_async(pubsub: Any, request: tuple[bool, str] | None) -> bool:
    """Carry out one (un)subscribe request; False for the request to stop."""
    if request is None:
        return False
    subscribe, channel = request
    await (pubsub.subscribe if subscribe else pubsub.unsubscribe)(channel)
    return True
