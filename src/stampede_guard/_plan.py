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
5. Out of time: compute without the lock (the value is stored unless a newer one
   was), or raise `LockTimeoutError`.

Callers of a key that another caller of the same process is already serving `join`
it: they wait for its outcome as waiters wait for a lock, with the same deadline and
backoff, looking at the backend now and then (a value stored from anywhere serves
them), and give up as waiters do. Those that give up and compute do so once per
process at a time (`take_over`).

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
from dataclasses import dataclass
from typing import Any, Protocol, cast

import tenacity
from typing_extensions import override

from stampede_guard._context import MISS, Context, Plan, Policy, Served, Via
from stampede_guard._entry import FENCE_SECONDS, Entry
from stampede_guard._errors import BackendError, LockTimeoutError
from stampede_guard._freshness import RefreshDue, refresh_reason, stale_value
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
    Timeout,
)

__all__ = [
    "MISS",
    "Context",
    "Flight",
    "GaveUp",
    "Plan",
    "Policy",
    "RefreshDue",
    "Served",
    "Via",
    "first_look",
    "first_wait",
    "join",
    "plan",
    "refresh",
    "refresh_now",
    "stale_value",
    "take_over",
    "without_cache",
]

logger = logging.getLogger("stampede_guard")


class _StillLockedError(Exception):
    """Still waiting; tenacity retries on it and re-raises the last one at the end.

    *ticket* is the backend's ticket of the last look, for a store after giving up.
    """

    def __init__(self, ticket: int | None) -> None:
        super().__init__()
        self.ticket = ticket


@dataclass(frozen=True, slots=True)
class GaveUp:
    """What `join` returns when its caller gave up and is to serve itself (`take_over`).

    *holder* is the lock token of the leader it gave up on, if that leader was
    computing under the lock; None if the leader was still looking or waiting.
    """

    holder: str | None


class Flight(Protocol):
    """What the plan reads and marks of an in-process call (see `_coalesce`)."""

    looked: float  # when a joiner last looked at the backend for it (ctx.clock)
    watched: bool  # whether a joiner is looking at the backend for the others
    computing: float | None  # when its leader began computing, None before
    holder: str | None  # the leader's lock token while it computes under the lock


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

    Never waits: whoever is refused the lock keeps serving the stored value (then
    returned as `Via.CACHE`). A failed refresh keeps it too (``stale_if_error``) and is
    reported.
    """
    token = ctx.new_token()
    claim = yield Lock(key, token, ctx.policy.lock_timeout)
    if claim != token:
        return due.entry.value, Via.CACHE
    leading = False
    try:
        # The double-check, for refreshes: another caller may have refreshed the value
        # between our read and our lock. Then it is the one to serve, and we let go.
        current = yield Get(key)
        if current is not None and current.created_at > due.entry.created_at:
            yield from _release(key, token)
            return current.value, Via.CACHE
        ctx.emit(Refresh(key, due.reason))
        leading = True
        served = yield from _lead(key, token, _ticket(claim), ctx)  # releases the lock
    except Exception as exc:
        if not leading:
            yield from _release(key, token)
        ctx.emit(RefreshFailed(key, exc))
        if ctx.policy.stale_if_error:
            return due.entry.value, Via.CACHE
        raise
    return served


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
        claim = yield Lock(key, token, ctx.policy.lock_timeout)
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
        return claim.value, Via.CACHE
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
        except _StillLockedError as exc:
            waited = ctx.clock() - started
            return (yield from _timed_out(key, ctx, waited, exc.ticket, flight))
        waited = ctx.clock() - started
        if isinstance(claim, Entry):
            ctx.emit(LockWait(key, waited, "value"))
            return claim.value, Via.COMPUTED
        ctx.emit(LockWait(key, waited, "lock"))

    ctx.emit(LockAcquired(key))
    return (yield from _lead(key, token, _ticket(claim), ctx, flight))


def first_wait(ctx: Context, flight: Flight) -> float:
    """Return how long a caller joining *flight* now first waits, doing nothing else.

    Most flights end within it, and then that is all a joiner costs (a thousand of
    them wake one after another, each paying for what it set up). Only a joiner still
    waiting after it runs `join`. While the leader looks or waits for another caller's
    lock, it is a waiter bound by its own deadline: its joiners wait with it, for
    ``wait_timeout``. Once it computes: up to ``max_delay``, and no longer than its
    lease has left (0 if it ran out: `join` then looks at once).
    """
    policy = ctx.policy
    if flight.computing is None:
        return policy.wait_timeout
    lease_left = flight.computing + policy.lease_limit - ctx.clock()
    return min(policy.max_delay, policy.wait_timeout, max(0.0, lease_left))


def join(
    key: str, ctx: Context, flight: Flight, arrived: float
) -> Generator[Op, Any, Served | GaveUp | None]:
    """Wait, as a waiter waits for a lock, for *flight*: this process's call of *key*.

    For a caller that arrived at *arrived* and has waited `first_wait` since. Returns
    None once the flight has an outcome (the caller takes it from there), the value if
    a look at the backend found one stored from anywhere (the flight's leader may hang,
    or have lost its lease to another process), or `GaveUp` when ``wait_timeout`` ran
    out and ``on_timeout="compute"``; with ``"raise"`` it raises `LockTimeoutError`
    instead. A local leader never holds its process's callers longer than a holder in
    another process would: ``wait_timeout`` from when it began computing (or from their
    arrival, if later).

    One joiner at a time (the watcher) looks at the backend, with the waiters' backoff
    (and ``max_retries``); a value it finds ends the flight for all. The others sleep
    until the flight ends or their patience does: a thousand joiners that polled would
    starve their own leader of the GIL. A caller arriving after the leader's lease ran
    out looks once at once: another process may have stored the value long ago.
    """
    policy = ctx.policy
    computing = arrived if flight.computing is None else flight.computing
    deadline = _DeadlineStop(ctx.clock, max(arrived, computing) + policy.wait_timeout)
    if computing + policy.lease_limit <= arrived:
        found = yield from _look(key, ctx, flight, arrived)
        if found is not None:
            return found
    if flight.watched:
        if (yield AwaitFlight(flight, deadline.remaining())):
            return None
        return _joiner_gave_up(key, ctx, ctx.clock() - arrived, _holder(flight))
    flight.watched = True
    try:
        return (yield from _watch(key, ctx, flight, arrived, deadline))
    finally:
        flight.watched = False


def _watch(
    key: str, ctx: Context, flight: Flight, arrived: float, deadline: _DeadlineStop
) -> Generator[Op, Any, Served | GaveUp | None]:
    """Run the watcher's rounds: wait up to a backoff delay, then look.

    At most one look per half ``max_delay``. Returns as `join` does.
    """
    policy = ctx.policy
    delays: list[float] = []
    try:
        for attempt in _backoff(policy, deadline, delays):
            if delays:
                delay = max(delays.pop(), policy.max_delay)
                if (yield AwaitFlight(flight, min(delay, deadline.remaining()))):
                    return None
            if ctx.clock() - flight.looked >= policy.max_delay / 2:
                found = yield from _look(key, ctx, flight, arrived)
                if found is not None:
                    return found
            with attempt:
                raise _StillLockedError(None)  # noqa: TRY301 - tenacity's way to retry
    except _StillLockedError:
        pass
    return _joiner_gave_up(key, ctx, ctx.clock() - arrived, _holder(flight))


def _look(
    key: str, ctx: Context, flight: Flight, arrived: float
) -> Generator[Op, Any, Served | None]:
    """Look at the backend for a joiner: the value if stored from anywhere, else None."""
    flight.looked = ctx.clock()
    try:
        found = yield Get(key)
    except BackendError:
        return None  # the flight's leader meets the failure and handles it
    if found is None:
        return None
    ctx.emit(Miss(key))  # it waited, and a computation served it
    ctx.emit(LockWait(key, ctx.clock() - arrived, "value"))
    return found.value, Via.COMPUTED


def _holder(flight: Flight) -> str | None:
    return flight.holder if flight.computing is not None else None


def _joiner_gave_up(
    key: str, ctx: Context, waited: float, holder: str | None
) -> GaveUp:
    """Step 5 for a joiner: report the timeout, then raise or let it serve itself."""
    ctx.emit(LockWait(key, waited, "timeout"))
    ctx.emit(Timeout(key, waited, ctx.policy.on_timeout))
    if ctx.policy.on_timeout == "raise":
        ctx.emit(Miss(key))  # with "compute", `take_over` reports the hit or miss
        raise LockTimeoutError(key, waited) from None
    return GaveUp(holder)


def take_over(key: str, ctx: Context, flight: Flight, gave_up: GaveUp) -> Plan:
    """Serve *key* for this process's callers that gave up on their local leader.

    One look, as after a miss: a value stored meanwhile is served; a free lock (the
    leader's lease ran out) is taken and the value computed under it; a lock held by
    another holder (one that took over from the hung leader) gets patience afresh, as
    waiters give it. A lock still held by the leader given up on is not waited for
    again: the value is computed without it, and stored with this look's ticket, so
    it replaces nothing newer. *flight* is the new flight this caller leads.
    """
    return plan(key, ctx, flight, gave_up.holder)


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
    if not ctx.policy.caches(entry.value):
        return entry.value, Via.COMPUTED
    try:
        stored = yield Set(key, entry, ctx.policy.store_ttl, ticket)
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


def _backoff(
    policy: Policy, deadline: _DeadlineStop, delays: list[float]
) -> tenacity.Retrying:
    """The waiting rounds: tenacity decides each delay (recorded in *delays*) and the end.

    tenacity's sleep only records the delay, which becomes the longest the next Await
    may take; its stop is the moving *deadline*, and ``max_retries`` if set.
    """
    stop: tenacity.stop.stop_base = deadline
    if policy.max_retries is not None:
        stop = stop | tenacity.stop_after_attempt(policy.max_retries + 1)
    return tenacity.Retrying(
        sleep=delays.append,
        wait=tenacity.wait_exponential_jitter(
            multiplier=policy.base_delay, max=policy.max_delay, jitter=policy.base_delay
        ),
        stop=stop,
        retry=tenacity.retry_if_exception_type(_StillLockedError),
        reraise=True,
    )


def _wait(
    key: str, token: str, holder: str, ctx: Context
) -> Generator[Op, Any, Entry | str]:
    """Wait until the value appears or the lock is ours; raise _StillLockedError at the end.

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
    deadline = _DeadlineStop(ctx.clock, ctx.clock() + policy.wait_timeout)
    delays: list[float] = []
    # Listening now: look once more, or a value stored just before would go unheard.
    claim = yield GetOrLock(key, token, policy.lock_timeout)
    for attempt in _backoff(policy, deadline, delays):
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
                claim = yield GetOrLock(key, token, policy.lock_timeout)
        if isinstance(claim, Entry) or claim == token:
            return cast("Entry | str", claim)
        if claim != holder:
            # A new holder (the last one failed or its lease ran out): it deserves
            # the same patience, or every waiter would give up on it at once.
            holder = claim
            deadline.restart(policy.wait_timeout)
        with attempt:
            raise _StillLockedError(_ticket(claim))
    # The loop ends by returning or by tenacity re-raising: this line is never reached.
    raise _StillLockedError(None)  # pragma: no cover


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


def _lead(
    key: str,
    token: str,
    ticket: int | None,
    ctx: Context,
    flight: Flight | None = None,
) -> Plan:
    """Compute and store the value while holding the lock; release it whatever happens."""
    policy = ctx.policy
    renewal = None
    if policy.lock_renewal:
        renewal = Renewal(key, token, policy.lock_timeout, policy.lease_limit)
    try:
        entry = yield from _compute(key, ctx, renewal, flight, token)
        if entry.compute_seconds >= FENCE_SECONDS:
            # Longer than an invalidation is remembered: it may have missed one.
            yield Unlock(key, token)
            return entry.value, Via.PRIVATE
        if not policy.caches(entry.value):
            # Not to be stored: let go (announced, so waiters look and one computes).
            yield Unlock(key, token)
            return entry.value, Via.COMPUTED
        stored: Entry | None = None
        failed: BackendError | None = None
        try:
            stored = yield SetAndUnlock(key, entry, policy.store_ttl, token, ticket)
        except BackendError as exc:
            failed = exc
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


def without_cache(
    key: str, ctx: Context, error: BackendError | None, flight: Flight | None = None
) -> Plan:
    """Serve a call the backend cannot: compute it, store nothing.

    *error* is the backend's failure, or None when the circuit breaker skipped the
    backend. With ``on_backend_error="raise"`` the failure is raised instead.
    """
    if error is not None:
        news = ctx.breaker_for(key).failed(error)
        if ctx.policy.on_backend_error == "raise":
            raise error
        ctx.emit(BackendFailed(key, error))
        logger.log(
            logging.WARNING if news else logging.DEBUG,
            "cache backend failed for %r; computing without it: %s",
            key,
            error,
        )
    else:
        ctx.emit(BackendSkipped(key))
    entry = yield from _compute(key, ctx, flight=flight)
    return entry.value, Via.COMPUTED


def _store_failed(key: str, ctx: Context, error: BackendError) -> None:
    """The value was computed but could not be stored: keep it, or raise."""
    news = ctx.breaker_for(key).failed(error)
    if ctx.policy.on_backend_error == "raise":
        raise error
    ctx.emit(BackendFailed(key, error))
    logger.log(
        logging.WARNING if news else logging.DEBUG,
        "cache backend failed for %r; value not stored: %s",
        key,
        error,
    )


def _release(key: str, token: str) -> Generator[Op, Any, None]:
    try:
        yield Unlock(key, token)
    except Exception:
        # Never hide the error that brought us here; the lease expires on its own.
        logger.warning(
            "could not release the lock on %r; it expires by itself", key, exc_info=True
        )


def _compute(
    key: str,
    ctx: Context,
    renewal: Renewal | None = None,
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
            key, renewal, apart=policy.on_cancel == "finish", bound=policy.lease_limit
        )
    except Exception as exc:
        ctx.emit(ComputeError(key, ctx.clock() - started, exc))
        raise
    seconds = ctx.clock() - started
    ctx.emit(Computed(key, seconds))
    return Entry(value, ctx.wall_clock(), seconds)
