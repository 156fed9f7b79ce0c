"""A circuit breaker: stop paying a backend's timeout on every call while it is down."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

__all__ = ["CircuitBreaker"]


class CircuitBreaker:
    """Open after *failures* backend failures in a row; probe again after *reset_after* s.

    While open, calls skip the backend and compute (coalesced in-process, so one call
    per key per process). After the pause one call probes the backend: success closes
    the circuit, failure opens it for another pause.
    """

    def __init__(
        self,
        failures: int = 5,
        reset_after: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._threshold = failures
        self._reset_after = reset_after
        self._clock = clock
        self._mutex = threading.Lock()
        self.failures = 0  # in a row; read without the mutex on the hot path
        self._open_until: float | None = None
        self._probing = False

    def allow(self) -> bool:
        """Whether this call may use the backend (at most one probe while half-open)."""
        return self._open_until is None or self._allow_while_open()

    def _allow_while_open(self) -> bool:
        with self._mutex:
            if self._open_until is None:  # closed meanwhile
                return True
            if self._probing or self._clock() < self._open_until:
                return False
            self._probing = True
            return True

    def succeeded(self) -> None:
        """Record a call that reached the backend without error."""
        if self.failures or self._open_until is not None:
            with self._mutex:
                self.failures = 0
                self._open_until = None
                self._probing = False

    def failed(self) -> None:
        """Record a backend failure."""
        with self._mutex:
            self.failures += 1
            if self._probing or self.failures >= self._threshold:
                self._open_until = self._clock() + self._reset_after
            self._probing = False

    @property
    def open(self) -> bool:
        """Whether calls are skipping the backend now."""
        return self._open_until is not None
