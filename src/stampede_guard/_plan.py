"""The stampede algorithm, once, as a plan that does no I/O.

`plan` is a generator: it yields operations (`stampede_guard._ops`) and is sent their
results; a driver (`stampede_guard._drivers`) carries them out against a backend.
Steps:

1. Look the key up: a hit returns at once (one backend read). `_call.serve` does it
   for a remote backend; for the memory backend the wrapper reads and the pure
   `_call.first_look` decides (the hot path). `plan` starts at step 2, after a miss.
2. On a miss, atomically read again or take the lock (the double-check).
3. Lock taken: compute, then store the value and release the lock in one step. If the
   function raises, release the lock and let the exception through; nothing is cached.
4. Lock held by someone else: subscribe to news of the key, look once more, then wait
   for a notice (the value itself, or "released") for up to a backoff delay (tenacity
   decides each one) and look again, until the value arrives, the lock frees up (the
   holder failed or died and its lease ran out: take over), or ``wait_timeout`` runs
   out. Notices make waiters wake at once; the backoff polls only catch lost ones.
   Patience is per holder: when the lock passes to a new holder, the wait starts over,
   so the waiters of a dead holder wait for its successor instead of all computing.
5. Out of time: compute without the lock (the value is stored unless a newer one
   was), or raise `LockTimeoutError`.

Callers of a key that another caller of the same process is already serving join it
instead (`_joining`): they wait for its outcome as waiters wait for a lock.

Every look that may precede a computation carries the backend's ticket (see
`stampede_guard.backends.Claim`), and every store carries the ticket of the look
before its computation: the backend refuses a store whose computation began before
the stored value's or before an invalidation. So an older value never replaces a newer
one, and nothing computed before ``invalidate()`` returned is stored after it.

A value past its ``ttl`` but within ``stale_ttl`` (or fresh but due for an XFetch early
refresh) is served at once, and `refresh` recomputes it under the same lock: whoever
takes the lock (without waiting) computes, everyone else keeps the stored value.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator
from typing import Any, Protocol, cast

from stampede_guard._backoff import Deadline, StillLockedError, backoff
from stampede_guard._context import Context, Plan, Via
from stampede_guard._entry import FENCE_SECONDS, CachedFailure, Entry
from stampede_guard._errors import BackendError, LockTimeoutError
from stampede_guard._freshness import RefreshDue
from stampede_guard._ops import (
    AwaitNotice,
    Compute,
    Get,
    GetOrLock,
    Op,
    Set,
    SetAndUnlock,
    Subscribe,
    TakeLock,
    Unlock,
    Unsubscribe,
)
from stampede_guard._renewal import renew
from stampede_guard._tags import untagged
from stampede_guard.metrics import (
    BackendFailed,
    BackendSkipped,
    Computed,
    ComputeError,
    FailureCached,
    FailureServed,
    Hit,
    LockAcquired,
    LockWait,
    Miss,
    Refresh,
    RefreshFailed,
    Timeout,
)

__all__ = [
    "Flight",
    "backend_failed",
    "plan",
    "refresh",
    "refresh_now",
    "served",
    "without_cache",
]


class Flight(Protocol):
    """What the plan reads and marks of an in-process call (see `_coalesce`)."""

    looked: float  # when a joiner last looked at the backend for it (ctx.clock)
    watched: bool  # whether a joiner is looking at the backend for the others
    computing: float | None  # when its leader began computing, None before
    holder: str | None  # the leader's lock token while it computes under the lock


def refresh(
    key: str,
    due: RefreshDue,
    ctx: Context,
    failed: Callable[[str], None] | None = None,
) -> Plan:
    """Recompute *due*'s key if its lock is free; otherwise leave it to the holder.

    Never waits: whoever is refused the lock keeps serving the stored value (then
    returned as `Via.CACHE`). A failed refresh keeps it too (``stale_if_error``) and is
    reported, and calls *failed* with the key (see ``refresh_backoff``). Its failure is
    never cached (``cache_errors``): a stale value is better than an error.
    """
    token = ctx.new_token()
    claim = yield TakeLock(key, token, ctx.policy.lock_timeout)
    if claim != token:
        return due.entry.value, Via.CACHE
    leading = False
    try:
        # The double-check, for refreshes: another caller may have refreshed the value
        # between our read and our lock. Then it is the one to serve, and we let go.
        current = yield Get(key)
        if current is not None and current.created_at > due.entry.created_at:
            yield from _release(key, token, ctx)
            return served(key, current, ctx), Via.CACHE
        ctx.emit(Refresh(key, due.reason))
        leading = True
        result = yield from _lead(key, token, _ticket(claim), ctx)  # releases the lock
    except Exception as exc:
        if not leading:
            yield from _release(key, token, ctx)
        ctx.emit(RefreshFailed(key, exc))
        if failed is not None:
            failed(key)
        if ctx.policy.stale_if_error:
            return due.entry.value, Via.CACHE
        raise
    return result


def refresh_now(key: str, ctx: Context) -> Plan:
    """Compute *key* afresh and store it: ``refresh()``, which never waits.

    The value returned began computing after this call began, never an older one: if
    another caller holds the lock, its computation began earlier, so this call computes
    anyway (without the lock) and stores with its own, later ticket. The holder's older
    value can then no longer replace it.
    """
    ctx.emit(Refresh(key, "manual"))
    token = ctx.new_token()
    try:
        claim = yield TakeLock(key, token, ctx.policy.lock_timeout)
    except BackendError as exc:
        return (yield from without_cache(key, ctx, exc))
    if claim == token:
        ctx.emit(LockAcquired(key))
        return (yield from _lead(key, token, _ticket(claim), ctx))
    entry = yield from _compute(key, ctx)
    return (yield from _store(key, entry, _ticket(claim), ctx))


def plan(
    key: str,
    ctx: Context,
    flight: Flight | None = None,
    gave_up_on: str | None = None,
) -> Plan:
    """Serve *key* after a miss, computing it at most once among concurrent callers.

    *flight* is this call's in-process flight, if others may join it: it is marked
    when this call starts computing, which starts its joiners' patience. With
    *gave_up_on* (see `take_over`), a lock still held by that token is not waited for.
    """
    policy = ctx.policy
    token = ctx.new_token()
    try:
        claim = yield GetOrLock(key, token, policy.lock_timeout)
    except BackendError as exc:
        return (yield from without_cache(key, ctx, exc, flight))
    breaker = ctx.breaker_for(key)
    if isinstance(claim, Entry):  # stored between our two looks
        breaker.succeeded()
        ctx.emit(Hit(key))
        return served(key, claim, ctx), Via.CACHE
    # A lock taken is a write the server accepted; a lock found held, a read.
    if claim == token:
        breaker.stored()
    else:
        breaker.succeeded()
    ctx.emit(Miss(key))
    if claim != token and claim == gave_up_on:
        entry = yield from _compute(key, ctx, flight=flight)
        return (yield from _store(key, entry, _ticket(claim), ctx))

    if claim != token:
        started = ctx.clock()
        try:
            claim = yield from _wait(key, token, claim, ctx)
        except BackendError as exc:
            return (yield from without_cache(key, ctx, exc, flight))
        except StillLockedError as exc:
            waited = ctx.clock() - started
            return (yield from _timed_out(key, ctx, waited, exc.ticket, flight))
        waited = ctx.clock() - started
        if isinstance(claim, Entry):
            ctx.emit(LockWait(key, waited, "value"))
            return served(key, claim, ctx), Via.COMPUTED
        ctx.emit(LockWait(key, waited, "lock"))

    ctx.emit(LockAcquired(key))
    return (
        yield from _lead(key, token, _ticket(claim), ctx, flight, keep_failure=True)
    )


def _timed_out(
    key: str,
    ctx: Context,
    waited: float,
    ticket: int | None,
    flight: Flight | None,
) -> Plan:
    """Step 5: the wait ran out. Apply ``on_timeout``."""
    policy = ctx.policy
    ctx.emit(LockWait(key, waited, "timeout"))
    ctx.emit(Timeout(key, waited, policy.on_timeout))
    if policy.on_timeout == "raise":
        raise LockTimeoutError(key, waited) from None
    # Like nginx's proxy_cache_lock_timeout: serve this caller now. The value is
    # stored too, with the ticket of our last look, so the slow holder's value (begun
    # earlier) can no longer replace it, and it replaces the holder's if that came first.
    entry = yield from _compute(key, ctx, flight=flight)
    return (yield from _store(key, entry, ticket, ctx))


def _store(key: str, entry: Entry, ticket: int | None, ctx: Context) -> Plan:
    """Store a value computed without the lock, unless it is not to be cached."""
    if entry.compute_seconds >= FENCE_SECONDS:  # see _lead
        return entry.value, Via.PRIVATE
    ttl = ctx.policy.store_ttl_for(key, entry)
    if ttl is None:
        return entry.value, Via.COMPUTED
    try:
        stored = yield Set(key, entry, ttl, ticket)
    except BackendError as exc:
        _store_failed(key, ctx, exc)
        return entry.value, Via.COMPUTED
    ctx.breaker_for(key).stored()
    if stored is None:
        return entry.value, Via.PRIVATE
    return stored.value, Via.COMPUTED


def _ticket(claim: object) -> int | None:
    # A backend written before tickets returns a plain str: its stores are not fenced.
    return getattr(claim, "ticket", None)


def _wait(
    key: str, token: str, holder: str, ctx: Context
) -> Generator[Op, Any, Entry | str]:
    """Wait until the value appears or the lock is ours; raise StillLockedError at the end.

    Returns the entry, or the claim (*token*) once this call holds the lock. The lock
    is not held while waiting, so waiting is safe.
    """
    subscription = yield Subscribe(key)
    try:
        claim = yield from _listen(key, token, holder, subscription, ctx)
    except GeneratorExit:
        raise  # closed with nobody to carry out an Unsubscribe; see _lead
    except BaseException:
        yield Unsubscribe(subscription)
        raise
    yield Unsubscribe(subscription)
    return claim


def _listen(
    key: str, token: str, holder: str, subscription: object, ctx: Context
) -> Generator[Op, Any, Entry | str]:
    """The waiting loop: each round waits for a notice up to a delay, then looks.

    The last delay is cut short so that the final look happens at the deadline.
    """
    policy = ctx.policy
    deadline = Deadline(ctx.clock, ctx.clock() + policy.wait_timeout)
    delays: list[float] = []
    # Listening now: look once more, or a value stored just before would go unheard.
    claim = yield GetOrLock(key, token, policy.lock_timeout)
    for attempt in backoff(policy, deadline, delays, ctx.random):
        if delays:
            delay = delays.pop()
            if subscription is not None:
                # Notices wake us; our own looks only catch lost ones and dead holders,
                # so with a subscription they need not come more often than max_delay.
                delay = max(delay, policy.max_delay)
            notice = yield AwaitNotice(subscription, min(delay, deadline.remaining()))
            # A notice with the value saves the look; "released" or silence asks for one.
            if isinstance(notice, Entry):
                claim = notice
            else:
                claim = yield GetOrLock(key, token, policy.lock_timeout)
        if isinstance(claim, Entry) or claim == token:
            return cast("Entry | str", claim)
        if claim != holder:
            # A new holder (the last one failed or its lease ran out): it deserves
            # the same patience, or every waiter would give up on it at once.
            holder = claim
            deadline.restart(policy.wait_timeout)
        with attempt:
            raise StillLockedError(_ticket(claim))
    # The loop ends by returning or by tenacity re-raising: this line is never reached.
    raise StillLockedError(None)  # pragma: no cover


def _lead(
    key: str,
    token: str,
    ticket: int | None,
    ctx: Context,
    flight: Flight | None = None,
    *,
    keep_failure: bool = False,
) -> Plan:
    """Compute and store the value while holding the lock; release it whatever happens.

    With *keep_failure* (a miss: no value to fall back on), an exception that
    ``cache_errors`` names is stored in place of the value, for its period, before it
    is raised: the waiters and every other process get it instead of calling again.
    """
    policy = ctx.policy
    watchdog = None
    if policy.lock_renewal:
        watchdog = renew(key, token, policy.lock_timeout, policy.lease_limit, ctx)
    computed = False
    try:
        entry = yield from _compute(key, ctx, watchdog, flight, token)
        computed = True
        if entry.compute_seconds >= FENCE_SECONDS:
            # Longer than an invalidation is remembered: it may have missed one.
            yield Unlock(key, token)
            return entry.value, Via.PRIVATE
        # Asked inside the try: a ttl function that raises, or answers no number of
        # seconds, fails this caller like a computation that raised (lock released).
        ttl = policy.store_ttl_for(key, entry)
        if ttl is None:
            # Not to be stored: let go (announced, so waiters look and one computes).
            yield Unlock(key, token)
            return entry.value, Via.COMPUTED
        stored: Entry | None = None
        failed: BackendError | None = None
        try:
            stored = yield SetAndUnlock(key, entry, ttl, token, ticket)
        except BackendError as exc:
            failed = exc
    except GeneratorExit:
        # Closed by its owner being collected: no driver is left to release through,
        # so the lease runs out. Drivers themselves never close a plan early.
        raise
    except BaseException as exc:
        kept = keep_failure and not computed  # the function's failure, on a miss
        if kept and (yield from _keep(key, token, exc, ctx, ticket=ticket)):
            raise
        # Nothing is cached. The release is announced: the waiters look at once, one of
        # them takes the lock and the others wait for it, so a failure does not let
        # every waiter compute at once.
        yield from _release(key, token, ctx)
        raise
    if failed is not None:
        # The store already cost its callers up to a socket timeout: the release goes
        # on without them (it may have happened with the store, or the lease ends it).
        yield Unlock(key, token, apart=True)
        _store_failed(key, ctx, failed)  # or raise
        return entry.value, Via.COMPUTED
    ctx.breaker_for(key).stored()
    if stored is None:
        # Refused: an invalidation, or a value begun later, came first. Our caller
        # asked before either and may have it; nobody else may.
        return entry.value, Via.PRIVATE
    # What the backend stored, as every reader will see it (see Backend.set).
    return stored.value, Via.COMPUTED


def _keep(
    key: str, token: str, exc: BaseException, ctx: Context, *, ticket: int | None
) -> Generator[Op, Any, bool]:
    """Store *exc* in place of a value, releasing the lock, if ``cache_errors`` says so.

    True once sent: stored under the lock for the period *exc*'s class is given, and
    fenced like a value (an invalidation since the look refuses it). False if *exc* is
    not to be kept, or the store failed: the caller releases the lock as after any
    failure, and raises *exc* either way.
    """
    failures = ctx.policy.failures
    period = failures.period(exc) if isinstance(exc, Exception) else None
    if period is None:
        return False
    kept = failures.kept(exc)
    try:
        yield SetAndUnlock(
            key, Entry(kept, ctx.wall_clock(), 0.0), period, token, ticket
        )
    except Exception:  # a BackendError, a serializer that cannot take a dict of str
        ctx.logger.warning("could not cache the failure of %r", key, exc_info=True)
        return False
    ctx.emit(FailureCached(key, kept.type_name, period))
    return True


def served(key: str, entry: Entry, ctx: Context) -> object:
    """Return *entry*'s value to a caller, or raise the failure it holds.

    Every value a call is served from the cache goes through here (`_call.first_look`
    too): a `CachedFailure` is raised again as its exception, and reported.
    """
    value = entry.value
    if type(value) is CachedFailure:
        if ctx.observed:  # build no event nobody will see
            ctx.emit(FailureServed(key, value.type_name))
        raise ctx.policy.failures.rebuilt(key, value)
    return value


def without_cache(
    key: str, ctx: Context, error: BackendError | None, flight: Flight | None = None
) -> Plan:
    """Serve a call the backend cannot: compute it, store nothing.

    *error* is the backend's failure, or None when the circuit breaker skipped the
    backend. With ``on_backend_error="raise"`` the failure is raised instead.
    """
    if error is not None:
        backend_failed(key, ctx, error, "computing without it")
    else:
        ctx.emit(BackendSkipped(key))
    entry = yield from _compute(key, ctx, flight=flight)
    return entry.value, Via.COMPUTED


def _store_failed(key: str, ctx: Context, error: BackendError) -> None:
    """The value was computed but could not be stored: keep it, or raise."""
    backend_failed(key, ctx, error, "value not stored")


def backend_failed(key: str, ctx: Context, error: BackendError, outcome: str) -> None:
    """Tell the breaker, then raise (``on_backend_error="raise"``) or report *outcome*."""
    news = ctx.breaker_for(key).failed(error)
    if ctx.policy.on_backend_error == "raise":
        raise error
    ctx.emit(BackendFailed(key, error))
    ctx.logger.log(
        logging.WARNING if news else logging.DEBUG,
        "cache backend failed for %r; %s: %s",
        key,
        outcome,
        error,
    )


def _release(key: str, token: str, ctx: Context) -> Generator[Op, Any, None]:
    try:
        yield Unlock(key, token)
    except Exception:
        # Never hide the error that brought us here; the lease expires on its own.
        ctx.logger.warning(
            "could not release the lock on %r; it expires by itself", key, exc_info=True
        )


def _compute(
    key: str,
    ctx: Context,
    watchdog: Generator[Op, Any, None] | None = None,
    flight: Flight | None = None,
    holder: str | None = None,
) -> Generator[Op, Any, Entry]:
    """Call the function; mark *flight* (if any) as computing, under *holder*'s lock."""
    policy = ctx.policy
    started = ctx.clock()
    if flight is not None:
        flight.computing, flight.holder = started, holder
    try:
        value = yield Compute(
            key, watchdog, apart=policy.on_cancel == "finish", bound=policy.lease_limit
        )
    except Exception as exc:
        ctx.emit(ComputeError(key, ctx.clock() - started, exc))
        raise
    seconds = ctx.clock() - started
    ctx.emit(Computed(key, seconds))
    value, tags = untagged(value)
    return Entry(value, ctx.wall_clock(), seconds, tags)
