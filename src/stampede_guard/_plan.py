"""The stampede algorithm, once, as a plan that does no I/O.

`plan` is a generator: it yields operations (`stampede_guard._ops`) and is sent their
results; a driver (`stampede_guard._drivers`) carries them out against a backend.
Steps, after the reference card:

1. Look the key up. A hit returns at once (one backend read). This step is the hot
   path, so it is not part of the generator: the wrappers read and `first_look`
   decides; `plan` starts at step 2, after a miss.
2. On a miss, atomically read again or take the lock (the card's double-check).
3. Lock taken: compute, then store the value and release the lock in one step. If the
   function raises, release the lock and let the exception through; nothing is cached.
4. Lock held by someone else: subscribe to news of the key, look once more, then wait
   for a notice (the value itself, or "released") for up to a backoff delay (tenacity
   decides each one) and look again, until the value arrives, the lock frees up (the
   holder failed or died and its lease ran out: take over), or ``wait_timeout`` runs
   out. Notices make waiters wake at once; the backoff polls only catch lost ones.
   Patience is per holder: when the lock passes to a new holder, the wait starts over,
   so the waiters of a dead holder wait for its successor instead of all computing.
5. Out of time: serve the stale value if there is one, else compute without the lock,
   or raise `LockTimeoutError`.

A value past its ``ttl`` but within ``stale_ttl`` (or fresh but due for an XFetch early
refresh) is served at once, and `refresh` recomputes it under the same lock: whoever
takes the lock (without waiting) computes, everyone else keeps the stored value.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator
from typing import Any, cast

import tenacity
from typing_extensions import override

from stampede_guard._context import MISS, RENEWAL_LIMIT, Context, Plan, Policy, Served
from stampede_guard._errors import BackendError, LockTimeoutError
from stampede_guard._freshness import RefreshDue, refresh_reason, stale_value
from stampede_guard._ops import (
    Await,
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
from stampede_guard.backends._protocol import Entry
from stampede_guard.metrics import (
    BackendFailed,
    BackendSkipped,
    Computed,
    ComputeError,
    Hit,
    LockAcquired,
    LockWait,
    Miss,
    Refresh,
    RefreshFailed,
    StaleServed,
    Timeout,
)

__all__ = [
    "MISS",
    "Context",
    "Plan",
    "Policy",
    "RefreshDue",
    "Served",
    "first_look",
    "plan",
    "refresh",
    "stale_value",
    "without_cache",
]

logger = logging.getLogger("stampede_guard")


class _StillLockedError(Exception):
    """Another caller holds the lock; tenacity retries on it and re-raises it at the end."""


def first_look(key: str, found: Entry | None, ctx: Context) -> object:
    """Decide step 1: return the cached value (a hit), a `RefreshDue`, or MISS."""
    if found is None:
        return MISS
    if ctx.observed:  # build no event nobody will see: this is the hot path
        ctx.emit(Hit(key))
    if ctx.policy.refreshes:
        reason = refresh_reason(found, ctx)
        if reason is not None:
            return RefreshDue(found, reason)
    return found.value


def refresh(key: str, due: RefreshDue, ctx: Context) -> Plan:
    """Recompute *due*'s key if its lock is free; otherwise leave it to the holder.

    Never waits: whoever is refused the lock keeps serving the stored value. A failed
    refresh keeps it too (``stale_if_error``) and is reported.
    """
    token = ctx.new_token()
    holder = yield Lock(key, token, ctx.policy.lock_timeout)
    if holder != token:
        return due.entry.value, True
    leading = False
    try:
        # The double-check, for refreshes: another caller may have refreshed the value
        # between our read and our lock. Then it is the one to serve, and we let go.
        current = yield Get(key)
        if current is not None and current.created_at > due.entry.created_at:
            yield from _release(key, token)
            return current.value, True
        ctx.emit(Refresh(key, due.reason))
        leading = True
        value = yield from _lead(key, token, ctx)  # it releases the lock itself
    except Exception as exc:
        if not leading:
            yield from _release(key, token)
        ctx.emit(RefreshFailed(key, exc))
        if ctx.policy.stale_if_error:
            return due.entry.value, True
        raise
    return value, False


def plan(
    key: str, ctx: Context, *, force: bool = False, stale: Entry | None = None
) -> Plan:
    """Serve *key* after a miss, computing it at most once among concurrent callers.

    With *force* (a refresh on demand), a stored value does not count: the call takes
    the lock to compute, or waits for the value its holder is computing. A *stale*
    entry at hand is served if the wait runs out.
    """
    policy = ctx.policy
    token = ctx.new_token()
    look = Lock if force else GetOrLock
    try:
        claim = yield look(key, token, policy.lock_timeout)
    except BackendError as exc:
        return (yield from without_cache(key, ctx, exc))
    if isinstance(claim, Entry):  # stored between our two looks
        ctx.emit(Hit(key))
        return claim.value, True
    ctx.emit(Miss(key))

    if claim != token:
        started = ctx.clock()
        try:
            claim = yield from _wait(key, token, claim, ctx, look)
        except BackendError as exc:
            return (yield from without_cache(key, ctx, exc))
        except _StillLockedError:
            return (yield from _timed_out(key, ctx, ctx.clock() - started, stale))
        waited = ctx.clock() - started
        if isinstance(claim, Entry):
            ctx.emit(LockWait(key, waited, "value"))
            return claim.value, False
        ctx.emit(LockWait(key, waited, "lock"))

    ctx.emit(LockAcquired(key))
    return (yield from _lead(key, token, ctx)), False


def _timed_out(key: str, ctx: Context, waited: float, stale: Entry | None) -> Plan:
    """Step 5: the wait ran out. Serve *stale* if at hand, else apply ``on_timeout``."""
    policy = ctx.policy
    ctx.emit(LockWait(key, waited, "timeout"))
    if stale is not None:
        ctx.emit(StaleServed(key, ctx.wall_clock() - stale.created_at - policy.ttl))
        return stale.value, True
    ctx.emit(Timeout(key, waited, policy.on_timeout))
    if policy.on_timeout == "raise":
        raise LockTimeoutError(key, waited) from None
    # Like nginx's proxy_cache_lock_timeout: serve this caller now. The value is
    # stored too; it is as valid as the one the slow holder will store.
    entry = yield from _compute(key, ctx)
    if not policy.caches(entry.value):
        return entry.value, False
    try:
        stored = yield Set(key, entry, policy.store_ttl)
    except BackendError as exc:
        _store_failed(key, ctx, exc)
        return entry.value, False
    return stored.value, False


def _wait(
    key: str, token: str, holder: str, ctx: Context, look: type[GetOrLock | Lock]
) -> Generator[Op, Any, Entry | str]:
    """Wait until the value appears or the lock is ours; raise _StillLockedError at the end.

    Returns the entry, or *token* once this call holds the lock. The lock is not held
    while waiting, so waiting is safe.
    """
    subscription = yield Subscribe(key)
    try:
        claim = yield from _listen(key, token, holder, subscription, ctx, look)
    except GeneratorExit:
        raise  # closed with nobody to carry out an Unsubscribe; see _lead
    except BaseException:
        yield Unsubscribe(subscription)
        raise
    yield Unsubscribe(subscription)
    return claim


def _listen(  # noqa: PLR0917
    key: str,
    token: str,
    holder: str,
    subscription: object,
    ctx: Context,
    look: type[GetOrLock | Lock],
) -> Generator[Op, Any, Entry | str]:
    """The waiting loop: each round waits for a notice up to a delay, then looks.

    tenacity decides each delay and when to stop; its sleep only records the delay,
    which becomes the longest an Await may take. The last one is cut short so that the
    final look happens at the deadline.
    """
    policy = ctx.policy
    deadline = _DeadlineStop(ctx.clock, ctx.clock() + policy.wait_timeout)
    delays: list[float] = []
    stop: tenacity.stop.stop_base = deadline
    if policy.max_retries is not None:
        stop = stop | tenacity.stop_after_attempt(policy.max_retries + 1)
    retrying = tenacity.Retrying(
        sleep=delays.append,
        wait=tenacity.wait_exponential_jitter(
            multiplier=policy.base_delay, max=policy.max_delay, jitter=policy.base_delay
        ),
        stop=stop,
        retry=tenacity.retry_if_exception_type(_StillLockedError),
        reraise=True,
    )
    # Listening now: look once more, or a value stored just before would go unheard.
    claim = yield look(key, token, policy.lock_timeout)
    for attempt in retrying:
        if delays:
            delay = delays.pop()
            if subscription is not None:
                # Notices wake us; our own looks only catch lost ones and dead holders,
                # so with a subscription they need not come more often than max_delay.
                delay = max(delay, policy.max_delay)
            notice = yield Await(subscription, min(delay, deadline.remaining()))
            # A notice with the value saves the look; "released" or silence asks for one.
            if isinstance(notice, Entry):
                claim = notice
            else:
                claim = yield look(key, token, policy.lock_timeout)
        if isinstance(claim, Entry) or claim == token:
            return cast("Entry | str", claim)
        if claim != holder:
            # A new holder (the last one failed or its lease ran out): it deserves
            # the same patience, or every waiter would give up on it at once.
            holder = claim
            deadline.restart(policy.wait_timeout)
        with attempt:
            raise _StillLockedError
    # The loop ends by returning or by tenacity re-raising: this line is never reached.
    raise _StillLockedError  # pragma: no cover


class _DeadlineStop(tenacity.stop.stop_base):
    """Stop once *clock* passes a deadline that can move (tenacity's reads time.monotonic)."""

    def __init__(self, clock: Callable[[], float], deadline: float) -> None:
        self._clock = clock
        self._deadline = deadline

    def remaining(self) -> float:
        return max(0.0, self._deadline - self._clock())

    def restart(self, seconds: float) -> None:
        self._deadline = self._clock() + seconds

    @override
    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        del retry_state
        return self._clock() >= self._deadline


def _lead(key: str, token: str, ctx: Context) -> Generator[Op, Any, object]:
    """Compute and store the value while holding the lock; release it whatever happens."""
    policy = ctx.policy
    renewal = None
    if policy.lock_renewal:
        limit = policy.lock_timeout * RENEWAL_LIMIT
        renewal = Renewal(key, token, policy.lock_timeout, limit)
    try:
        entry = yield from _compute(key, ctx, renewal)
        if not ctx.policy.caches(entry.value):
            # Not to be stored: let go (announced, so waiters look and one computes).
            yield Unlock(key, token)
            return entry.value
        try:
            stored = yield SetAndUnlock(key, entry, ctx.policy.store_ttl, token)
        except BackendError as exc:
            _store_failed(key, ctx, exc)  # or raise: either way, release below
            yield from _release(key, token)
            return entry.value
    except GeneratorExit:
        # Closed by its owner being collected: no driver is left to release through,
        # so the lease runs out. Drivers themselves never close a plan early.
        raise
    except BaseException:
        # Nothing is cached. The release is announced: the waiters look at once, one of
        # them takes the lock and the others wait for it, so a failure does not let
        # every waiter compute at once.
        yield from _release(key, token)
        raise
    # What the backend stored, as every reader will see it (see Backend.set).
    return stored.value


def without_cache(key: str, ctx: Context, error: BackendError | None) -> Plan:
    """Serve a call the backend cannot: compute it, store nothing.

    *error* is the backend's failure, or None when the circuit breaker skipped the
    backend. With ``on_backend_error="raise"`` the failure is raised instead.
    """
    if error is not None:
        ctx.breaker.failed()
        if ctx.policy.on_backend_error == "raise":
            raise error
        ctx.emit(BackendFailed(key, error))
        logger.warning(
            "cache backend failed for %r; computing without it: %s", key, error
        )
    else:
        ctx.emit(BackendSkipped(key))
    entry = yield from _compute(key, ctx)
    return entry.value, False


def _store_failed(key: str, ctx: Context, error: BackendError) -> None:
    """The value was computed but could not be stored: keep it, or raise."""
    ctx.breaker.failed()
    if ctx.policy.on_backend_error == "raise":
        raise error
    ctx.emit(BackendFailed(key, error))
    logger.warning("cache backend failed for %r; value not stored: %s", key, error)


def _release(key: str, token: str) -> Generator[Op, Any, None]:
    try:
        yield Unlock(key, token)
    except Exception:
        # Never hide the error that brought us here; the lease expires on its own.
        logger.warning(
            "could not release the lock on %r; it expires by itself", key, exc_info=True
        )


def _compute(
    key: str, ctx: Context, renewal: Renewal | None = None
) -> Generator[Op, Any, Entry]:
    started = ctx.clock()
    try:
        value = yield Compute(renewal)
    except Exception as exc:
        ctx.emit(ComputeError(key, ctx.clock() - started, exc))
        raise
    seconds = ctx.clock() - started
    ctx.emit(Computed(key, seconds))
    return Entry(value, ctx.wall_clock(), seconds)
