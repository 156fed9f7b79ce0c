"""The instruments that the Prometheus and OpenTelemetry hooks share.

One table, so that both exporters count the same things under matching names: a
Prometheus ``stampede_guard_hits_total`` is an OpenTelemetry ``stampede_guard.hits``
(which an OpenTelemetry-to-Prometheus exporter also turns into
``stampede_guard_hits_total``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

__all__ = [
    "BACKEND_ERRORS",
    "BACKEND_SKIPPED",
    "COMPUTATIONS",
    "COMPUTE_SECONDS",
    "DEFAULT_BUCKETS",
    "FAILURES_CACHED",
    "FAILURES_SERVED",
    "HITS",
    "LOCKS_ACQUIRED",
    "LOCK_WAITS",
    "LOCK_WAIT_SECONDS",
    "MISSES",
    "NAME_LABEL",
    "NEAR_EVICTIONS",
    "NEAR_FLUSHES",
    "NEAR_HITS",
    "NEAR_INVALIDATIONS",
    "REFRESHES",
    "REFRESH_FAILURES",
    "STALE_SERVED",
    "TIMEOUTS",
    "UNREADABLE_ENTRIES",
    "Instrument",
    "check_buckets",
    "check_name",
]

# Seconds. Waits end by `wait_timeout` (10 s by default); computations may take longer.
DEFAULT_BUCKETS: Final = (
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)

NAME_LABEL: Final = "name"
"""The label (attribute) that carries the hook's *name*; never the cache key."""


@dataclass(frozen=True, slots=True)
class Instrument:
    """One counter or histogram: its names in both systems and its labels.

    *label* names the event field that labels it, and *values* are every value that
    field can take (each series is created at zero, before its first event).
    """

    prometheus: str
    opentelemetry: str
    description: str
    unit: str
    label: str | None = None
    values: tuple[str, ...] = ()


HITS: Final = Instrument(
    "hits", "hits", "Calls served from the cache at the first lookup.", "{call}"
)
MISSES: Final = Instrument(
    "misses",
    "misses",
    "Calls that found no value at the first lookup (they computed or waited).",
    "{call}",
)
LOCKS_ACQUIRED: Final = Instrument(
    "locks_acquired",
    "locks_acquired",
    "Calls that took a key's lock to compute its value.",
    "{lock}",
)
COMPUTATIONS: Final = Instrument(
    "computations",
    "computations",
    "Runs of the decorated function, by outcome (success or error).",
    "{call}",
    "outcome",
    ("success", "error"),
)
COMPUTE_SECONDS: Final = Instrument(
    "compute_seconds",
    "compute.duration",
    "Seconds the decorated function ran, failed runs included.",
    "s",
)
LOCK_WAITS: Final = Instrument(
    "lock_waits",
    "lock_waits",
    "Calls that waited for another caller's computation, by how the wait ended.",
    "{wait}",
    "outcome",
    ("value", "lock", "timeout", "error"),
)
LOCK_WAIT_SECONDS: Final = Instrument(
    "lock_wait_seconds",
    "lock_wait.duration",
    "Seconds a call waited for another caller's computation.",
    "s",
)
TIMEOUTS: Final = Instrument(
    "timeouts",
    "timeouts",
    "Waits that ran out, by the on_timeout action then taken.",
    "{wait}",
    "action",
    ("compute", "raise"),
)
STALE_SERVED: Final = Instrument(
    "stale_served",
    "stale_served",
    "Calls served a value past its ttl (within stale_ttl).",
    "{call}",
)
REFRESHES: Final = Instrument(
    "refreshes",
    "refreshes",
    "Refreshes of a stored value, by reason (stale, early or manual).",
    "{refresh}",
    "reason",
    ("stale", "early", "manual"),
)
REFRESH_FAILURES: Final = Instrument(
    "refresh_failures",
    "refresh_failures",
    "Refreshes that raised; the stored value was kept.",
    "{refresh}",
)
BACKEND_ERRORS: Final = Instrument(
    "backend_errors",
    "backend_errors",
    "Backend failures after which the call computed without the cache.",
    "{error}",
)
BACKEND_SKIPPED: Final = Instrument(
    "backend_skipped",
    "backend_skipped",
    "Calls that computed without trying the backend (circuit breaker open).",
    "{call}",
)
# Not labelled by reason: exception type names are an open set.
UNREADABLE_ENTRIES: Final = Instrument(
    "unreadable_entries",
    "unreadable_entries",
    "Stored entries that could not be read (corrupt, forged, poison): each a miss.",
    "{entry}",
)
# Not labelled by exception type either, for the same reason. FAILURES_SERVED is a
# subset of the hits (and of the lock waits ending in a value): those calls got no value.
FAILURES_CACHED: Final = Instrument(
    "failures_cached",
    "failures_cached",
    "Failures stored in place of a value (cache_errors), each for its period.",
    "{failure}",
)
FAILURES_SERVED: Final = Instrument(
    "failures_served",
    "failures_served",
    "Calls raised a failure stored by cache_errors, without calling the function.",
    "{call}",
)
# A subset of HITS (so hits - near_hits are the hits read from the backend), kept
# apart rather than as a label of HITS so that the existing series stay as they are.
NEAR_HITS: Final = Instrument(
    "near_hits",
    "near_hits",
    "Hits served from this process's near cache, with no round trip (also in hits).",
    "{call}",
)
# The three below come from a backend's NearCache(metrics=...), not from a decorated
# function: their name label is that hook's own name.
NEAR_EVICTIONS: Final = Instrument(
    "near_evictions",
    "near_evictions",
    "Near-cache entries dropped to make room (the least recently used).",
    "{entry}",
)
NEAR_INVALIDATIONS: Final = Instrument(
    "near_invalidations",
    "near_invalidations",
    "Invalidation messages the near cache received, whether or not it held the key.",
    "{message}",
)
NEAR_FLUSHES: Final = Instrument(
    "near_flushes",
    "near_flushes",
    "Times the near cache dropped every entry, by reason (lost, stopped or fork).",
    "{flush}",
    "reason",
    ("lost", "stopped", "fork"),
)


def check_name(name: object) -> str:
    """Return *name* as a label value ("" for None), or raise TypeError."""
    if name is None:
        return ""
    if not isinstance(name, str):
        msg = f"name must be a str or None, not {type(name).__name__}"
        raise TypeError(msg)
    return name


def check_buckets(buckets: Iterable[object]) -> tuple[float, ...]:
    """Return *buckets* as a tuple of floats, or raise if they are not increasing."""
    values: list[float] = []
    for bound in buckets:
        if isinstance(bound, bool) or not isinstance(bound, int | float):
            msg = f"buckets must be numbers of seconds, not {bound!r}"
            raise TypeError(msg)
        if not math.isfinite(bound):
            msg = f"buckets must be finite (+Inf is always added), not {bound!r}"
            raise ValueError(msg)
        values.append(float(bound))
    if not values:
        msg = "buckets must hold at least one bound"
        raise ValueError(msg)
    if any(b >= c for b, c in itertools.pairwise(values)):
        msg = f"buckets must increase strictly, got {tuple(values)!r}"
        raise ValueError(msg)
    return tuple(values)
