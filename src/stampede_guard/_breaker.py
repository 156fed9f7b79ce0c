"""A circuit breaker: stop paying a backend's timeout on every call while it is down."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from stampede_guard._errors import BackendError

__all__ = ["CircuitBreaker"]

logger = logging.getLogger("stampede_guard")


class CircuitBreaker:
    """Open after *failures* backend failures in a row; probe again after *reset_after* s.

    While open, calls skip the backend and compute (coalesced in-process, so one call
    per key per process). After the pause one call probes the backend: success closes
    the circuit, failure opens it for another pause. A Redis backend shares one
    breaker per server among every function on it (see ``breaker_failures``).

    What counts: a failed command is a failure; a call that read a value, or wrote
    one, is a success. A read that found nothing is neither, so a server that reads
    but refuses writes (a replica's ``READONLY``, ``OOM`` under ``noeviction``) opens
    the circuit too, instead of every call paying a refused write. Such refusals are
    logged once per episode, with the server's reason; other failures are logged by
    the call, and the circuit's opening once.
    """

    def __init__(
        self,
        failures: int = 5,
        reset_after: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        *,
        server: str = "the backend",
        logger: logging.Logger = logger,
    ) -> None:
        self._threshold = failures
        self._reset_after = reset_after
        self._clock = clock
        self._server = server
        self._logger = logger
        self._mutex = threading.Lock()
        self.failures = 0  # in a row; read without the mutex on the hot path
        self._open_until: float | None = None
        self._probing = False
        self.refusing: str | None = None  # the reason writes are refused, if they are

    def allow(self) -> bool:
        """Whether this call may use the backend (at most one probe while half-open)."""
        return self._open_until is None or self._allow_while_open()

    def _allow_while_open(self) -> bool:
        with self._mutex:
            if self._open_until is None:  # closed meanwhile
                return True
            now = self._clock()
            if now < self._open_until:
                return False
            # This call probes. Until it reports, the others keep skipping; if it
            # never does (cancelled, or it found nothing to tell), another call
            # probes after another pause, so the circuit cannot stay open for ever.
            self._open_until = now + self._reset_after
            self._probing = True
            return True

    def succeeded(self) -> None:
        """Record a call that read or wrote through the backend without error."""
        if self.failures or self._open_until is not None:
            with self._mutex:
                if self._open_until is not None:
                    self._logger.info("%s answers again: circuit closed", self._server)
                self.failures = 0
                self._open_until = None
                self._probing = False

    def stored(self) -> None:
        """Record a write the backend accepted: refusals, if any, are over."""
        self.succeeded()
        if self.refusing is not None:
            with self._mutex:
                if self.refusing is not None:
                    self._logger.warning("%s accepts writes again", self._server)
                    self.refusing = None

    def failed(self, error: BackendError | None = None) -> bool:
        """Record a backend failure; return whether the call should log it as news.

        A refused write is news once per episode (logged here, with the reason);
        the calls that meet it again log it at debug level.
        """
        with self._mutex:
            self.failures += 1
            if self._probing or self.failures >= self._threshold:
                if self._open_until is None:
                    self._logger.warning(
                        "%s failed %d times in a row: calls skip it for %g s, then "
                        "one call probes it (last failure: %s)",
                        self._server,
                        self.failures,
                        self._reset_after,
                        error,
                    )
                self._open_until = self._clock() + self._reset_after
            self._probing = False
            reason = None if error is None else error.refused
            if reason is None:
                return True
            if self.refusing is not None:
                return False
            self.refusing = reason
        self._logger.warning(
            "%s refuses writes (%s): values are computed but not cached until it "
            "accepts them",
            self._server,
            reason,
        )
        return False

    @property
    def open(self) -> bool:
        """Whether calls are skipping the backend now."""
        return self._open_until is not None
