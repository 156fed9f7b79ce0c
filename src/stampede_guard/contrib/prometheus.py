"""Prometheus metrics: a `MetricsHook` that counts events in a prometheus-client registry.

Needs the ``prometheus`` extra (``pip install "stampede-guard[prometheus]"``):

    from stampede_guard import cached_stampede_safe
    from stampede_guard.contrib.prometheus import PrometheusMetrics


    @cached_stampede_safe(key="weather:{city}", metrics=PrometheusMetrics(name="weather"))
    def get_weather(city: str) -> dict[str, object]: ...

With the default ``namespace``, the registry gets these metrics:

| Metric | Type | Labels | Counts |
|---|---|---|---|
| `stampede_guard_hits_total` | counter | `name` | `Hit` events |
| `stampede_guard_misses_total` | counter | `name` | `Miss` events |
| `stampede_guard_locks_acquired_total` | counter | `name` | `LockAcquired` events |
| `stampede_guard_computations_total` | counter | `name`, `outcome` | `Computed` (`success`) and `ComputeError` (`error`) |
| `stampede_guard_compute_seconds` | histogram | `name` | their `seconds` |
| `stampede_guard_lock_waits_total` | counter | `name`, `outcome` | `LockWait` events, by outcome |
| `stampede_guard_lock_wait_seconds` | histogram | `name` | their `seconds` |
| `stampede_guard_timeouts_total` | counter | `name`, `action` | `Timeout` events, by `on_timeout` action |
| `stampede_guard_stale_served_total` | counter | `name` | `StaleServed` events |
| `stampede_guard_refreshes_total` | counter | `name`, `reason` | `Refresh` events, by reason |
| `stampede_guard_refresh_failures_total` | counter | `name` | `RefreshFailed` events |
| `stampede_guard_backend_errors_total` | counter | `name` | `BackendFailed` events |
| `stampede_guard_backend_skipped_total` | counter | `name` | `BackendSkipped` events |
| `stampede_guard_unreadable_entries_total` | counter | `name` | `UnreadableEntry` events |
| `stampede_guard_failures_cached_total` | counter | `name` | `FailureCached` events |
| `stampede_guard_failures_served_total` | counter | `name` | `FailureServed` events (also in `hits_total` or `lock_waits_total`) |
| `stampede_guard_near_hits_total` | counter | `name` | `Hit` events with `near=True` (also in `hits_total`) |
| `stampede_guard_near_evictions_total` | counter | `name` | `NearEviction` events |
| `stampede_guard_near_invalidations_total` | counter | `name` | `NearInvalidation` events |
| `stampede_guard_near_flushes_total` | counter | `name`, `reason` | `NearFlush` events, by reason |

Nothing is labelled by cache key: keys are unbounded, and every key would be a new
time series. The ``name`` label tells hooks apart instead: give each decorated function
a hook of its own, ``PrometheusMetrics(name="weather")``, and they all share these
metrics. Its value is the empty string for a hook made without a name.

A near cache (``NearCache(metrics=...)``) sends its evictions, invalidations and
flushes to a hook of its own; they belong to no function, so they carry that hook's
``name``. One near cache serves every function of its backend: give it a hook named
after the backend, ``NearCache(metrics=PrometheusMetrics(name="near"))``. Giving it
a function's hook works too, and files them under that function's name. Near hits
are `Hit` events, counted per function: ``hits_total - near_hits_total`` are the
hits read from the backend.

Prometheus allows one metric of a name per registry. The first hook made for a registry
and namespace registers the metrics, and later hooks for the same pair reuse them; that
lookup is kept in this module, per registry, for as long as the registry lives.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass

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
    from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
except ImportError as exc:
    _msg = (
        "stampede_guard.contrib.prometheus needs prometheus-client; install the extra: "
        'pip install "stampede-guard[prometheus]"'
    )
    raise ImportError(_msg, name=exc.name) from exc

__all__ = ["DEFAULT_BUCKETS", "PrometheusMetrics"]

DEFAULT_BUCKETS = spec.DEFAULT_BUCKETS
"""The histograms' bucket bounds when none are given: 1 ms to 60 s.

``(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)`` seconds.
"""


@dataclass(frozen=True, slots=True)
class _Metrics:
    """The metrics of one namespace in one registry (labelled by hook name)."""

    buckets: tuple[float, ...]
    hits: Counter
    misses: Counter
    locks_acquired: Counter
    computations: Counter
    compute_seconds: Histogram
    lock_waits: Counter
    lock_wait_seconds: Histogram
    timeouts: Counter
    stale_served: Counter
    refreshes: Counter
    refresh_failures: Counter
    backend_errors: Counter
    backend_skipped: Counter
    unreadable_entries: Counter
    failures_cached: Counter
    failures_served: Counter
    near_hits: Counter
    near_evictions: Counter
    near_invalidations: Counter
    near_flushes: Counter


# Prometheus refuses a second metric of the same name in one registry, so hooks made
# for the same registry and namespace must share one set of metrics. The registry
# holds them alive; this map only finds them, and forgets a registry that is gone.
_registered: weakref.WeakKeyDictionary[CollectorRegistry, dict[str, _Metrics]] = (
    weakref.WeakKeyDictionary()
)
_registering = threading.Lock()


def _metrics(
    registry: CollectorRegistry, namespace: str, buckets: tuple[float, ...]
) -> _Metrics:
    with _registering:
        by_namespace = _registered.setdefault(registry, {})
        found = by_namespace.get(namespace)
        if found is not None:
            if found.buckets != buckets:
                msg = (
                    f"the {namespace!r} histograms of this registry already use "
                    f"buckets {found.buckets!r}; pass the same buckets, or another "
                    "namespace"
                )
                raise ValueError(msg)
            return found
        made = _register(registry, namespace, buckets)
        by_namespace[namespace] = made
        return made


def _register(
    registry: CollectorRegistry, namespace: str, buckets: tuple[float, ...]
) -> _Metrics:
    made: list[Counter | Histogram] = []

    def counter(instrument: spec.Instrument) -> Counter:
        labels = [spec.NAME_LABEL]
        if instrument.label is not None:
            labels.append(instrument.label)
        metric = Counter(
            instrument.prometheus,
            instrument.description,
            labels,
            namespace=namespace,
            registry=registry,
        )
        made.append(metric)
        return metric

    def histogram(instrument: spec.Instrument) -> Histogram:
        metric = Histogram(
            instrument.prometheus,
            instrument.description,
            [spec.NAME_LABEL],
            namespace=namespace,
            registry=registry,
            buckets=buckets,
        )
        made.append(metric)
        return metric

    try:
        return _make(counter, histogram, buckets)
    except Exception:
        for metric in made:  # all or nothing: a retry must not find half of them
            registry.unregister(metric)
        raise


def _make(
    counter: Callable[[spec.Instrument], Counter],
    histogram: Callable[[spec.Instrument], Histogram],
    buckets: tuple[float, ...],
) -> _Metrics:
    return _Metrics(
        buckets=buckets,
        hits=counter(spec.HITS),
        misses=counter(spec.MISSES),
        locks_acquired=counter(spec.LOCKS_ACQUIRED),
        computations=counter(spec.COMPUTATIONS),
        compute_seconds=histogram(spec.COMPUTE_SECONDS),
        lock_waits=counter(spec.LOCK_WAITS),
        lock_wait_seconds=histogram(spec.LOCK_WAIT_SECONDS),
        timeouts=counter(spec.TIMEOUTS),
        stale_served=counter(spec.STALE_SERVED),
        refreshes=counter(spec.REFRESHES),
        refresh_failures=counter(spec.REFRESH_FAILURES),
        backend_errors=counter(spec.BACKEND_ERRORS),
        backend_skipped=counter(spec.BACKEND_SKIPPED),
        unreadable_entries=counter(spec.UNREADABLE_ENTRIES),
        failures_cached=counter(spec.FAILURES_CACHED),
        failures_served=counter(spec.FAILURES_SERVED),
        near_hits=counter(spec.NEAR_HITS),
        near_evictions=counter(spec.NEAR_EVICTIONS),
        near_invalidations=counter(spec.NEAR_INVALIDATIONS),
        near_flushes=counter(spec.NEAR_FLUSHES),
    )


class PrometheusMetrics:
    """A `MetricsHook` that counts every event in Prometheus counters and histograms.

    Args:
        registry: Where the metrics live; defaults to prometheus-client's global
            ``REGISTRY`` (what ``start_http_server`` and ``generate_latest`` serve).
        namespace: Put before every metric name (``<namespace>_hits_total``).
        name: The value of the ``name`` label on every series this hook writes, to
            tell apart the functions that share the metrics (one hook each). Keep it
            to a fixed, small set of values, such as function names.
        buckets: Upper bounds, in seconds, of the two histograms' buckets. Every
            hook of one registry and namespace must use the same ones.

    Raises:
        TypeError: *name* is not a str, or *buckets* are not numbers.
        ValueError: *buckets* are empty, not finite or not increasing, or differ from
            those of an earlier hook of the same registry and namespace; or
            prometheus-client refuses to register a metric (for example one of the
            same name that something else registered).
    """

    def __init__(
        self,
        *,
        registry: CollectorRegistry | None = None,
        namespace: str = "stampede_guard",
        name: str | None = None,
        buckets: Iterable[float] = DEFAULT_BUCKETS,
    ) -> None:
        label = spec.check_name(name)
        self._namespace = namespace
        self._name = name
        m = _metrics(
            REGISTRY if registry is None else registry,
            namespace,
            spec.check_buckets(buckets),
        )
        # Bind every label set now: the hot path is one call, and each series is
        # exported (at zero) before its first event, as Prometheus prefers.
        self._hits = m.hits.labels(label)
        self._misses = m.misses.labels(label)
        self._locks_acquired = m.locks_acquired.labels(label)
        self._computed = m.computations.labels(label, "success")
        self._compute_errors = m.computations.labels(label, "error")
        self._compute_seconds = m.compute_seconds.labels(label)
        self._lock_waits = {
            outcome: m.lock_waits.labels(label, outcome)
            for outcome in spec.LOCK_WAITS.values
        }
        self._lock_wait_seconds = m.lock_wait_seconds.labels(label)
        self._timeouts = {
            action: m.timeouts.labels(label, action) for action in spec.TIMEOUTS.values
        }
        self._stale_served = m.stale_served.labels(label)
        self._refreshes = {
            reason: m.refreshes.labels(label, reason)
            for reason in spec.REFRESHES.values
        }
        self._refresh_failures = m.refresh_failures.labels(label)
        self._backend_errors = m.backend_errors.labels(label)
        self._backend_skipped = m.backend_skipped.labels(label)
        self._unreadable_entries = m.unreadable_entries.labels(label)
        self._failures_cached = m.failures_cached.labels(label)
        self._failures_served = m.failures_served.labels(label)
        self._near_hits = m.near_hits.labels(label)
        self._near_evictions = m.near_evictions.labels(label)
        self._near_invalidations = m.near_invalidations.labels(label)
        self._near_flushes = {
            reason: m.near_flushes.labels(label, reason)
            for reason in spec.NEAR_FLUSHES.values
        }

    def __repr__(self) -> str:
        return f"PrometheusMetrics(namespace={self._namespace!r}, name={self._name!r})"

    def __call__(self, event: Event | NearEvent, /) -> None:  # noqa: C901 - a case per event
        """Count *event*."""
        match event:
            case Hit(near=near):
                self._hits.inc()
                if near:
                    self._near_hits.inc()
            case Miss():
                self._misses.inc()
            case LockAcquired():
                self._locks_acquired.inc()
            case Computed(seconds=seconds):
                self._computed.inc()
                self._compute_seconds.observe(seconds)
            case ComputeError(seconds=seconds):
                self._compute_errors.inc()
                self._compute_seconds.observe(seconds)
            case LockWait(seconds=seconds, outcome=outcome):
                self._lock_waits[outcome].inc()
                self._lock_wait_seconds.observe(seconds)
            case Timeout(action=action):
                self._timeouts[action].inc()
            case StaleServed():
                self._stale_served.inc()
            case Refresh(reason=reason):
                self._refreshes[reason].inc()
            case RefreshFailed():
                self._refresh_failures.inc()
            case BackendFailed():
                self._backend_errors.inc()
            case BackendSkipped():
                self._backend_skipped.inc()
            case UnreadableEntry():
                self._unreadable_entries.inc()
            case FailureCached():
                self._failures_cached.inc()
            case FailureServed():
                self._failures_served.inc()
            case NearEviction():
                self._near_evictions.inc()
            case NearInvalidation():
                self._near_invalidations.inc()
            case NearFlush(reason=reason):
                self._near_flushes[reason].inc()
