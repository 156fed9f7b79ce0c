"""The backend as a contract check sees it: one async interface, two drivers.

A check is a coroutine function over a `Driver`, which exposes the eight backend
methods under their sync names. `SyncDriver` calls a `Backend`'s methods directly and
never suspends, so a sync check runs to completion on one ``send(None)`` (`run_sync`)
without an event loop; `AsyncDriver` awaits an `AsyncBackend`'s a-prefixed methods.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar, cast

from stampede_guard.backends import (
    AsyncBackend,
    AsyncNotifier,
    AsyncTagBackend,
    Backend,
    Entry,
    Notice,
    Notifier,
    TagBackend,
)

__all__ = ["AsyncDriver", "Driver", "SyncDriver", "run_sync"]

PATIENCE = 5.0  # seconds: the most a check waits for something to happen

T = TypeVar("T")


class Listening(Protocol):
    async def wait(self, seconds: float) -> Notice | None: ...
    async def close(self) -> None: ...


class Driver(Protocol):
    """A backend seen by a check: the sync names, awaited, plus waiting and racing."""

    async def get(self, key: str) -> Entry | None: ...
    async def get_or_lock(self, key: str, token: str, lock_ttl: float) -> object: ...
    async def lock(self, key: str, token: str, lock_ttl: float) -> str: ...
    async def set(
        self, key: str, entry: Entry, ttl: float, *, ticket: int | None = None
    ) -> Entry | None: ...
    async def set_and_unlock(
        self,
        key: str,
        entry: Entry,
        ttl: float,
        token: str,
        *,
        ticket: int | None = None,
    ) -> Entry | None: ...
    async def extend(self, key: str, token: str, lock_ttl: float) -> bool: ...
    async def unlock(self, key: str, token: str) -> bool: ...
    async def delete(self, key: str) -> None: ...
    @property
    def tags(self) -> bool: ...  # whether the backend has TagBackend's methods
    async def invalidate_tag(self, tag: str) -> None: ...
    async def sleep(self, seconds: float) -> None: ...
    async def race(
        self, n: int, call: Callable[[int], Coroutine[Any, Any, object]]
    ) -> list[object]: ...
    async def subscribe(self, key: str) -> Listening | None: ...


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a check over a `SyncDriver`, which never suspends, to its end."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    msg = "a check over a sync backend suspended: its driver must not await anything"
    raise RuntimeError(msg)


class SyncListening:
    def __init__(self, subscription: Any) -> None:
        self._subscription = subscription

    async def wait(self, seconds: float) -> Notice | None:
        notice: Notice | None = self._subscription.wait(seconds)
        return notice

    async def close(self) -> None:
        self._subscription.close()


class SyncDriver:
    """Drive a `Backend`: each method calls its namesake and returns at once."""

    def __init__(self, backend: Backend) -> None:
        self.b = backend

    async def get(self, key: str) -> Entry | None:
        return self.b.get(key)

    async def get_or_lock(self, key: str, token: str, lock_ttl: float) -> object:
        return self.b.get_or_lock(key, token, lock_ttl)

    async def lock(self, key: str, token: str, lock_ttl: float) -> str:
        return self.b.lock(key, token, lock_ttl)

    async def set(
        self, key: str, entry: Entry, ttl: float, *, ticket: int | None = None
    ) -> Entry | None:
        return self.b.set(key, entry, ttl, ticket=ticket)

    async def set_and_unlock(
        self,
        key: str,
        entry: Entry,
        ttl: float,
        token: str,
        *,
        ticket: int | None = None,
    ) -> Entry | None:
        return self.b.set_and_unlock(key, entry, ttl, token, ticket=ticket)

    async def extend(self, key: str, token: str, lock_ttl: float) -> bool:
        return self.b.extend(key, token, lock_ttl)

    async def unlock(self, key: str, token: str) -> bool:
        return self.b.unlock(key, token)

    async def delete(self, key: str) -> None:
        self.b.delete(key)

    @property
    def tags(self) -> bool:
        """Whether the backend keeps tags (`TagBackend`)."""
        return isinstance(self.b, TagBackend)

    async def invalidate_tag(self, tag: str) -> None:
        cast("TagBackend", self.b).invalidate_tag(tag)

    async def sleep(self, seconds: float) -> None:
        time.sleep(seconds)  # noqa: ASYNC251 - a sync check runs on no event loop

    async def race(
        self, n: int, call: Callable[[int], Coroutine[Any, Any, object]]
    ) -> list[object]:
        """Run *call* for 0..n-1 in n threads released at once by a barrier."""
        barrier = threading.Barrier(n, timeout=PATIENCE)
        results: list[object] = [None] * n

        def run(i: int) -> None:
            try:
                barrier.wait()
                results[i] = run_sync(call(i))
            except BaseException as exc:  # noqa: BLE001 - reported by the check
                results[i] = exc

        threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(PATIENCE * 2)
        assert not any(t.is_alive() for t in threads), "racing threads hang"
        return results

    async def subscribe(self, key: str) -> Listening | None:
        if not isinstance(self.b, Notifier):
            return None
        return SyncListening(self.b.subscribe(key))


class AsyncDriver:
    """Drive an `AsyncBackend`: each method awaits its a-prefixed namesake."""

    def __init__(self, backend: AsyncBackend) -> None:
        self.b = backend

    async def get(self, key: str) -> Entry | None:
        return await self.b.aget(key)

    async def get_or_lock(self, key: str, token: str, lock_ttl: float) -> object:
        return await self.b.aget_or_lock(key, token, lock_ttl)

    async def lock(self, key: str, token: str, lock_ttl: float) -> str:
        return await self.b.alock(key, token, lock_ttl)

    async def set(
        self, key: str, entry: Entry, ttl: float, *, ticket: int | None = None
    ) -> Entry | None:
        return await self.b.aset(key, entry, ttl, ticket=ticket)

    async def set_and_unlock(
        self,
        key: str,
        entry: Entry,
        ttl: float,
        token: str,
        *,
        ticket: int | None = None,
    ) -> Entry | None:
        return await self.b.aset_and_unlock(key, entry, ttl, token, ticket=ticket)

    async def extend(self, key: str, token: str, lock_ttl: float) -> bool:
        return await self.b.aextend(key, token, lock_ttl)

    async def unlock(self, key: str, token: str) -> bool:
        return await self.b.aunlock(key, token)

    async def delete(self, key: str) -> None:
        await self.b.adelete(key)

    @property
    def tags(self) -> bool:
        """See `SyncDriver.tags`."""
        return isinstance(self.b, AsyncTagBackend)

    async def invalidate_tag(self, tag: str) -> None:
        await cast("AsyncTagBackend", self.b).ainvalidate_tag(tag)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def race(
        self, n: int, call: Callable[[int], Coroutine[Any, Any, object]]
    ) -> list[object]:
        """Run *call* for 0..n-1 in n tasks released at once by an event."""
        go = asyncio.Event()

        async def run(i: int) -> object:
            await go.wait()
            return await call(i)

        tasks = [asyncio.ensure_future(run(i)) for i in range(n)]
        await asyncio.sleep(0)  # every task is now waiting on the event
        go.set()
        return list(
            await asyncio.wait_for(
                asyncio.gather(*tasks, return_exceptions=True), PATIENCE * 2
            )
        )

    async def subscribe(self, key: str) -> Listening | None:
        if not isinstance(self.b, AsyncNotifier):
            return None
        listening: Listening = await self.b.asubscribe(key)
        return listening
