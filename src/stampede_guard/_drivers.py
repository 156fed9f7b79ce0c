"""Drivers: carry out a plan's operations against a backend. No cache decisions here.

Every exception an operation raises, cancellation included, is thrown back into the
plan, and a suspended plan is never closed early, so its lock release always runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Generator
from typing import Any, Protocol, TypeVar, assert_never, cast

from stampede_guard import _reporting
from stampede_guard._ops import (
    AwaitFlight,
    AwaitNotice,
    Bypass,
    Compute,
    Delete,
    Extend,
    Get,
    GetOrLock,
    Op,
    Set,
    SetAndUnlock,
    Spawn,
    Subscribe,
    TakeLock,
    Tick,
    Unlock,
    Unsubscribe,
)
from stampede_guard._reentry import computing
from stampede_guard.backends._protocol import (
    AsyncBackend,
    AsyncNotifier,
    AsyncSubscription,
    Backend,
    Notifier,
    Subscription,
)

__all__ = ["run_async", "run_sync"]

logger = logging.getLogger("stampede_guard")

T = TypeVar("T")
# A plan, or any other generator of operations (a joiner's wait) returning a T.
Steps = Generator[Op, Any, T]


class _Flight(Protocol):
    def wait(self, seconds: float) -> bool: ...


class _AsyncFlight(Protocol):
    async def wait(self, seconds: float) -> bool: ...


def run_sync(
    plan: Steps[T],
    backend: Backend,
    compute: Callable[[], object],
    *,
    ctx: _reporting.Observed | None = None,
) -> T:
    """Run *plan* to completion in this thread and return its result.

    With *ctx*, the backend reports the unreadable entries it meets meanwhile to
    *ctx*'s metrics hook, if it has one; *compute* never does (see `_reporting`).
    """
    scope = None if ctx is None else _reporting.begin(ctx)
    if scope is not None:
        compute = _reporting.unobserved(compute)
    try:
        return _drive(plan, backend, compute)
    finally:
        _reporting.end(scope)


def _drive(
    plan: Steps[T],
    backend: Backend,
    compute: Callable[[], object],
    ended: threading.Event | None = None,
) -> T:
    """Run *plan* in this thread; *ended*, for a watchdog, is set when its computation is."""
    result: object = None
    error: BaseException | None = None
    while True:
        try:
            op = plan.send(result) if error is None else plan.throw(error)
        except StopIteration as stop:
            done: T = stop.value
            return done
        result = error = None
        try:
            result = _perform(op, backend, compute, ended)
        except BaseException as exc:  # noqa: BLE001 - the plan decides what to do with it
            error = exc


def _perform(  # noqa: C901
    op: Op,
    backend: Backend,
    compute: Callable[[], object],
    ended: threading.Event | None,
) -> object:
    match op:  # the commonest first: every joiner of a thousand waits on its flight
        case AwaitFlight(flight, seconds):
            return cast("_Flight", flight).wait(seconds)
        case Get(key):
            return backend.get(key)
        case GetOrLock(key, token, lock_ttl):
            return backend.get_or_lock(key, token, lock_ttl)
        case TakeLock(key, token, lock_ttl):
            return backend.lock(key, token, lock_ttl)
        case Compute(key, watchdog):
            with computing(backend, key):
                if watchdog is None:
                    return compute()
                done = threading.Event()
                beside = threading.Thread(
                    target=_drive,
                    args=(watchdog, backend, compute, done),
                    name="stampede_guard-renewal",
                    daemon=True,
                )
                beside.start()
                try:
                    return compute()
                finally:
                    done.set()
                    beside.join()
        case Tick(seconds):
            if ended is None:
                time.sleep(seconds)
                return True
            return not ended.wait(seconds)
        case Extend(key, token, lock_ttl):
            return backend.extend(key, token, lock_ttl)
        case Bypass():
            return compute()
        case Set(key, entry, ttl, ticket):
            if ticket is None:  # also what a backend written before tickets takes
                return backend.set(key, entry, ttl)
            return backend.set(key, entry, ttl, ticket=ticket)
        case SetAndUnlock(key, entry, ttl, token, ticket):
            if ticket is None:
                return backend.set_and_unlock(key, entry, ttl, token)
            return backend.set_and_unlock(key, entry, ttl, token, ticket=ticket)
        case Unlock(key, token, apart):
            if apart:
                threading.Thread(
                    target=_unlock_quietly, args=(backend, key, token), daemon=True
                ).start()
                return None
            return backend.unlock(key, token)
        case Delete(key):
            backend.delete(key)
            return None
        case Subscribe(key):
            return backend.subscribe(key) if isinstance(backend, Notifier) else None
        case AwaitNotice(subscription, seconds):
            if subscription is None:  # nothing to hear: a plain backoff sleep
                time.sleep(seconds)
                return None
            return cast("Subscription", subscription).wait(seconds)
        case Unsubscribe(subscription):
            if subscription is not None:
                cast("Subscription", subscription).close()
            return None
        case Spawn(steps):
            # A copy of this thread's context: the plan reports where its caller's do.
            threading.Thread(
                target=contextvars.copy_context().run,
                args=(_drive, steps, backend, compute),
                name="stampede_guard-refresh",
                daemon=True,
            ).start()
            return None
        case _:
            assert_never(op)


async def run_async(
    plan: Steps[T],
    backend: AsyncBackend,
    compute: Callable[[], Awaitable[object]],
    background: set[asyncio.Task[Any]],
    pending: Op | None = None,
    *,
    ctx: _reporting.Observed | None = None,
) -> T:
    """Run *plan* to completion in this task and return its result (see `_drive_async`).

    With *ctx*, as `run_sync`. The task an apart `Compute` starts copies this task's
    context, so it reports to the same hook.
    """
    scope = None if ctx is None else _reporting.begin(ctx)
    if scope is not None:
        compute = _reporting.unobserved_async(compute)
    try:
        return await _drive_async(plan, backend, compute, background, pending)
    finally:
        _reporting.end(scope)


async def _drive_async(
    plan: Steps[T],
    backend: AsyncBackend,
    compute: Callable[[], Awaitable[object]],
    background: set[asyncio.Task[Any]],
    pending: Op | None = None,
) -> T:
    """Run *plan* to completion in this task and return its result.

    Cancellation is thrown into the plan like any error, so a cancelled leader still
    releases its lock (see the shield below) and its waiters move on at once. A
    `Compute` marked *apart* runs, with the rest of the plan, in a task of its own,
    kept in *background* until it is done: cancelling this caller does not cancel it.
    That task runs this same loop, from the *pending* `Compute`. An `Unlock` marked
    *apart* also runs in a task kept in *background*.
    """
    nested = pending is not None  # the task of an apart Compute: it runs it here
    result: object = None
    error: BaseException | None = None
    while True:
        if pending is not None:
            op, pending = pending, None
        else:
            try:
                op = plan.send(result) if error is None else plan.throw(error)
            except StopIteration as stop:
                done: T = stop.value
                return done
        result = error = None
        if not nested and isinstance(op, Compute) and op.apart:
            return await _apart(plan, op, backend, compute, background)
        try:
            result = await _perform_async(op, backend, compute, background)
        except BaseException as exc:  # noqa: BLE001 - the plan decides what to do with it
            error = exc


async def _apart(
    plan: Steps[T],
    op: Compute,
    backend: AsyncBackend,
    compute: Callable[[], Awaitable[object]],
    background: set[asyncio.Task[Any]],
) -> T:
    """Run *op* and the rest of *plan* in a task; a cancelled caller leaves it running.

    In a web server every client that disconnects cancels its request: were the
    computation cancelled with it, a slow origin behind impatient clients would be
    called once per request and never cached. Once orphaned, the task may run for
    *op.bound* seconds from the start (the computation's lease), then it is cancelled,
    which releases the lock.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    rest = loop.create_task(run_async(plan, backend, compute, background, op))
    background.add(rest)
    rest.add_done_callback(background.discard)
    try:
        return await asyncio.shield(rest)
    except asyncio.CancelledError:
        if rest.done():
            raise
        limit = loop.call_later(max(0.0, started + op.bound - loop.time()), rest.cancel)
        rest.add_done_callback(lambda _: limit.cancel())
        rest.add_done_callback(_report_orphan(op.key))
        raise


def _report_orphan(key: str) -> Callable[[asyncio.Task[Any]], None]:
    def report(task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            logger.warning(
                "the computation of %r, left running by its cancelled caller, was "
                "cancelled in turn: it outran its lease, or its event loop stopped",
                key,
            )
        elif task.exception() is not None:  # retrieved here, so asyncio stays quiet
            logger.warning(
                "the computation of %r, left running by its cancelled caller, failed",
                key,
                exc_info=task.exception(),
            )

    return report


async def _perform_async(  # noqa: C901
    op: Op,
    backend: AsyncBackend,
    compute: Callable[[], Awaitable[object]],
    background: set[asyncio.Task[Any]],
) -> object:
    match op:  # the commonest first: every joiner of a thousand waits on its flight
        case AwaitFlight(flight, seconds):
            return await cast("_AsyncFlight", flight).wait(seconds)
        case Get(key):
            return await backend.aget(key)
        case GetOrLock(key, token, lock_ttl):
            return await backend.aget_or_lock(key, token, lock_ttl)
        case TakeLock(key, token, lock_ttl):
            return await backend.alock(key, token, lock_ttl)
        case Compute(key, watchdog):
            with computing(backend, key):
                if watchdog is None:
                    return await compute()
                beside = asyncio.get_running_loop().create_task(
                    _drive_async(watchdog, backend, compute, background)
                )
                try:
                    return await compute()
                finally:
                    # Cancelled at its Tick: the watchdog plan lets that end it.
                    beside.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await beside
        case Tick(seconds):
            await asyncio.sleep(seconds)
            return True
        case Extend(key, token, lock_ttl):
            return await backend.aextend(key, token, lock_ttl)
        case Bypass():
            return await compute()
        case Set(key, entry, ttl, ticket):
            if ticket is None:
                return await backend.aset(key, entry, ttl)
            return await backend.aset(key, entry, ttl, ticket=ticket)
        case SetAndUnlock(key, entry, ttl, token, ticket):
            if ticket is None:
                return await backend.aset_and_unlock(key, entry, ttl, token)
            return await backend.aset_and_unlock(key, entry, ttl, token, ticket=ticket)
        case Unlock(key, token, apart):
            if apart:
                task = asyncio.get_running_loop().create_task(
                    _aunlock_quietly(backend, key, token)
                )
                background.add(task)
                task.add_done_callback(background.discard)
                return None
            # Shielded: the release usually runs because this task is being cancelled,
            # and a second cancellation must not leave the lock to its lease.
            return await asyncio.shield(backend.aunlock(key, token))
        case Delete(key):
            await backend.adelete(key)
            return None
        case Subscribe(key):
            if isinstance(backend, AsyncNotifier):
                return await backend.asubscribe(key)
            return None
        case AwaitNotice(subscription, seconds):
            if subscription is None:
                await asyncio.sleep(seconds)
                return None
            return await cast("AsyncSubscription", subscription).wait(seconds)
        case Unsubscribe(subscription):
            if subscription is not None:  # shielded, as Unlock
                await asyncio.shield(cast("AsyncSubscription", subscription).close())
            return None
        case Spawn(steps):
            # The task copies this task's context: it reports where its caller's do.
            task = asyncio.get_running_loop().create_task(
                _drive_async(steps, backend, compute, background)
            )
            background.add(task)
            task.add_done_callback(background.discard)
            return None
        case _:
            assert_never(op)


def _unlock_quietly(backend: Backend, key: str, token: str) -> None:
    try:
        backend.unlock(key, token)
    except Exception:
        logger.warning(
            "could not release the lock on %r; it expires by itself", key, exc_info=True
        )


async def _aunlock_quietly(backend: AsyncBackend, key: str, token: str) -> None:
    try:
        await backend.aunlock(key, token)
    except Exception:
        logger.warning(
            "could not release the lock on %r; it expires by itself", key, exc_info=True
        )
