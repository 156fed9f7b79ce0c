"""How long a waiter waits between looks, and when it stops: tenacity, on the plan's clock.

tenacity decides every wait, but its own pieces read the global clock and the global
`random`; these read the plan's (`Context.clock`, `Context.random`), so a test that
steps a plan on a fake clock gets the same delays every time.
"""

from __future__ import annotations

from collections.abc import Callable

import tenacity
from typing_extensions import override

from stampede_guard._context import Policy

__all__ = ["Deadline", "StillLockedError", "backoff"]


class StillLockedError(Exception):
    """Still waiting; tenacity retries on it and re-raises the last one at the end.

    *ticket* is the backend's ticket of the last look, for a store after giving up.
    """

    def __init__(self, ticket: int | None) -> None:
        super().__init__()
        self.ticket = ticket


class Deadline(tenacity.stop.stop_base):
    """Stop once *clock* passes a deadline that can move (tenacity's reads time.monotonic)."""

    def __init__(self, clock: Callable[[], float], deadline: float) -> None:
        self._clock = clock
        self._deadline = deadline

    def remaining(self) -> float:
        """Return the seconds left, 0 once past the deadline."""
        return max(0.0, self._deadline - self._clock())

    def restart(self, seconds: float) -> None:
        """Move the deadline to *seconds* from now."""
        self._deadline = self._clock() + seconds

    @override
    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        del retry_state
        return self._clock() >= self._deadline


class _ExponentialJitter(tenacity.wait.wait_base):
    """``wait_exponential_jitter``, with its jitter drawn from *random* (in [0, 1))."""

    def __init__(self, base: float, cap: float, random: Callable[[], float]) -> None:
        self._base = base
        self._cap = cap
        self._random = random

    @override
    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        try:
            delay = self._base * 2.0 ** (retry_state.attempt_number - 1)
        except OverflowError:  # pragma: no cover - after about a thousand rounds
            delay = self._cap
        return max(0.0, min(delay + self._random() * self._base, self._cap))


def backoff(
    policy: Policy,
    deadline: Deadline,
    delays: list[float],
    random: Callable[[], float],
) -> tenacity.Retrying:
    """The waiting rounds: tenacity decides each delay (recorded in *delays*) and the end.

    tenacity's sleep only records the delay, which becomes the longest the next wait
    may take; its stop is the moving *deadline*, and ``max_retries`` if set. Each
    delay doubles from ``base_delay`` up to ``max_delay``, plus up to ``base_delay`` of
    jitter drawn from *random*, so that waiters woken together do not look together.
    """
    stop: tenacity.stop.stop_base = deadline
    if policy.max_retries is not None:
        stop = stop | tenacity.stop_after_attempt(policy.max_retries + 1)
    return tenacity.Retrying(
        sleep=delays.append,
        wait=_ExponentialJitter(policy.base_delay, policy.max_delay, random),
        stop=stop,
        retry=tenacity.retry_if_exception_type(StillLockedError),
        reraise=True,
    )
