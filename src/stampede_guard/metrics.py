"""Metrics: the events a cached call emits, the hook Protocol, and StampedeStats.

Every call emits exactly one of `Hit` or `Miss` first, so ``requests = hits + misses``
at the first lookup; only an `UnreadableEntry` met at that lookup comes before its
`Miss`. A miss then either takes the lock (`LockAcquired`, `Computed` or
`ComputeError`, then `FailureCached` if ``cache_errors`` keeps the failure) or waits
for another caller (`LockWait`, then possibly `Timeout`). A call raised a stored
failure emits `FailureServed` after its `Hit` (or its `LockWait`).
Hooks receive one frozen event object; new fields can be added without breaking them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol, TypeAlias, TypeVar

__all__ = [
    "BackendFailed",
    "BackendSkipped",
    "ComputeError",
    "Computed",
    "Event",
    "FailureCached",
    "FailureServed",
    "Hit",
    "LockAcquired",
    "LockWait",
    "MetricsHook",
    "Miss",
    "NearEvent",
    "NearEviction",
    "NearFlush",
    "NearInvalidation",
    "NearMetricsHook",
    "Refresh",
    "RefreshFailed",
    "StaleServed",
    "StampedeStats",
    "StatsSnapshot",
    "Timeout",
    "UnreadableEntry",
]

logger = logging.getLogger("stampede_guard")


@dataclass(frozen=True, slots=True)
class Hit:
    """The first lookup found a cached value.

    *near*: it was found in this process's near cache (see `NearCache`), with no
    round trip; False for a value read from the backend itself.
    """

    key: str
    near: bool = False


@dataclass(frozen=True, slots=True)
class Miss:
    """The first lookup found no value; the call will compute or wait."""

    key: str


@dataclass(frozen=True, slots=True)
class LockAcquired:
    """This call took the lock and will compute the value."""

    key: str


@dataclass(frozen=True, slots=True)
class LockWait:
    """This call waited *seconds* for another caller's computation.

    *outcome* says how the wait ended: the value appeared (``"value"``), the lock was
    free and this call took it (``"lock"``), the wait timed out (``"timeout"``), or the
    call it waited on in this process failed and its error was shared (``"error"``).
    """

    key: str
    seconds: float
    outcome: Literal["value", "lock", "timeout", "error"]


@dataclass(frozen=True, slots=True)
class Timeout:
    """A waiter gave up after *seconds*; *action* is the ``on_timeout`` it then took."""

    key: str
    seconds: float
    action: Literal["compute", "raise"]


@dataclass(frozen=True, slots=True)
class Computed:
    """The decorated function ran for *seconds* and returned a value."""

    key: str
    seconds: float


@dataclass(frozen=True, slots=True)
class ComputeError:
    """The decorated function ran for *seconds* and raised *error* (not cached)."""

    key: str
    seconds: float
    error: BaseException


@dataclass(frozen=True, slots=True)
class FailureCached:
    """The function's failure was stored in place of its value, for *seconds*.

    Emitted by the call that computed on a miss, after its `ComputeError`, when
    ``cache_errors`` names the exception's class and the store succeeded. *error* is
    the exception's type as stored (``"builtins.TimeoutError"``, never its message);
    *seconds* the period it is served for.
    """

    key: str
    error: str
    seconds: float


@dataclass(frozen=True, slots=True)
class FailureServed:
    """A failure stored by ``cache_errors`` was raised to this call, which did not compute.

    *error* is the exception's type as stored (``"builtins.TimeoutError"``). The call
    also emitted what any call served from the cache emits: a `Hit`, or a `LockWait`
    with the outcome ``"value"`` (the backend answered, and the function was not
    called), so it counts among the hits and in the call reduction. Subtract these
    from the hits for the calls that got a value: ``hits - failures_served``.
    """

    key: str
    error: str


@dataclass(frozen=True, slots=True)
class StaleServed:
    """A value *seconds* past its ``ttl`` (within ``stale_ttl``) was served."""

    key: str
    seconds: float


@dataclass(frozen=True, slots=True)
class Refresh:
    """This call took the lock to refresh a stored value.

    *reason*: it was stale (``"stale"``), XFetch chose to refresh it before it expired
    (``"early"``), or ``refresh()`` was called (``"manual"``).
    """

    key: str
    reason: Literal["stale", "early", "manual"]


@dataclass(frozen=True, slots=True)
class RefreshFailed:
    """A refresh raised *error*; the stored value was kept (``stale_if_error``)."""

    key: str
    error: BaseException


@dataclass(frozen=True, slots=True)
class BackendFailed:
    """The backend raised *error*; the call went on without the cache (it computed).

    Only with ``on_backend_error="compute"``; with ``"raise"`` the caller gets the
    `BackendError` instead.
    """

    key: str
    error: BaseException


@dataclass(frozen=True, slots=True)
class BackendSkipped:
    """The circuit breaker is open: the call computed without trying the backend."""

    key: str


@dataclass(frozen=True, slots=True)
class UnreadableEntry:
    """The stored entry could not be read: it counts as a miss, and is replaced.

    Corrupt or foreign bytes, a payload the serializer chokes on (JSON nested too
    deep, a pickle of a class that is gone), a signature that does not match (a forged
    or moved entry, an unknown secret, an older signing format), or times that make no
    sense. *reason* names the exception type (``"RecursionError"``,
    ``"BadSignatureError"``, ``"ValueError"`` for an envelope that is not one); never
    the bytes. Reported by the backends that store bytes (Redis), once per call that
    meets the entry: by the look that follows the first lookup's miss (the first
    lookup, the hot path, does not report), or by a refresh's look.
    """

    key: str
    reason: str


@dataclass(frozen=True, slots=True)
class NearEviction:
    """The near cache dropped *key*'s entry to make room (its least recently used)."""

    key: str


@dataclass(frozen=True, slots=True)
class NearInvalidation:
    """Another process (or this one) changed *key*: the near cache dropped its copy.

    Reported for every change announced on the invalidation channel, whether or not
    this process held the key.
    """

    key: str


@dataclass(frozen=True, slots=True)
class NearFlush:
    """The near cache dropped all *entries* it held, and serves none until it may again.

    *reason*: the invalidation channel was lost or found silent (``"lost"``), the
    listener stopped (``"stopped"``: the backend closed, or its event loop ended), or
    the process is a forked child (``"fork"``: nothing of the parent's is trusted).
    """

    reason: Literal["lost", "stopped", "fork"]
    entries: int


Event: TypeAlias = (
    Hit
    | Miss
    | LockAcquired
    | LockWait
    | Timeout
    | Computed
    | ComputeError
    | FailureCached
    | FailureServed
    | StaleServed
    | Refresh
    | RefreshFailed
    | BackendFailed
    | BackendSkipped
    | UnreadableEntry
)
"""An event of a cached call: every one is about one *key*."""

NearEvent: TypeAlias = NearEviction | NearInvalidation | NearFlush
"""An event of a backend's near cache (see `NearCache`), sent to its own hook."""


class MetricsHook(Protocol):
    """Receives every event; must be fast and thread-safe.

    A hook that raises is logged on the ``stampede_guard`` logger and never changes
    the result of the cached call.
    """

    def __call__(self, event: Event, /) -> None:
        """Record *event*."""


class NearMetricsHook(Protocol):
    """Receives a near cache's events (`NearCache(metrics=...)`); fast and thread-safe.

    `StampedeStats` and the contrib exporters are both kinds of hook: one object may
    be given to the decorator and to the near cache.
    """

    def __call__(self, event: NearEvent, /) -> None:
        """Record *event*."""


@dataclass(frozen=True, slots=True)
class StatsSnapshot:
    """Counters at one moment, with the usual stampede figures derived from them.

    *hits* counts calls served from the cache, whether at once or after waiting for
    another caller's computation ("cache hits" in the hit rate); *computations* counts
    calls of the decorated function, failed ones included ("API calls" in the API call
    reduction). A call raised a failure stored by ``cache_errors`` is a hit too (the
    function was not called): *failures_served* counts those, so
    ``hits - failures_served`` calls got a value from the cache.
    """

    requests: int
    hits: int
    misses: int
    computations: int
    lock_waits: int
    total_wait_seconds: float
    timeouts: int
    errors: int
    stale_served: int = 0
    refreshes: int = 0
    early_refreshes: int = 0
    refresh_failures: int = 0
    backend_errors: int = 0
    backend_skipped: int = 0
    unreadable_entries: int = 0
    failures_cached: int = 0
    failures_served: int = 0
    near_hits: int = 0
    near_evictions: int = 0
    near_invalidations: int = 0
    near_flushes: int = 0

    @property
    def average_wait_seconds(self) -> float:
        """Mean time a waiting call waited (0 when nobody waited)."""
        return self.total_wait_seconds / self.lock_waits if self.lock_waits else 0.0

    @property
    def api_call_reduction_pct(self) -> float:
        """``(requests - computations) / requests * 100``."""
        return _pct(self.requests - self.computations, self.requests)

    @property
    def hit_rate_pct(self) -> float:
        """``hits / requests * 100``: served failures included (see `FailureServed`)."""
        return _pct(self.hits, self.requests)

    @property
    def timeout_rate_pct(self) -> float:
        """``timeouts / requests * 100``."""
        return _pct(self.timeouts, self.requests)


def _pct(part: int, whole: int) -> float:
    return part / whole * 100.0 if whole else 0.0


class StampedeStats:
    """A thread-safe `MetricsHook` that counts events; read it with `snapshot`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._zero()

    def _zero(self) -> None:
        self._fast_hits = 0
        self._served_after_wait = 0
        self._misses = 0
        self._computations = 0
        self._lock_waits = 0
        self._total_wait = 0.0
        self._timeouts = 0
        self._errors = 0
        self._stale_served = 0
        self._refreshes = 0
        self._early_refreshes = 0
        self._refresh_failures = 0
        self._backend_errors = 0
        self._backend_skipped = 0
        self._unreadable_entries = 0
        self._failures_cached = 0
        self._failures_served = 0
        self._near_hits = 0
        self._near_evictions = 0
        self._near_invalidations = 0
        self._near_flushes = 0

    def __call__(self, event: Event | NearEvent, /) -> None:  # noqa: C901 - a case per event
        """Count *event*."""
        with self._lock:
            match event:
                case Hit(near=near):
                    self._fast_hits += 1
                    self._near_hits += near
                case Miss():
                    self._misses += 1
                case LockWait(seconds=seconds, outcome=outcome):
                    self._lock_waits += 1
                    self._total_wait += seconds
                    self._served_after_wait += outcome == "value"
                case Timeout():
                    self._timeouts += 1
                case Computed():
                    self._computations += 1
                case ComputeError():
                    self._computations += 1
                    self._errors += 1
                case StaleServed():
                    self._stale_served += 1
                case Refresh(reason=reason):
                    self._refreshes += 1
                    self._early_refreshes += reason == "early"
                case RefreshFailed():
                    self._refresh_failures += 1
                case BackendFailed():
                    self._backend_errors += 1
                case BackendSkipped():
                    self._backend_skipped += 1
                case UnreadableEntry():
                    self._unreadable_entries += 1
                case FailureCached():
                    self._failures_cached += 1
                case FailureServed():
                    self._failures_served += 1
                case NearEviction():
                    self._near_evictions += 1
                case NearInvalidation():
                    self._near_invalidations += 1
                case NearFlush():
                    self._near_flushes += 1
                case LockAcquired():
                    pass

    def snapshot(self) -> StatsSnapshot:
        """Return the counters as they are now."""
        with self._lock:
            return StatsSnapshot(
                requests=self._fast_hits + self._misses,
                hits=self._fast_hits + self._served_after_wait,
                misses=self._misses,
                computations=self._computations,
                lock_waits=self._lock_waits,
                total_wait_seconds=self._total_wait,
                timeouts=self._timeouts,
                errors=self._errors,
                stale_served=self._stale_served,
                refreshes=self._refreshes,
                early_refreshes=self._early_refreshes,
                refresh_failures=self._refresh_failures,
                backend_errors=self._backend_errors,
                backend_skipped=self._backend_skipped,
                unreadable_entries=self._unreadable_entries,
                failures_cached=self._failures_cached,
                failures_served=self._failures_served,
                near_hits=self._near_hits,
                near_evictions=self._near_evictions,
                near_invalidations=self._near_invalidations,
                near_flushes=self._near_flushes,
            )

    def reset(self) -> None:
        """Set every counter back to zero."""
        with self._lock:
            self._zero()


E = TypeVar("E", bound="Event | NearEvent")


def safe_emitter(hook: Callable[[E], None] | None) -> Callable[[E], None]:
    """Wrap *hook* so that its failures are logged, never raised."""
    if hook is None:
        return _discard

    def emit(event: E) -> None:
        try:
            hook(event)
        except Exception:
            logger.exception(
                "metrics hook %r failed on %s; ignored", hook, type(event).__name__
            )

    return emit


class _Emit(Protocol):  # noqa: PYI046 - the type of Context.emit
    def __call__(self, event: Event, /) -> None: ...


def _discard(event: object, /) -> None:
    del event
