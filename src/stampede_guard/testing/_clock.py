"""A clock that moves only when a test says so, for the in-memory backend."""

from __future__ import annotations

import threading

from stampede_guard.backends import MemoryBackend

__all__ = ["VirtualClock"]


class VirtualClock:
    """Time that stands still until `advance` moves it: expiry and freshness on demand.

    Pass it as ``MemoryBackend(clock=...)`` to drive expiry (ttl, lock leases), or take
    `memory_backend`, whose ``now()`` (what the decorator stamps entries with and
    judges them stale or due for an early refresh by) follows it too. Waits between a
    waiter's polls still take real time: the clock decides what is expired and what
    is fresh, not how long a caller sleeps.

    Args:
        start: The time to start at, in Unix seconds.
    """

    __slots__ = ("_mutex", "_now")

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._mutex = threading.Lock()

    def __call__(self) -> float:
        """Return the time now, in seconds."""
        return self._now

    def __repr__(self) -> str:
        return f"VirtualClock({self._now!r})"

    def advance(self, seconds: float) -> float:
        """Move the clock *seconds* forward and return the new time.

        Raises:
            ValueError: If *seconds* is negative: a monotonic clock never goes back.
        """
        if seconds < 0:
            msg = f"advance(seconds={seconds!r}): the clock only moves forward"
            raise ValueError(msg)
        with self._mutex:
            self._now += seconds
            return self._now

    def memory_backend(self) -> MemoryBackend:
        """Return a new `MemoryBackend` whose expiry and ``now()`` follow this clock."""
        return _VirtualMemoryBackend(self)


class _VirtualMemoryBackend(MemoryBackend):
    """A `MemoryBackend` that stamps entries and judges freshness by a `VirtualClock`."""

    def __init__(self, clock: VirtualClock) -> None:
        super().__init__(clock=clock)
        self._virtual = clock

    def now(self) -> float:
        """Return the virtual clock's time (see `MemoryBackend.now`)."""
        return self._virtual()
