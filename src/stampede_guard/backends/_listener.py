"""Pub/sub listeners: one connection per backend (so per process), shared by all waiters.

A waiter subscribes to its key's channel; the listener (a daemon thread for
`RedisBackend`, a task for `AsyncRedisBackend`) owns the pub/sub connection, applies
subscribe and unsubscribe requests between reads, and hands each message, decoded once,
to every subscription of its channel. Notices only make waiting faster: when any of
this fails, waiters still poll, so errors here are logged and retried, never raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

from stampede_guard.backends._protocol import Notice
from stampede_guard.backends._redis_shared import RedisCodec

__all__ = ["AsyncListener", "Listener"]

logger = logging.getLogger("stampede_guard")

_POLL = 0.05  # seconds between applying (un)subscribe requests while messages are read
_IDLE = 30.0  # seconds without subscriptions after which the listener stops
_CONFIRM = 1.0  # seconds a new subscriber waits for the server to confirm SUBSCRIBE
_RETRY = 0.5  # seconds before reconnecting after a pub/sub connection error


class _Hub:
    """Who listens to which channel; the I/O-free part both listeners share."""

    def __init__(self, codec: RedisCodec) -> None:
        self.codec = codec
        self.mutex = threading.Lock()
        self.subscribers: dict[str, set[Any]] = {}
        self.confirmed: set[str] = set()

    def add(self, subscription: Any) -> bool:
        """Register *subscription*; return whether its channel needs a SUBSCRIBE."""
        with self.mutex:
            subscribers = self.subscribers.setdefault(subscription.channel, set())
            subscribers.add(subscription)
            if subscription.channel in self.confirmed:
                subscription.confirm()
            return len(subscribers) == 1

    def remove(self, subscription: Any) -> bool:
        """Forget *subscription*; return whether its channel needs an UNSUBSCRIBE."""
        with self.mutex:
            subscribers = self.subscribers.get(subscription.channel)
            if subscribers is None or subscription not in subscribers:
                return False
            subscribers.discard(subscription)
            if subscribers:
                return False
            del self.subscribers[subscription.channel]
            self.confirmed.discard(subscription.channel)
            return True

    def route(self, message: dict[str, Any]) -> None:
        """Act on one pub/sub message: a confirmation, or a notice to deliver."""
        kind, raw = message["type"], message["channel"]
        channel = raw.decode() if isinstance(raw, bytes) else str(raw)
        with self.mutex:
            subscribers = list(self.subscribers.get(channel, ()))
            if kind == "subscribe":
                self.confirmed.add(channel)
        if kind == "subscribe":
            for subscription in subscribers:
                subscription.confirm()
        elif kind == "message" and subscribers:
            notice = self.codec.notice(subscribers[0].key, message["data"])
            for subscription in subscribers:
                subscription.deliver(notice)

    def lost_connection(self) -> list[str]:
        """Forget confirmations (the server forgot them) and return channels to renew."""
        with self.mutex:
            self.confirmed.clear()
            return list(self.subscribers)


class _Subscription:
    """A thread's subscription to one key."""

    def __init__(self, listener: Listener, key: str, channel: str) -> None:
        self.listener, self.key, self.channel = listener, key, channel
        self.notices: queue.SimpleQueue[Notice] = queue.SimpleQueue()
        self.confirmed = threading.Event()

    def confirm(self) -> None:
        self.confirmed.set()

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

    def __init__(self, pubsub: Callable[[], Any] | None, codec: RedisCodec) -> None:
        self._pubsub = pubsub
        self._hub = _Hub(codec)
        self._start = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._requests: queue.SimpleQueue[tuple[bool, str] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._hub.subscribers.clear()
        self._hub.confirmed.clear()

    def subscribe(self, key: str) -> _Subscription:
        """Subscribe to notices about *key*; wait (briefly) until the server confirms."""
        if self._pid != os.getpid():
            self._reset()  # a forked child: the parent's thread and connection are not ours
        subscription = _Subscription(self, key, self._hub.codec.channel(key))
        if self._pubsub is None:
            return subscription  # nothing to listen with: it hears nothing, so it polls
        if self._hub.add(subscription):
            self._requests.put((True, subscription.channel))
        self._ensure_running()
        subscription.confirmed.wait(_CONFIRM)
        return subscription

    def unsubscribe(self, subscription: _Subscription) -> None:
        """Drop *subscription*; the channel is unsubscribed when nobody is left on it."""
        if self._hub.remove(subscription):
            self._requests.put((False, subscription.channel))

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
        while True:
            assert self._pubsub is not None  # noqa: S101 - no thread without it
            pubsub = self._pubsub()
            try:
                if not self._serve(pubsub):
                    return
            except Exception:
                logger.warning(
                    "pub/sub listener lost its connection; waiters poll meanwhile",
                    exc_info=True,
                )
                for channel in self._hub.lost_connection():
                    self._requests.put((True, channel))
                threading.Event().wait(_RETRY)
            finally:
                with contextlib.suppress(Exception):
                    pubsub.close()

    def _serve(self, pubsub: Any) -> bool:
        """Route messages and apply requests; return False when it is time to stop."""
        while True:
            if pubsub.subscribed:
                while True:
                    try:
                        request = self._requests.get_nowait()
                    except queue.Empty:
                        break
                    if not _apply(pubsub, request):
                        return self._stopped()
                message = pubsub.get_message(timeout=_POLL)
                if message is not None:
                    self._hub.route(message)
                continue
            try:
                request = self._requests.get(timeout=_IDLE)
            except queue.Empty:
                with self._start:  # exit only if no subscriber arrived meanwhile
                    if not self._hub.subscribers and self._requests.empty():
                        self._thread = None
                        return False
                continue
            if not _apply(pubsub, request):
                return self._stopped()

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
        self.confirmed = asyncio.Event()

    def confirm(self) -> None:
        self.confirmed.set()

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

    def __init__(self, pubsub: Callable[[], Any] | None, codec: RedisCodec) -> None:
        self._pubsub = pubsub
        self._hub = _Hub(codec)
        self._requests: asyncio.Queue[tuple[bool, str] | None] | None = None
        self._task: asyncio.Task[None] | None = None

    async def subscribe(self, key: str) -> _AsyncSubscription:
        """Subscribe to notices about *key*; wait (briefly) until the server confirms."""
        subscription = _AsyncSubscription(self, key, self._hub.codec.channel(key))
        if self._pubsub is None:
            return subscription  # nothing to listen with: it hears nothing, so it polls
        if self._task is None or self._task.done():
            self._requests = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._run())
        assert self._requests is not None  # noqa: S101 - made with the task
        if self._hub.add(subscription):
            self._requests.put_nowait((True, subscription.channel))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(subscription.confirmed.wait(), _CONFIRM)
        return subscription

    def unsubscribe(self, subscription: _AsyncSubscription) -> None:
        """Drop *subscription*; the channel is unsubscribed when nobody is left on it."""
        if self._hub.remove(subscription) and self._requests is not None:
            self._requests.put_nowait((False, subscription.channel))

    async def stop(self) -> None:
        """Stop the task (it also stops by itself after a while with nothing to do)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._task = None

    async def _run(self) -> None:
        requests = self._requests
        assert requests is not None  # noqa: S101 - made with the task
        while True:
            assert self._pubsub is not None  # noqa: S101 - no task without it
            pubsub = self._pubsub()
            try:
                serving = await self._serve(pubsub, requests)
            except Exception:
                logger.warning(
                    "pub/sub listener lost its connection; waiters poll meanwhile",
                    exc_info=True,
                )
                for channel in self._hub.lost_connection():
                    requests.put_nowait((True, channel))
                await asyncio.sleep(_RETRY)
                serving = True
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.shield(pubsub.aclose())
            # A subscriber may have come while the connection was closing.
            if not serving and requests.empty() and not self._hub.subscribers:
                return

    async def _serve(
        self, pubsub: Any, requests: asyncio.Queue[tuple[bool, str] | None]
    ) -> bool:
        """Route messages and apply requests; return False when it is time to stop."""
        while True:
            if pubsub.subscribed:
                while not requests.empty():
                    if not await _apply_async(pubsub, requests.get_nowait()):
                        return False
                message = await pubsub.get_message(timeout=_POLL)
                if message is not None:
                    self._hub.route(message)
                continue
            try:
                request = await asyncio.wait_for(requests.get(), _IDLE)
            except TimeoutError:
                if not self._hub.subscribers:
                    return False
                continue
            if not await _apply_async(pubsub, request):
                return False


async def _apply_async(pubsub: Any, request: tuple[bool, str] | None) -> bool:
    """Carry out one (un)subscribe request; False for the request to stop."""
    if request is None:
        return False
    subscribe, channel = request
    await (pubsub.subscribe if subscribe else pubsub.unsubscribe)(channel)
    return True
