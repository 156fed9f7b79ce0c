"""How many callers are waiting, in this process, on a call of a decorated function.

A concurrency test often needs "every caller has joined the call in progress" before
it lets the computation finish: only then does it prove that they all share it.
Sleeping for a while proves nothing on a loaded machine, and looking for the
library's frames in the threads' stacks ties the test to its internals.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["joiners", "wait_for_joiners"]


def joiners(fn: Any, *args: Any, **kwargs: Any) -> int:
    """Return how many callers joined the call in progress of *fn* for these arguments.

    *fn* is a function decorated with ``cached_stampede_safe``; the arguments name the
    key as a call would. The caller leading the call is not counted, nor callers in
    other processes (they wait on the backend's lock, not on this call). 0 if no call
    of the key is in progress here.
    """
    cached = getattr(fn, "_cached", fn)  # a decorated method, looked up on an instance
    flights = getattr(getattr(cached, "_flights", None), "_flights", None)
    if flights is None:
        msg = f"{fn!r} is not a function decorated with cached_stampede_safe"
        raise TypeError(msg)
    flight = flights.get(fn.cache_key(*args, **kwargs))
    return 0 if flight is None else int(flight.joiners)


def wait_for_joiners(
    fn: Any, count: int, *args: Any, timeout: float = 10.0, **kwargs: Any
) -> None:
    """Wait until *count* callers joined *fn*'s call for these arguments (see `joiners`).

    Raises:
        TimeoutError: They had not after *timeout* seconds.
    """
    deadline = time.monotonic() + timeout
    while (seen := joiners(fn, *args, **kwargs)) < count:
        if time.monotonic() >= deadline:
            msg = f"{seen} of {count} callers joined the call in {timeout} s"
            raise TimeoutError(msg)
        time.sleep(0.001)
