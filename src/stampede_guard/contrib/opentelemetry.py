"""OpenTelemetry metrics: a `MetricsHook` that records events on an OpenTelemetry meter.

Needs the ``opentelemetry`` extra (``pip install "stampede-guard[opentelemetry]"``),
which brings the API only; the application configures the SDK and its exporters:

    from stampede_guard import cached_stampede_safe
    from stampede_guard.contrib.opentelemetry import OpenTelemetryMetrics


    @cached_stampede_safe(key="weather:{city}", metrics=OpenTelemetryMetrics(name="weather"))
    def get_weather(city: str) -> dict[str, object]: ...

The meter is ``stampede_guard`` (its version is the package's), and it has the same
instruments as `stampede_guard.contrib.prometheus`, named with dots:

| Instrument | Kind | Unit | Attributes | Records |
|---|---|---|---|---|
| `stampede_guard.hits` | counter | `{call}` | `name` | `Hit` events |
| `stampede_guard.misses` | counter | `{call}` | `name` | `Miss` events |
| `stampede_guard.locks_acquired` | counter | `{lock}` | `name` | `LockAcquired` events |
| `stampede_guard.computations` | counter | `{call}` | `name`, `outcome` | `Computed` (`success`) and `ComputeError` (`error`) |
| `stampede_guard.compute.duration` | histogram | `s` | `name` | their `seconds` |
| `stampede_guard.lock_waits` | counter | `{wait}` | `name`, `outcome` | `LockWait` events, by outcome |
| `stampede_guard.lock_wait.duration` | histogram | `s` | `name` | their `seconds` |
| `stampede_guard.timeouts` | counter | `{wait}` | `name`, `action` | `Timeout` events, by `on_timeout` action |
| `stampede_guard.stale_served` | counter | `{call}` | `name` | `StaleServed` events |
| `stampede_guard.refreshes` | counter | `{refresh}` | `name`, `reason` | `Refresh` events, by reason |
| `stampede_guard.refresh_failures` | counter | `{refresh}` | `name` | `RefreshFailed` events |
| `stampede_guard.backend_errors` | counter | `{error}` | `name` | `BackendFailed` events |
| `stampede_guard.backend_skipped` | counter | `{call}` | `name` | `BackendSkipped` events |
| `stampede_guard.unreadable_entries` | counter | `{entry}` | `name` | `UnreadableEntry` events |
| `stampede_guard.failures_cached` | counter | `{failure}` | `name` | `FailureCached` events |
| `stampede_guard.failures_served` | counter | `{call}` | `name` | `FailureServed` events (also in `hits` or `lock_waits`) |
| `stampede_guard.near_hits` | counter | `{call}` | `name` | `Hit` events with `near=True` (also in `hits`) |
| `stampede_guard.near_evictions` | counter | `{entry}` | `name` | `NearEviction` events |
| `stampede_guard.near_invalidations` | counter | `{message}` | `name` | `NearInvalidation` events |
| `stampede_guard.near_flushes` | counter | `{flush}` | `name`, `reason` | `NearFlush` events, by reason |

Nothing is recorded with the cache key: keys are unbounded, and every key would be a
new time series. The ``name`` attribute, set only when the hook is given a *name*,
tells apart the functions that each have a hook of their own.

A near cache (``NearCache(metrics=...)``) sends its evictions, invalidations and
flushes to a hook of its own; they belong to no function, so they carry that hook's
``name``. One near cache serves every function of its backend: give it a hook named
after the backend, ``NearCache(metrics=OpenTelemetryMetrics(name="near"))``. Giving
it a function's hook works too, and records them under that function's name. Near
hits are `Hit` events, recorded per function: ``hits - near_hits`` are the hits read
from the backend.
"""

from __future__ import annotations

from collections.abc import Iterable

from stampede_guard import __version__
from stampede_guard.contrib import _instruments as spec
from stampede_guard.metrics import (
    BackendFailed,
    BackendSkipped,
    Computed,
    ComputeError,
    Event,
    FailureCached,
    FailureServed,
    Hit,
    LockAcquired,
    LockWait,
    Miss,
    NearEvent,
    NearEviction,
    NearFlush,
    NearInvalidation,
    Refresh,
    RefreshFailed,
    StaleServed,
    Timeout,
    UnreadableEntry,
)

try:
    from opentelemetry.metrics import Counter, Histogram, MeterProvider, get_meter
except ImportError as exc:
    _msg = (
        "stampede_guard.contrib.opentelemetry needs opentelemetry-api; install the "
        'extra: pip install "stampede-guard[opentelemetry]"'
    )
    raise ImportError(_msg, name=exc.name) from exc

__all__ = ["DEFAULT_BUCKETS", "OpenTelemetryMetrics"]

DEFAULT_BUCKETS = spec.DEFAULT_BUCKETS
"""The histograms' advised bucket bounds when none are given: 1 ms to 60 s.

``(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)`` seconds.
"""

_Attributes = dict[str, str]


class OpenTelemetryMetrics:
    """A `MetricsHook` that records every event on OpenTelemetry counters and histograms.

    Args:
        meter_provider: Where the ``stampede_guard`` meter comes from; defaults to the
            global provider (``opentelemetry.metrics.set_meter_provider``), including
            one set after this hook is made.
        namespace: Put before every instrument name (``<namespace>.hits``).
        name: The ``name`` attribute of every measurement this hook records, to tell
            apart the functions that share the instruments (one hook each). Keep it
            to a fixed, small set of values, such as function names.
        buckets: Bucket bounds, in seconds, advised for the two histograms (the SDK's
            views can override them).

    Raises:
        TypeError: *name* is not a str, or *buckets* are not numbers.
        ValueError: *buckets* are empty, not finite or not increasing.
    """

    def __init__(
        self,
        *,
        meter_provider: MeterProvider | None = None,
        namespace: str = "stampede_guard",
        name: str | None = None,
        buckets: Iterable[float] = DEFAULT_BUCKETS,
    ) -> None:
        label = spec.check_name(name)
        bounds = list(spec.check_buckets(buckets))
        self._namespace = namespace
        self._name = name
        meter = get_meter("stampede_guard", __version__, meter_provider)

        # A meter returns the same instrument for the same name, unit and
        # description, so hooks that share a meter share its instruments.
        def counter(instrument: spec.Instrument) -> Counter:
            return meter.create_counter(
                f"{namespace}.{instrument.opentelemetry}",
                unit=instrument.unit,
                description=instrument.description,
            )

        def histogram(instrument: spec.Instrument) -> Histogram:
            return meter.create_histogram(
                f"{namespace}.{instrument.opentelemetry}",
                unit=instrument.unit,
                description=instrument.description,
                explicit_bucket_boundaries_advisory=bounds,
            )

        base: _Attributes = {spec.NAME_LABEL: label} if label else {}

        def labelled(instrument: spec.Instrument) -> dict[str, _Attributes]:
            assert instrument.label is not None  # noqa: S101 - the table says so
            return {v: {**base, instrument.label: v} for v in instrument.values}

        # Attribute mappings are built once; the hot path is one call with a dict
        # that is never mutated.
        self._base = base
        self._hits = counter(spec.HITS)
        self._misses = counter(spec.MISSES)
        self._locks_acquired = counter(spec.LOCKS_ACQUIRED)
        self._computations = counter(spec.COMPUTATIONS)
        self._computation_attributes = labelled(spec.COMPUTATIONS)
        self._compute_seconds = histogram(spec.COMPUTE_SECONDS)
        self._lock_waits = counter(spec.LOCK_WAITS)
        self._lock_wait_attributes = labelled(spec.LOCK_WAITS)
        self._lock_wait_seconds = histogram(spec.LOCK_WAIT_SECONDS)
        self._timeouts = counter(spec.TIMEOUTS)
        self._timeout_attributes = labelled(spec.TIMEOUTS)
        self._stale_served = counter(spec.STALE_SERVED)
        self._refreshes = counter(spec.REFRESHES)
        self._refresh_attributes = labelled(spec.REFRESHES)
        self._refresh_failures = counter(spec.REFRESH_FAILURES)
        self._backend_errors = counter(spec.BACKEND_ERRORS)
        self._backend_skipped = counter(spec.BACKEND_SKIPPED)
        self._unreadable_entries = counter(spec.UNREADABLE_ENTRIES)
        self._failures_cached = counter(spec.FAILURES_CACHED)
        self._failures_served = counter(spec.FAILURES_SERVED)
        self._near_hits = counter(spec.NEAR_HITS)
        self._near_evictions = counter(spec.NEAR_EVICTIONS)
        self._near_invalidations = counter(spec.NEAR_INVALIDATIONS)
        self._near_flushes = counter(spec.NEAR_FLUSHES)
        self._near_flush_attributes = labelled(spec.NEAR_FLUSHES)

    def __repr__(self) -> str:
        return (
            f"OpenTelemetryMetrics(namespace={self._namespace!r}, name={self._name!r})"
        )

    def __call__(self, event: Event | NearEvent, /) -> None:  # noqa: C901 - a case per event
        """Record *event*."""
        base = self._base
        match event:
            case Hit(near=near):
                self._hits.add(1, base)
                if near:
                    self._near_hits.add(1, base)
            case Miss():
                self._misses.add(1, base)
            case LockAcquired():
                self._locks_acquired.add(1, base)
            case Computed(seconds=seconds):
                self._computations.add(1, self._computation_attributes["success"])
                self._compute_seconds.record(seconds, base)
            case ComputeError(seconds=seconds):
                self._computations.add(1, self._computation_attributes["error"])
                self._compute_seconds.record(seconds, base)
            case LockWait(seconds=seconds, outcome=outcome):
                self._lock_waits.add(1, self._lock_wait_attributes[outcome])
                self._lock_wait_seconds.record(seconds, base)
            case Timeout(action=action):
                self._timeouts.add(1, self._timeout_attributes[action])
            case StaleServed():
                self._stale_served.add(1, base)
            case Refresh(reason=reason):
                self._refreshes.add(1, self._refresh_attributes[reason])
            case RefreshFailed():
                self._refresh_failures.add(1, base)
            case BackendFailed():
                self._backend_errors.add(1, base)
            case BackendSkipped():
                self._backend_skipped.add(1, base)
            case UnreadableEntry():
                self._unreadable_entries.add(1, base)
            case FailureCached():
                self._failures_cached.add(1, base)
            case FailureServed():
                self._failures_served.add(1, base)
            case NearEviction():
                self._near_evictions.add(1, base)
            case NearInvalidation():
                self._near_invalidations.add(1, base)
            case NearFlush(reason=reason):
                self._near_flushes.add(1, self._near_flush_attributes[reason])
