"""A metrics hook that tells a test when callers have started waiting.

A call that finds no value emits `Miss` once its get-or-lock has answered: a leader
then holds the lock; a waiter has found it held and is about to subscribe and wait (it
looks again after subscribing, so nothing stored after its Miss is lost). Tests go on
once the callers have missed, instead of sleeping and hoping they got that far;
`waited` then proves that the callers really waited.
"""

from __future__ import annotations

import asyncio
import threading
import time

from stampede_guard.metrics import Event, LockAcquired, LockWait, Miss

__all__ = ["Waiting"]

TIMEOUT_S = 10.0


class Waiting:
    """Counts the misses and lock waits of the calls it is the metrics hook of."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self.misses = 0
        self.acquired = 0  # locks taken
        self.waits: list[LockWait] = []

    def __call__(self, event: Event, /) -> None:
        with self._changed:
            if isinstance(event, Miss):
                self.misses += 1
            elif isinstance(event, LockAcquired):
                self.acquired += 1
            elif isinstance(event, LockWait):
                self.waits.append(event)
            self._changed.notify_all()

    def until_missed(self, n: int = 1) -> None:
        """Block until *n* calls have missed."""
        with self._changed:
            if not self._changed.wait_for(lambda: self.misses >= n, TIMEOUT_S):
                msg = f"{self.misses} of {n} callers reached their wait"
                raise AssertionError(msg)

    async def until_missed_async(self, n: int = 1) -> None:
        """`until_missed` for a test on the event loop the callers run on."""
        deadline = time.monotonic() + TIMEOUT_S
        while self.misses < n:  # the hook runs on this loop: look between its steps
            if time.monotonic() > deadline:
                msg = f"{self.misses} of {n} callers reached their wait"
                raise AssertionError(msg)
            await asyncio.sleep(0.005)

    def waited(self, outcome: str) -> int:
        """Return how many calls ended a lock wait with *outcome* (value, lock, ...)."""
        with self._changed:
            return sum(w.outcome == outcome for w in self.waits)
