"""Drivers: carry out a plan's operations against a backend. No cache decisions here.

Every exception an operation raises, cancellation included, is thrown back into the
plan, and a suspended plan is never closed early, so its lock release always runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Generator
from typing import Any, Protocol, TypeVar, assert_never, cast

from stampede_guard import _reporting
from stampede_guard._ops import (
    Await,
    AwaitFlight,
    Compute,
    Get,
    GetOrLock,
    Lock,
    Op,
    Renewal,
    Set,
    SetAndUnlock,
    Subscribe,
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


def _drive(plan: Steps[T], backend: Backend, compute: Callable[[], object]) -> T:
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
            result = _perform(op, backend, compute)
        except BaseException as exc:  # noqa: BLE001 - the plan decides what to do with it
            error = exc


def _perform(op: Op, backend: Backend, compute: Callable[[], object]) -> object:  # noqa: C901
    match op:  # the commonest first: every joiner of a thousand waits on its flight
        case AwaitFlight(flight, seconds):
            return cast("_Flight", flight).wait(seconds)
        case Get(key):
            return backend.get(key)
        case GetOrLock(key, token, lock_ttl):
            return backend.get_or_lock(key, token, lock_ttl)
        case Lock(key, token, lock_ttl):
            return backend.lock(key, token, lock_ttl)
        case Compute(key, renewal):
            with computing(backend, key):
                if renewal is None:
                    return compute()
                stop = threading.Event()
                watchdog = threading.Thread(
                    target=_renew, args=(backend, renewal, stop), daemon=True
                )
                watchdog.start()
                try:
                    return compute()
                finally:
                    stop.set()
                    watchdog.join()
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
        case Subscribe(key):
            return backend.subscribe(key) if isinstance(backend, Notifier) else None
        case Await(subscription, seconds):
            if subscription is None:  # nothing to hear: a plain backoff sleep
                time.sleep(seconds)
                return None
            return cast("Subscription", subscription).wait(seconds)
        case Unsubscribe(subscription):
            if subscription is not None:
                cast("Subscription", subscription).close()
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
        case Lock(key, token, lock_ttl):
            return await backend.alock(key, token, lock_ttl)
        case Compute(key, renewal):
            with computing(backend, key):
                if renewal is None:
                    return await compute()
                loop = asyncio.get_running_loop()
                watchdog = loop.create_task(_arenew(backend, renewal))
                try:
                    return await compute()
                finally:
                    watchdog.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await watchdog
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
        case Subscribe(key):
            if isinstance(backend, AsyncNotifier):
                return await backend.asubscribe(key)
            return None
        case Await(subscription, seconds):
            if subscription is None:
                await asyncio.sleep(seconds)
                return None
            return await cast("AsyncSubscription", subscription).wait(seconds)
        case Unsubscribe(subscription):
            if subscription is not None:  # shielded, as Unlock
                await asyncio.shield(cast("AsyncSubscription", subscription).close())
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


# Lease renewal while the function runs (a watchdog, as Redisson's): every third of the
# lease, extend it to a full lease, so a long computation keeps its lock while a dead
# holder's lock still runs out quickly. It stops when the computation ends, when the
# lock turns out to be lost, or at the renewal limit, so a hung computation cannot hold
# the key for ever. A failed renewal is logged, never raised: the worst outcome is one
# more computation elsewhere. Both twins wait first, then check the limit.


def _renew(backend: Backend, renewal: Renewal, stop: threading.Event) -> None:
    started, every = time.monotonic(), renewal.lock_ttl / 3
    while not stop.wait(every) and time.monotonic() - started < renewal.limit:
        try:
            if not backend.extend(renewal.key, renewal.token, renewal.lock_ttl):
                logger.warning("lost the lock on %r while computing", renewal.key)
                return
        except Exception:
            logger.warning("could not renew the lock on %r", renewal.key, exc_info=True)


async def _arenew(backend: AsyncBackend, renewal: Renewal) -> None:
    started, every = time.monotonic(), renewal.lock_ttl / 3
    while True:
        await asyncio.sleep(every)
        if time.monotonic() - started >= renewal.limit:
            return
        try:
            if not await backend.aextend(renewal.key, renewal.token, renewal.lock_ttl):
                logger.warning("lost the lock on %r while computing", renewal.key)
                return
        except Exception:
            logger.warning("could not renew the lock on %r", renewal.key, exc_info=True)
