"""In-process coalescing ("single flight"): concurrent calls of one key share one call.

Only the first caller of a key in this process (per event loop, for asyncio) runs the
plan and so talks to the backend; callers arriving meanwhile wait in memory and get its
value or its exception. If the first caller is cancelled or interrupted, they start
over and one of them leads instead. This holds for every backend, and when the backend
is down: a process adds at most one call per key to a struggling backend.
"""

from __future__ import annotations

import _thread
import asyncio
import os
import threading
import weakref
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, TypeAlias

from stampede_guard._context import Context, Served
from stampede_guard.metrics import Hit, LockWait, Miss

__all__ = ["AsyncFlights", "Refreshing", "SyncFlights"]

_RETRY: Final = object()

# How a flight's leader serves: (key, args, kwargs) -> (value, was a hit).
Serve: TypeAlias = Callable[[str, tuple[Any, ...], Mapping[str, Any]], Served]
AsyncServe: TypeAlias = Callable[
    [str, tuple[Any, ...], Mapping[str, Any]], Awaitable[Served]
]


class _Flight:
    """One call in progress, for threads: its lock is held until it has an outcome."""

    __slots__ = ("error", "hit", "lock", "retry", "value")

    def __init__(self) -> None:
        self.lock = _thread.allocate_lock()
        self.lock.acquire()
        self.value: object = None
        self.hit = False
        self.error: BaseException | None = None
        self.retry = False


class _AsyncFlight:
    """One call in progress, for one event loop's tasks."""

    __slots__ = ("error", "hit", "joiners", "loop", "retry", "value")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        # One future per joiner: cancelling a joiner cancels its own future only.
        self.joiners: list[asyncio.Future[None]] = []
        self.value: object = None
        self.hit = False
        self.error: BaseException | None = None
        self.retry = False


class SyncFlights:
    """The calls in progress of one decorated function, by key."""

    def __init__(self) -> None:
        self._flights: dict[str, _Flight] = {}
        _registries.add(self)

    def run(
        self,
        key: str,
        serve: Serve,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        ctx: Context,
    ) -> object:
        """Return ``serve(key, args, kwargs)``'s value, unless *key* is already in flight."""
        flights = self._flights
        while True:
            flight = flights.get(key)
            if flight is None:
                mine = _Flight()
                flight = flights.setdefault(key, mine)  # atomic: one leader per key
                if flight is mine:  # lead (inline: this is every remote hit's path)
                    try:
                        mine.value, mine.hit = serve(key, args, kwargs)
                    except Exception as exc:
                        mine.error = exc
                        raise
                    except BaseException:
                        mine.retry = True  # interrupted, not failed: a joiner leads
                        raise
                    finally:
                        # Forget the flight before releasing its joiners: later callers
                        # start afresh (and find the value cached) instead of joining.
                        del flights[key]
                        mine.lock.release()
                    return mine.value
            started = ctx.clock()
            flight.lock.acquire()  # released once the leader has an outcome
            flight.lock.release()
            outcome = _joined(key, flight, ctx.clock() - started, ctx)
            if outcome is not _RETRY:
                return outcome

    def clear(self) -> None:
        """Forget every flight (in a forked child, their leaders do not exist)."""
        self._flights = {}


class AsyncFlights:
    """The calls in progress of one decorated ``async def``, by key, per event loop."""

    def __init__(self) -> None:
        self._flights: dict[str, _AsyncFlight] = {}
        _registries.add(self)

    async def run(
        self,
        key: str,
        serve: AsyncServe,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        ctx: Context,
    ) -> object:
        """Return ``await serve(key, args, kwargs)``'s value, unless *key* is in flight."""
        loop = asyncio.get_running_loop()
        flights = self._flights
        while True:
            flight = flights.get(key)
            if flight is None:
                mine = _AsyncFlight(loop)
                flight = flights.setdefault(key, mine)
                if flight is mine:
                    return await self._lead(key, mine, serve, args, kwargs)
            if flight.loop is not loop:
                # Another thread's event loop leads; its futures are not ours to await.
                value, _ = await serve(key, args, kwargs)
                return value
            joined: asyncio.Future[None] = loop.create_future()
            flight.joiners.append(joined)
            started = ctx.clock()
            await joined
            outcome = _joined(key, flight, ctx.clock() - started, ctx)
            if outcome is not _RETRY:
                return outcome

    async def _lead(
        self,
        key: str,
        flight: _AsyncFlight,
        serve: AsyncServe,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
    ) -> object:
        try:
            flight.value, flight.hit = await serve(key, args, kwargs)
        except Exception as exc:
            flight.error = exc
            raise
        except BaseException:
            flight.retry = True  # cancelled: a joiner leads instead, nobody is stranded
            raise
        finally:
            del self._flights[key]
            for joined in flight.joiners:
                if not joined.done():  # a cancelled joiner's future is done
                    joined.set_result(None)
        return flight.value

    def clear(self) -> None:
        """Forget every flight (in a forked child, their leaders do not exist)."""
        self._flights = {}


class Refreshing:
    """The keys a process is refreshing, so that it starts one refresh per key at a time."""

    def __init__(self) -> None:
        self._keys: set[str] = set()
        self._mutex = threading.Lock()
        _registries.add(self)

    def claim(self, key: str) -> bool:
        """Mark *key* as being refreshed here; False if it already is."""
        with self._mutex:
            if key in self._keys:
                return False
            self._keys.add(key)
            return True

    def release(self, key: str) -> None:
        """Unmark *key*."""
        with self._mutex:
            self._keys.discard(key)

    def clear(self) -> None:
        """Forget every key (in a forked child, its refreshers do not exist)."""
        self._keys = set()


def _joined(
    key: str, flight: _Flight | _AsyncFlight, waited: float, ctx: Context
) -> Any:
    """Return (or raise) a finished flight's outcome to a caller that joined it."""
    if flight.retry:
        return _RETRY
    if flight.hit:
        if ctx.observed:
            ctx.emit(Hit(key))  # it would have found the value itself
        return flight.value
    if ctx.observed:
        ctx.emit(Miss(key))
        ctx.emit(LockWait(key, waited, "value" if flight.error is None else "error"))
    if flight.error is not None:
        raise flight.error
    return flight.value


_registries: weakref.WeakSet[SyncFlights | AsyncFlights | Refreshing] = (
    weakref.WeakSet()
)


def _forget_flights_in_child() -> None:
    for registry in list(_registries):
        registry.clear()


os.register_at_fork(after_in_child=_forget_flights_in_child)
