"""In-process coalescing ("single flight"): concurrent calls of one key share one call.

Only the first caller of a key in this process (per event loop, for asyncio) leads: it
runs the plan and so talks to the backend. Callers arriving meanwhile join its flight
and wait in memory, but as waiters, not as hostages: the plan's `join` gives each its
own deadline (``wait_timeout``, ``on_timeout``), and one of them at a time looks at
the backend now and then for all, so a leader that hangs never holds its process's
callers longer than a leader in another process would, and a value stored from
anywhere serves them. Joiners that give up and compute do it once per process at a time: the
first replaces the flight it gave up on and the others join the replacement.

A flight ends with one outcome, which its joiners share: a value, the function's
exception, or "start afresh" (the leader's caller was cancelled, or its value was
refused by the store because an invalidation or a newer value came first). A flight
ended by a BaseException (KeyboardInterrupt, SystemExit...) is run once more by one
joiner; if that run is interrupted too, its joiners get `InterruptedComputationError`
instead of running it once each. This holds for every backend, and when the backend
is down: a process adds at most one call per key to a struggling backend.
"""

from __future__ import annotations

import _thread
import asyncio
import enum
import os
import threading
import weakref
from collections.abc import Awaitable, Callable, Generator, Mapping
from typing import Any, Final, Protocol, TypeAlias, TypeVar, cast

from stampede_guard._context import Context, Plan, Served, Via
from stampede_guard._errors import InterruptedComputationError
from stampede_guard._flight import FlightState, Outcome, TaskFlight, ThreadFlight
from stampede_guard._joining import GaveUp, first_wait, join, take_over
from stampede_guard._ops import Op
from stampede_guard._plan import Flight
from stampede_guard.metrics import Hit, LockWait, Miss

__all__ = [
    "AsyncFlights",
    "AsyncLead",
    "Lead",
    "Refreshing",
    "Run",
    "RunAsync",
    "SyncFlights",
]

T = TypeVar("T")

# How a flight's leader begins: with the plan to run (`_plan.plan`, after a miss), or,
# for step 1 on a remote backend, with the wrapper's read decided by `_call.looked`:
# a value served already (a hit builds no plan) or the plan to run from there.
Lead: TypeAlias = Callable[[str, Context, Flight | None], Served | Plan]
AsyncLead: TypeAlias = Callable[[str, Context, Flight | None], Awaitable[Served | Plan]]


class Run(Protocol):
    """Run a plan for a caller (of its function with *args*) with the sync driver.

    The arguments travel apart from the runner, so that a hit, which runs no plan,
    allocates nothing to bind them.
    """

    def __call__(self, args: Args, steps: Generator[Op, Any, T], /) -> T: ...


class RunAsync(Protocol):
    """Run a plan for a caller with the asyncio driver (see `Run`)."""

    def __call__(self, args: Args, steps: Generator[Op, Any, T], /) -> Awaitable[T]: ...


# A call's positional and keyword arguments.
Args: TypeAlias = tuple[tuple[Any, ...], Mapping[str, Any]]


class _Again(enum.Enum):
    """What `_joined` returns for "start afresh" (after a BaseException: the one retry)."""

    AGAIN = "again"
    AGAIN_INTERRUPTED = "again after an interruption"


_AGAIN: Final = _Again.AGAIN
_AGAIN_INTERRUPTED: Final = _Again.AGAIN_INTERRUPTED


class SyncFlights:
    """The calls in progress of one decorated function, by key."""

    def __init__(self) -> None:
        self._flights: dict[str, ThreadFlight] = {}
        # For replacing, forgetting and ending flights, never held while waiting.
        self._mutex = _thread.allocate_lock()
        _registries.add(self)

    def run(self, key: str, ctx: Context, run: Run, args: Args, lead: Lead) -> object:
        """Serve *key*: lead with *lead* if nobody in this process is, else join.

        Every step is a plan run by *run*: the leader's (*lead*), a joiner's wait
        (`join`), a take-over (`take_over`); between them, `_joined` decides.
        """
        flights = self._flights
        retried = False
        while True:
            flight = flights.get(key)
            if flight is None:
                mine = ThreadFlight(self._mutex)
                flight = flights.setdefault(key, mine)  # atomic: one leader per key
                if flight is mine:  # lead (inline: this is every remote hit's path)
                    return self._lead(
                        key, ctx, mine, None, lead=lead, run=run, args=args
                    )
            flight.joined()
            started = ctx.clock()
            if flight.wait(first_wait(ctx, flight)):
                joined = None
            else:
                joined = run(args, join(key, ctx, flight, started))
            if isinstance(joined, GaveUp):
                mine = ThreadFlight(self._mutex)
                if self._replace(key, flight, mine):
                    over = _taking_over(joined)
                    return self._lead(
                        key, ctx, mine, flight, lead=over, run=run, args=args
                    )
                continue  # another joiner took over first: join its flight instead
            waited = ctx.clock() - started
            outcome = _joined(key, flight, joined, waited, ctx, flights, retried)
            if outcome is _AGAIN_INTERRUPTED:
                retried = True
            elif outcome is not _AGAIN:
                return outcome

    def _lead(
        self,
        key: str,
        ctx: Context,
        mine: ThreadFlight,
        replaces: ThreadFlight | None,
        *,
        lead: Lead,
        run: Run,
        args: Args,
    ) -> object:
        try:
            begun = lead(key, ctx, mine)
            value, via = begun if isinstance(begun, tuple) else run(args, begun)
        except BaseException as exc:
            ended = _ended_by(exc, caller_cancelled=False)
            mine.finish(ended, error=exc, registry=self._flights, key=key)
            raise
        _share(mine, replaces, value, via, self._flights, key)
        return value

    def _replace(self, key: str, old: ThreadFlight, new: ThreadFlight) -> bool:
        with self._mutex:
            return _replace(self._flights, key, old, new)

    def forget(self, key: str, flight: ThreadFlight | None = None) -> None:
        """Stop new callers of *key* from joining *flight* (any flight, if None).

        ``invalidate()`` calls it: a call that starts after an invalidation must not
        be served by a computation that began before it.
        """
        with self._mutex:
            _forget(self._flights, key, flight)

    def forget_all(self) -> None:
        """Stop new callers of any key from joining a flight begun before now (a tag)."""
        with self._mutex:
            self._flights.clear()

    def clear(self) -> None:
        """Forget every flight (in a forked child, their leaders do not exist)."""
        self._flights = {}
        self._mutex = _thread.allocate_lock()


class AsyncFlights:
    """The calls in progress of one decorated ``async def``, by key, per event loop."""

    def __init__(self) -> None:
        self._flights: dict[str, TaskFlight] = {}
        _registries.add(self)

    async def run(
        self, key: str, ctx: Context, run: RunAsync, args: Args, lead: AsyncLead
    ) -> object:
        """See `SyncFlights.run`: the same steps, awaited, for one event loop's tasks."""
        loop = asyncio.get_running_loop()
        flights = self._flights
        retried = False
        while True:
            flight = flights.get(key)
            if flight is None:
                mine = TaskFlight(loop)
                flight = flights.setdefault(key, mine)
                if flight is mine:
                    return await self._lead(
                        key, ctx, mine, None, lead=lead, run=run, args=args
                    )
            if flight.loop is not loop:
                # Another thread's event loop leads; its futures are not ours to await.
                begun = await lead(key, ctx, None)
                value, _ = begun if isinstance(begun, tuple) else await run(args, begun)
                return value
            flight.joined()
            started = ctx.clock()
            if await flight.wait(first_wait(ctx, flight)):
                joined = None
            else:
                joined = await run(args, join(key, ctx, flight, started))
            if isinstance(joined, GaveUp):
                # No task of this loop can come in between, and callers in other
                # loops never replace a flight of this one: no mutex.
                mine = TaskFlight(loop)
                if _replace(flights, key, flight, mine):
                    over = _async(_taking_over(joined))
                    return await self._lead(
                        key, ctx, mine, flight, lead=over, run=run, args=args
                    )
                continue
            waited = ctx.clock() - started
            outcome = _joined(key, flight, joined, waited, ctx, flights, retried)
            if outcome is _AGAIN_INTERRUPTED:
                retried = True
            elif outcome is not _AGAIN:
                return outcome

    async def _lead(
        self,
        key: str,
        ctx: Context,
        mine: TaskFlight,
        replaces: TaskFlight | None,
        *,
        lead: AsyncLead,
        run: RunAsync,
        args: Args,
    ) -> object:
        try:
            begun = await lead(key, ctx, mine)
            value, via = begun if isinstance(begun, tuple) else await run(args, begun)
        except BaseException as exc:
            task = asyncio.current_task()
            cancelled = isinstance(exc, asyncio.CancelledError) and (
                task is not None and task.cancelling() > 0
            )
            ended = _ended_by(exc, caller_cancelled=cancelled)
            mine.finish(ended, error=exc, registry=self._flights, key=key)
            raise
        _share(mine, replaces, value, via, self._flights, key)
        return value

    def forget(self, key: str, flight: TaskFlight | None = None) -> None:
        """See `SyncFlights.forget`."""
        _forget(self._flights, key, flight)

    def forget_all(self) -> None:
        """See `SyncFlights.forget_all`."""
        self._flights.clear()

    def clear(self) -> None:
        """Forget every flight (in a forked child, their leaders do not exist)."""
        self._flights = {}


def _taking_over(gave_up: GaveUp) -> Lead:
    """Return how a joiner that gave up on its flight leads the one replacing it."""

    def lead(key: str, ctx: Context, flight: Flight | None) -> Plan:
        return take_over(key, ctx, cast("Flight", flight), gave_up)  # its own flight

    return lead


def _async(lead: Lead) -> AsyncLead:
    """Return *lead* for `AsyncFlights` (a sync lead: it starts with a plan)."""

    async def begin(key: str, ctx: Context, flight: Flight | None) -> Served | Plan:
        return lead(key, ctx, flight)

    return begin


def _replace(
    registry: dict[str, Any], key: str, old: FlightState, new: FlightState
) -> bool:
    """Put *new* in *old*'s place, unless another caller replaced or ended it first."""
    if registry.get(key) is not old:
        return False
    registry[key] = new
    return True


def _forget(registry: dict[str, Any], key: str, flight: FlightState | None) -> None:
    if flight is None or registry.get(key) is flight:
        registry.pop(key, None)


def _ended_by(exc: BaseException, *, caller_cancelled: bool) -> Outcome:
    """How a flight whose leader raised *exc* ends for its joiners."""
    if isinstance(exc, Exception):
        return Outcome.ERROR  # the function's own failure: shared, as a value is
    if caller_cancelled:
        # The leader's caller was cancelled; a computation it started goes on apart
        # and holds the lock, so joiners starting afresh wait for it, not compute.
        return Outcome.AGAIN
    return Outcome.INTERRUPTED  # KeyboardInterrupt, SystemExit...: run once more


def _share(  # noqa: PLR0917
    mine: ThreadFlight | TaskFlight,
    replaces: ThreadFlight | TaskFlight | None,
    value: object,
    via: Via,
    registry: dict[str, Any],
    key: str,
) -> None:
    """End a led flight: its value to its joiners (and the flight's it replaced)."""
    if via is Via.PRIVATE:  # refused by the store: not for anyone else
        mine.finish(Outcome.AGAIN, registry=registry, key=key)
        return
    mine.finish(Outcome.VALUE, value, via, registry=registry, key=key)
    if replaces is not None:  # joiners still waiting on the hung flight take it too
        replaces.finish(Outcome.VALUE, value, via)


def _joined(  # noqa: PLR0917
    key: str,
    flight: ThreadFlight | TaskFlight,
    joined: Served | None,
    waited: float,
    ctx: Context,
    registry: dict[str, Any],
    retried: bool,  # noqa: FBT001
) -> Any:
    """Return (or raise) what a caller gets whose wait on *flight* has ended.

    *joined* is the value a look at the backend found (it then ends the flight for
    every joiner, and takes it out of *registry*: later callers no longer join it), or
    None when the flight ended
    by itself. `_AGAIN` asks the caller to start afresh; `_AGAIN_INTERRUPTED` too, after
    a BaseException, which a caller lets happen once (*retried* says it did).
    """
    if joined is not None:
        value, via = joined
        flight.finish(Outcome.VALUE, value, via, registry=registry, key=key)
        return value
    outcome = flight.outcome
    if outcome is Outcome.AGAIN:
        return _AGAIN
    if outcome is Outcome.INTERRUPTED:
        if not retried:
            return _AGAIN_INTERRUPTED  # one more run, led by one of the joiners
        assert flight.error is not None  # noqa: S101 - set with the outcome
        raise InterruptedComputationError(key, flight.error) from flight.error
    if flight.via is Via.CACHE:
        if ctx.observed:
            ctx.emit(Hit(key))  # it would have found the value itself
        return flight.value
    if ctx.observed:
        ctx.emit(Miss(key))
        ctx.emit(LockWait(key, waited, "value" if flight.error is None else "error"))
    if flight.error is not None:
        raise flight.error
    return flight.value


class Refreshing:
    """The keys a process is refreshing, so that it starts one refresh per key at a time."""

    # Keys resting after a failed refresh are few; past this many, the ones whose
    # rest is over are dropped.
    _RESTING_KEPT = 1024

    def __init__(self) -> None:
        self._keys: set[str] = set()
        self._resting: dict[str, float] = {}  # key: no refresh before this time
        self._mutex = threading.Lock()
        _registries.add(self)

    def claim(self, key: str, now: float) -> bool:
        """Mark *key* as being refreshed here; False if it is, or rests until after *now*."""
        with self._mutex:
            if key in self._keys:
                return False
            until = self._resting.get(key)
            if until is not None:
                if now < until:
                    return False
                del self._resting[key]
            self._keys.add(key)
            return True

    def rest(self, key: str, now: float, seconds: float) -> None:
        """Refresh *key* no more for *seconds* after *now* (``refresh_backoff``)."""
        with self._mutex:
            if len(self._resting) >= self._RESTING_KEPT:
                self._resting = {k: t for k, t in self._resting.items() if t > now}
            self._resting[key] = now + seconds

    def release(self, key: str) -> None:
        """Unmark *key*."""
        with self._mutex:
            self._keys.discard(key)

    def clear(self) -> None:
        """Forget every key (in a forked child, its refreshers do not exist)."""
        self._keys = set()
        self._resting = {}


_registries: weakref.WeakSet[SyncFlights | AsyncFlights | Refreshing] = (
    weakref.WeakSet()
)


def _forget_flights_in_child() -> None:
    for registry in list(_registries):
        registry.clear()


os.register_at_fork(after_in_child=_forget_flights_in_child)
