"""A flight: one call in progress in this process, which callers of its key join.

The state every flight has (`FlightState`: its outcome, and what its joiners need to
know while it runs), and how each kind is waited on: `ThreadFlight` by threads (a
lock released once it ends), `TaskFlight` by the tasks of one event loop (a future).
`_coalesce` decides who leads, joins and takes over; this module only keeps the state.
"""

from __future__ import annotations

import _thread
import asyncio
import enum
from typing import Any

from stampede_guard._context import Via

__all__ = ["FlightState", "Outcome", "TaskFlight", "ThreadFlight"]


class Outcome(enum.Enum):
    """How a flight ended, which its joiners share."""

    VALUE = "value"  # value and via are set
    ERROR = "error"  # the function raised an Exception: joiners raise it too
    INTERRUPTED = "interrupted"  # a BaseException ended it: run again, once
    AGAIN = "again"  # start afresh: the leader's caller left, or its value was refused


class FlightState:
    """What a flight of either kind holds: how far its leader got, then its outcome."""

    __slots__ = (
        "computing",
        "error",
        "holder",
        "joiners",
        "looked",
        "outcome",
        "value",
        "via",
        "watched",
    )

    def __init__(self) -> None:
        self.looked = 0.0  # no look yet
        self.watched = False
        self.computing: float | None = None
        self.holder: str | None = None
        self.outcome: Outcome | None = None
        self.value: object = None
        self.via = Via.COMPUTED
        self.error: BaseException | None = None
        self.joiners = 0  # callers that joined it: for tests that wait for them

    def _settle(  # noqa: PLR0917
        self,
        outcome: Outcome,
        value: object,
        via: Via,
        error: BaseException | None,
        registry: dict[str, Any] | None,
        key: str,
    ) -> bool:
        """Record the outcome unless there is one; return whether this did (see finish).

        With *registry*, first take the flight out of it (if it is still there under
        *key*): later callers then start afresh, and find the value stored, instead
        of joining.
        """
        if registry is not None and registry.get(key) is self:
            del registry[key]
        if self.outcome is not None:
            return False
        self.value, self.via, self.error = value, via, error
        self.outcome = outcome
        return True


class ThreadFlight(FlightState):
    """One call in progress, for threads."""

    __slots__ = ("_done", "_guard")

    def __init__(self, guard: _thread.LockType) -> None:
        super().__init__()
        self._done = _thread.allocate_lock()
        self._done.acquire()  # released once the flight has its outcome
        # Its registry's mutex, held for a moment by whoever ends it: a flight is
        # made on every remote hit, so it allocates no lock of its own for this.
        self._guard = guard

    def joined(self) -> None:
        """Count a caller that joined (under the registry's mutex: threads race)."""
        with self._guard:
            self.joiners += 1

    def finish(
        self,
        outcome: Outcome,
        value: object = None,
        via: Via = Via.COMPUTED,
        *,
        error: BaseException | None = None,
        registry: dict[str, Any] | None = None,
        key: str = "",
    ) -> bool:
        """Give the flight its outcome, unless it has one; return whether this did.

        With *registry*, also take the flight out of it before its joiners are
        released (see `FlightState._settle`); one mutex section for both: this runs on
        every remote hit.
        """
        with self._guard:
            if not self._settle(outcome, value, via, error, registry, key):
                return False
        self._done.release()
        return True

    def wait(self, seconds: float) -> bool:
        """Wait up to *seconds* for the outcome; return whether there is one."""
        if self.outcome is None:
            done = self._done
            if not (
                done.acquire(timeout=seconds)
                if seconds > 0
                else done.acquire(blocking=False)
            ):
                return False
            done.release()  # let the next joiner through
        return True


class TaskFlight(FlightState):
    """One call in progress, for one event loop's tasks."""

    __slots__ = ("loop", "waiting")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.loop = loop
        # One future per waiting joiner: cancelling a joiner cancels its own only.
        self.waiting: set[asyncio.Future[None]] = set()

    def joined(self) -> None:
        """Count a caller that joined (one loop's tasks: no race)."""
        self.joiners += 1

    def finish(
        self,
        outcome: Outcome,
        value: object = None,
        via: Via = Via.COMPUTED,
        *,
        error: BaseException | None = None,
        registry: dict[str, Any] | None = None,
        key: str = "",
    ) -> bool:
        """See `ThreadFlight.finish` (one event loop: no mutex)."""
        if not self._settle(outcome, value, via, error, registry, key):
            return False
        for joined in self.waiting:
            if not joined.done():
                joined.set_result(None)
        return True

    async def wait(self, seconds: float) -> bool:
        """Wait up to *seconds* for the outcome; return whether there is one."""
        if self.outcome is None:
            # A bare future and a timer: asyncio.wait() would cost each of a thousand
            # joiners three times as much when they all wake.
            joined = self.loop.create_future()
            self.waiting.add(joined)
            timer = self.loop.call_later(seconds, _expire, joined)
            try:
                await joined
            finally:
                timer.cancel()
                self.waiting.discard(joined)
        return self.outcome is not None


def _expire(joined: asyncio.Future[None]) -> None:
    if not joined.done():  # a cancelled joiner's future is done
        joined.set_result(None)
