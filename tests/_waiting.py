"""A metrics hook that tells a test when callers have started waiting.

A call that finds no value emits `Miss` once its get-or-lock has answered: a leader
then holds the lock; a waiter has found it held and is about to subscribe and wait (it
looks again after subscribing, so nothing stored after its Miss is lost). Tests go on
once the callers have missed, instead of sleeping and hoping they got that far;
`waited` then proves that the callers really waited.

`until` and `until_async` poll any other observable (a counter, a key in Redis, the
joiners of a call) with a deadline, for the waits no event reports.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

from stampede_guard.metrics import Event, LockAcquired, LockWait, Miss

__all__ = ["Waiting", "until", "until_async"]

TIMEOUT_S = 10.0
POLL_S = 0.005  # between two looks at an observable no event reports


def until(what: str, check: Callable[[], object], within: float = TIMEOUT_S) -> None:
    """Look at *check* until it is true; fail naming *what* after *within* seconds."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            msg = f"{what} did not happen within {within} s"
            raise AssertionError(msg)
        time.sleep(POLL_S)


async def until_async(
    what: str, check: Callable[[], object], within: float = TIMEOUT_S
) -> None:
    """`until` on an event loop: look between its other tasks' steps."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            msg = f"{what} did not happen within {within} s"
            raise AssertionError(msg)
        await asyncio.sleep(POLL_S)


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
        # The hook runs on this loop: look between its steps.
        await until_async(f"{n} callers reaching their wait", lambda: self.misses >= n)

    def waited(self, outcome: str) -> int:
        """Return how many calls ended a lock wait with *outcome* (value, lock, ...)."""
        with self._changed:
            return sum(w.outcome == outcome for w in self.waits)
