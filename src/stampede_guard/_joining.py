"""Callers of a key another caller of this process is serving: they join its flight.

A joiner waits for the flight's outcome as a waiter waits for a lock (`_plan`): with
the same deadline and backoff, looking at the backend now and then (a value stored
from anywhere serves it), and gives up as waiters do. Those that give up and compute
do so once per process at a time (`take_over`). `_coalesce` keeps the flights; this
module decides how its callers wait.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

from stampede_guard._backoff import Deadline, StillLockedError, backoff
from stampede_guard._context import Context, Plan, Served, Via
from stampede_guard._errors import BackendError, LockTimeoutError
from stampede_guard._ops import AwaitFlight, Get, Op
from stampede_guard._plan import Flight, plan, served
from stampede_guard.metrics import LockWait, Miss, Timeout

__all__ = ["GaveUp", "first_wait", "join", "take_over"]


@dataclass(frozen=True, slots=True)
class GaveUp:
    """What `join` returns when its caller gave up and is to serve itself (`take_over`).

    *holder* is the lock token of the leader it gave up on, if that leader was
    computing under the lock; None if the leader was still looking or waiting.
    """

    holder: str | None


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
    deadline = Deadline(ctx.clock, max(arrived, computing) + policy.wait_timeout)
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
    key: str, ctx: Context, flight: Flight, arrived: float, deadline: Deadline
) -> Generator[Op, Any, Served | GaveUp | None]:
    """Run the watcher's rounds: wait up to a backoff delay, then look.

    At most one look per half ``max_delay``. Returns as `join` does.
    """
    policy = ctx.policy
    delays: list[float] = []
    try:
        for attempt in backoff(policy, deadline, delays, ctx.random):
            if delays:
                delay = max(delays.pop(), policy.max_delay)
                if (yield AwaitFlight(flight, min(delay, deadline.remaining()))):
                    return None
            if ctx.clock() - flight.looked >= policy.max_delay / 2:
                found = yield from _look(key, ctx, flight, arrived)
                if found is not None:
                    return found
            with attempt:
                raise StillLockedError(None)  # noqa: TRY301 - tenacity's way to retry
    except StillLockedError:
        pass
    return _joiner_gave_up(key, ctx, ctx.clock() - arrived, _holder(flight))


def _look(
    key: str, ctx: Context, flight: Flight, arrived: float
) -> Generator[Op, Any, Served | None]:
    """Look at the backend for a joiner: the value if stored from anywhere, else None.

    A failure stored there (``cache_errors``) is raised to this joiner; the others
    wait on for their leader, or give up and find it themselves.
    """
    flight.looked = ctx.clock()
    try:
        found = yield Get(key)
    except BackendError:
        return None  # the flight's leader meets the failure and handles it
    if found is None:
        return None
    ctx.emit(Miss(key))  # it waited, and a computation served it
    ctx.emit(LockWait(key, ctx.clock() - arrived, "value"))
    # Not found.value: a stored failure would be returned as a value, to every joiner.
    return served(key, found, ctx), Via.COMPUTED


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
