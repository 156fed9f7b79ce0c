"""The clock that stamps entries and judges their freshness, immune to clock steps.

An entry's ``created_at`` is compared with "now" to decide whether it is stale or due
for an early refresh, often in another process or on another host. Read from the
host's wall clock, a step (NTP correcting a drifted clock, a VM restored, an operator)
breaks that: stepped back an hour, every stored entry looks an hour younger, so none
is refreshed and stale-while-revalidate turns into ordinary misses when Redis
expires the entry; stepped forward, everything looks stale at once.

`StepFreeClock` reads Unix time as the wall clock at its start plus the time elapsed
since on a clock that never steps (``CLOCK_BOOTTIME`` where there is one, which also
counts a suspended machine's sleep; else the monotonic clock). A Redis backend then
sets it to the server's clock, which every script reply carries (its ticket, from
``TIME``): every process and host sharing the server stamps and judges entries by
one clock, the one Redis expires them by, whatever their own clocks say.
"""

from __future__ import annotations

import time

__all__ = ["StepFreeClock"]

# A learned offset lower than the current one by up to this much is taken for a late
# reply (the server read its clock before we got to the reply), not a server step.
_LATE_REPLY = 1.0

if hasattr(time, "CLOCK_BOOTTIME"):  # Linux

    def _elapsed() -> float:
        return time.clock_gettime(time.CLOCK_BOOTTIME)

else:  # pragma: no cover - not Linux
    _elapsed = time.monotonic


class StepFreeClock:
    """Unix time in seconds that never steps with the host's clock (see the module)."""

    __slots__ = ("_learned", "_offset")

    def __init__(self) -> None:
        self._offset = time.time() - _elapsed()
        self._learned = False

    def __call__(self) -> float:
        """Return the time now, in Unix seconds."""
        return _elapsed() + self._offset

    def learn(self, server_microseconds: int) -> None:
        """Follow the server's clock, read (as *server_microseconds*) by a reply.

        The reply reaches us some time after the server read its clock, so the
        largest offset seen is the best; a lower one is taken only when it is lower
        by more than a late reply explains: the server's clock was stepped back.
        """
        offset = server_microseconds / 1e6 - _elapsed()
        if (
            offset > self._offset
            or self._offset - offset > _LATE_REPLY
            or not self._learned  # the first: the host's clock may be off
        ):
            self._offset = offset
            self._learned = True
