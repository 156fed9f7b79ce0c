"""The metrics exporters in stampede_guard.contrib: Prometheus, OpenTelemetry, logging."""

from __future__ import annotations

import importlib
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, get_args, get_type_hints

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    NumberDataPoint,
)
from prometheus_client import REGISTRY, CollectorRegistry

from stampede_guard import MemoryBackend, cached_stampede_safe
from stampede_guard.contrib import _instruments as spec
from stampede_guard.contrib.logging import LoggingHook, key_digest
from stampede_guard.contrib.opentelemetry import OpenTelemetryMetrics
from stampede_guard.contrib.prometheus import DEFAULT_BUCKETS, PrometheusMetrics
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
    MetricsHook,
    Miss,
    Refresh,
    RefreshFailed,
    StaleServed,
    Timeout,
)
from stampede_guard.testing import wait_for_joiners

CALLERS = 20

# One event of every kind and label value: what each exporter is fed in the mapping tests.
EVERY_EVENT: list[Event] = [
    Hit("k"),
    Miss("k"),
    LockAcquired("k"),
    Computed("k", 0.5),
    ComputeError("k", 2.0, ValueError("x")),
    *(LockWait("k", 0.25, o) for o in ("value", "lock", "timeout", "error")),
    Timeout("k", 3.0, "compute"),
    Timeout("k", 3.0, "raise"),
    StaleServed("k", 1.0),
    *(Refresh("k", r) for r in ("stale", "early", "manual")),
    RefreshFailed("k", OSError("x")),
    BackendFailed("k", ConnectionError("x")),
    BackendSkipped("k"),
    FailureCached("k", "builtins.TimeoutError", 5.0),
    FailureServed("k", "builtins.TimeoutError"),
]


def stampede_then_hit(hook: MetricsHook) -> int:
    """Call one cold key from CALLERS threads at once, then once more; return the runs.

    The computation holds until every thread has joined it, so the events are exact:
    CALLERS misses, one computation, CALLERS - 1 waits served the value, then one hit.
    """
    release = threading.Event()
    runs = 0

    @cached_stampede_safe(key="weather:{city}", backend=MemoryBackend(), metrics=hook)
    def get_weather(city: str) -> str:
        nonlocal runs
        runs += 1
        assert release.wait(10)
        return f"sunny in {city}"

    threads = [
        threading.Thread(target=get_weather, args=("Oslo",)) for _ in range(CALLERS)
    ]
    for thread in threads:
        thread.start()
    wait_for_joiners(get_weather, CALLERS - 1, "Oslo")  # all share the leader's call
    time.sleep(0.05)  # so that the waits are measurably long
    release.set()
    for thread in threads:
        thread.join(10)
    assert get_weather("Oslo") == "sunny in Oslo"
    return runs


# --- optional imports ---------------------------------------------------------------


def test_importing_stampede_guard_imports_no_exporter_library() -> None:
    """`import stampede_guard` (and its contrib package) loads neither exporter library."""
    # redis-py itself imports opentelemetry when it is installed (its own optional
    # instrumentation), so the check counts only what stampede_guard adds after redis.
    code = """
import sys
families = ("prometheus_client", "opentelemetry")
def loaded():
    return {m for m in sys.modules if m.split(".")[0] in families}
import redis, redis.asyncio
before = loaded()
import stampede_guard, stampede_guard.metrics, stampede_guard.backends
import stampede_guard.contrib
added = sorted(loaded() - before)
assert not added, added
assert "prometheus_client" not in sys.modules
assert not [m for m in sys.modules if m.startswith("stampede_guard.contrib.")]
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    ("module", "hidden", "extra"),
    [
        ("stampede_guard.contrib.prometheus", "prometheus_client", "prometheus"),
        ("stampede_guard.contrib.opentelemetry", "opentelemetry", "opentelemetry"),
        (
            "stampede_guard.contrib.opentelemetry",
            "opentelemetry.metrics",
            "opentelemetry",
        ),
    ],
)
def test_a_missing_library_names_the_extra_to_install(
    monkeypatch: pytest.MonkeyPatch, module: str, hidden: str, extra: str
) -> None:
    """Importing an exporter without its library raises ImportError with the pip command."""
    for name in [m for m in sys.modules if m == hidden or m.startswith(f"{hidden}.")]:
        monkeypatch.setitem(sys.modules, name, None)  # None: "not importable"
    monkeypatch.setitem(sys.modules, hidden, None)
    monkeypatch.delitem(sys.modules, module)
    with pytest.raises(ImportError, match=rf'pip install "stampede-guard\[{extra}\]"'):
        importlib.import_module(module)


def test_the_logging_hook_needs_no_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """stampede_guard.contrib.logging imports with neither exporter library present."""
    for hidden in ("prometheus_client", "opentelemetry"):
        monkeypatch.setitem(sys.modules, hidden, None)
    monkeypatch.delitem(sys.modules, "stampede_guard.contrib.logging")
    assert importlib.import_module("stampede_guard.contrib.logging").LoggingHook


@pytest.mark.parametrize(
    ("event", "field", "instrument"),
    [
        (LockWait, "outcome", spec.LOCK_WAITS),
        (Timeout, "action", spec.TIMEOUTS),
        (Refresh, "reason", spec.REFRESHES),
    ],
)
def test_label_values_are_every_value_of_the_event_field(
    event: type, field: str, instrument: spec.Instrument
) -> None:
    """Each labelled instrument lists exactly the values its event's field can take."""
    assert instrument.label == field
    assert instrument.values == get_args(get_type_hints(event)[field])


# --- Prometheus ---------------------------------------------------------------------


def sample(registry: CollectorRegistry, metric: str, **labels: str) -> float | None:
    return registry.get_sample_value(f"stampede_guard_{metric}", labels)


def test_prometheus_counts_a_stampede_and_a_hit_exactly() -> None:
    """20 concurrent misses and a hit: the registry holds the exact counts."""
    registry = CollectorRegistry()
    runs = stampede_then_hit(PrometheusMetrics(registry=registry, name="weather"))
    assert runs == 1

    def get(metric: str, **labels: str) -> float | None:
        return sample(registry, metric, name="weather", **labels)

    assert get("hits_total") == 1
    assert get("misses_total") == CALLERS
    assert get("locks_acquired_total") == 1
    assert get("computations_total", outcome="success") == 1
    assert get("computations_total", outcome="error") == 0
    assert get("compute_seconds_count") == 1
    assert get("lock_waits_total", outcome="value") == CALLERS - 1
    for outcome in ("lock", "timeout", "error"):
        assert get("lock_waits_total", outcome=outcome) == 0
    assert get("lock_wait_seconds_count") == CALLERS - 1
    wait_sum = get("lock_wait_seconds_sum")
    assert wait_sum is not None
    assert wait_sum >= 0.05 * (CALLERS - 1)
    assert get("timeouts_total", action="compute") == 0
    assert get("stale_served_total") == 0
    assert get("backend_errors_total") == 0


def test_prometheus_maps_every_event_to_its_metric() -> None:
    """Each kind of event lands in its own counter or histogram, with its label."""
    registry = CollectorRegistry()
    hook = PrometheusMetrics(registry=registry)
    for event in EVERY_EVENT:
        hook(event)

    def get(metric: str, **labels: str) -> float | None:
        return sample(registry, metric, name="", **labels)

    assert get("hits_total") == 1
    assert get("misses_total") == 1
    assert get("locks_acquired_total") == 1
    assert get("computations_total", outcome="success") == 1
    assert get("computations_total", outcome="error") == 1
    assert get("compute_seconds_count") == 2
    assert get("compute_seconds_sum") == 2.5
    assert get("compute_seconds_bucket", le="0.5") == 1
    assert get("compute_seconds_bucket", le="2.5") == 2
    for outcome in ("value", "lock", "timeout", "error"):
        assert get("lock_waits_total", outcome=outcome) == 1
    assert get("lock_wait_seconds_count") == 4
    assert get("lock_wait_seconds_sum") == 1.0
    assert get("timeouts_total", action="compute") == 1
    assert get("timeouts_total", action="raise") == 1
    assert get("stale_served_total") == 1
    for reason in ("stale", "early", "manual"):
        assert get("refreshes_total", reason=reason) == 1
    assert get("refresh_failures_total") == 1
    assert get("backend_errors_total") == 1
    assert get("backend_skipped_total") == 1
    assert get("failures_cached_total") == 1
    assert get("failures_served_total") == 1


def test_prometheus_hooks_of_one_registry_share_metrics_told_apart_by_name() -> None:
    """Hooks named per function register the metrics once and write their own series."""
    registry = CollectorRegistry()
    weather = PrometheusMetrics(registry=registry, name="weather")
    rates = PrometheusMetrics(registry=registry, name="rates")
    unnamed = PrometheusMetrics(registry=registry)
    weather(Hit("weather:Oslo"))
    weather(Hit("weather:Rome"))
    rates(Miss("rates:EUR"))
    unnamed(Hit("x"))
    assert sample(registry, "hits_total", name="weather") == 2
    assert sample(registry, "hits_total", name="rates") == 0
    assert sample(registry, "misses_total", name="rates") == 1
    assert sample(registry, "hits_total", name="") == 1


def test_prometheus_never_labels_by_key() -> None:
    """However many keys are seen, series are labelled only by name and event fields."""
    registry = CollectorRegistry()
    hook = PrometheusMetrics(registry=registry, name="f")
    for i in range(100):
        hook(Miss(f"user:{i}"))
        hook(LockWait(f"user:{i}", 0.1, "value"))
    labels = {
        (name, value)
        for family in registry.collect()
        for s in family.samples
        for name, value in s.labels.items()
    }
    assert {name for name, _ in labels} <= {"name", "outcome", "action", "reason", "le"}
    assert not any("user:" in value for _, value in labels)
    assert sample(registry, "misses_total", name="f") == 100


def test_prometheus_defaults_to_the_global_registry() -> None:
    """Without a registry, the metrics go where prometheus-client's exposition reads."""
    hook = PrometheusMetrics(namespace="stampede_guard_default_registry_test", name="t")
    hook(Hit("k"))
    hook(Hit("k"))
    value = REGISTRY.get_sample_value(
        "stampede_guard_default_registry_test_hits_total", {"name": "t"}
    )
    assert value == 2
    assert "PrometheusMetrics(namespace=" in repr(hook)


def test_prometheus_namespaces_keep_metrics_apart() -> None:
    """Two namespaces in one registry are two sets of metrics."""
    registry = CollectorRegistry()
    PrometheusMetrics(registry=registry, namespace="a")(Hit("k"))
    assert registry.get_sample_value("a_hits_total", {"name": ""}) == 1
    PrometheusMetrics(registry=registry, namespace="b")
    assert registry.get_sample_value("b_hits_total", {"name": ""}) == 0


def test_prometheus_custom_buckets_and_their_conflicts() -> None:
    """Buckets are used as given; a later hook asking for others is refused."""
    registry = CollectorRegistry()
    hook = PrometheusMetrics(registry=registry, buckets=[0.1, 1])
    hook(Computed("k", 0.5))
    assert sample(registry, "compute_seconds_bucket", name="", le="1.0") == 1
    assert sample(registry, "compute_seconds_bucket", name="", le="0.1") == 0
    assert sample(registry, "compute_seconds_bucket", name="", le="2.5") is None
    PrometheusMetrics(registry=registry, buckets=(0.1, 1.0), name="same")
    with pytest.raises(ValueError, match="already use buckets"):
        PrometheusMetrics(registry=registry, name="other")


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"name": 3}, TypeError),
        ({"buckets": []}, ValueError),
        ({"buckets": [1.0, 0.5]}, ValueError),
        ({"buckets": [0.5, 0.5]}, ValueError),
        ({"buckets": [1.0, float("inf")]}, ValueError),
        ({"buckets": ["1"]}, TypeError),
        ({"buckets": [True]}, TypeError),
    ],
)
def test_prometheus_rejects_bad_arguments(kwargs: dict[str, Any], error: type) -> None:
    """A bad name or bucket list fails when the hook is made."""
    with pytest.raises(error):
        PrometheusMetrics(registry=CollectorRegistry(), **kwargs)


def test_prometheus_a_refused_registration_leaves_nothing_behind() -> None:
    """If one metric cannot be registered, the others are removed, and a retry can work."""
    registry = CollectorRegistry()
    from prometheus_client import Counter

    squatter = Counter(
        "stampede_guard_backend_skipped", "taken", ["name"], registry=registry
    )
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        PrometheusMetrics(registry=registry)
    assert [m.name for m in registry.collect()] == ["stampede_guard_backend_skipped"]
    registry.unregister(squatter)
    PrometheusMetrics(registry=registry)(Hit("k"))
    assert sample(registry, "hits_total", name="") == 1


def test_prometheus_default_buckets_reach_a_minute() -> None:
    """The default histogram buckets cover millisecond hits to minute-long computations."""
    assert DEFAULT_BUCKETS[0] == 0.001
    assert DEFAULT_BUCKETS[-1] == 60.0


# --- OpenTelemetry ------------------------------------------------------------------


def otel_points(
    reader: InMemoryMetricReader,
) -> dict[tuple[str, frozenset[tuple[str, Any]]], NumberDataPoint | HistogramDataPoint]:
    """Read every data point, by instrument name and attribute set."""
    data = reader.get_metrics_data()
    assert data is not None
    points: dict[
        tuple[str, frozenset[tuple[str, Any]]], NumberDataPoint | HistogramDataPoint
    ] = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            assert scope.scope.name == "stampede_guard"
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    attributes = frozenset((point.attributes or {}).items())
                    assert isinstance(point, NumberDataPoint | HistogramDataPoint)
                    points[metric.name, attributes] = point
    return points


def otel_value(
    points: dict[
        tuple[str, frozenset[tuple[str, Any]]], NumberDataPoint | HistogramDataPoint
    ],
    instrument: str,
    **attributes: str,
) -> float | None:
    """A counter's value, or a histogram's count; None if nothing was recorded."""
    point = points.get((f"stampede_guard.{instrument}", frozenset(attributes.items())))
    match point:
        case None:
            return None
        case NumberDataPoint():
            return point.value
        case HistogramDataPoint():
            return point.count


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
def provider(reader: InMemoryMetricReader) -> Any:
    made = MeterProvider(metric_readers=[reader])
    yield made
    made.shutdown()


def test_opentelemetry_counts_a_stampede_and_a_hit_exactly(
    reader: InMemoryMetricReader, provider: MeterProvider
) -> None:
    """20 concurrent misses and a hit: the in-memory reader holds the exact counts."""
    hook = OpenTelemetryMetrics(meter_provider=provider, name="weather")
    assert stampede_then_hit(hook) == 1
    points = otel_points(reader)

    def get(instrument: str, **attributes: str) -> float | None:
        return otel_value(points, instrument, name="weather", **attributes)

    assert get("hits") == 1
    assert get("misses") == CALLERS
    assert get("locks_acquired") == 1
    assert get("computations", outcome="success") == 1
    assert get("computations", outcome="error") is None  # never recorded
    assert get("compute.duration") == 1
    assert get("lock_waits", outcome="value") == CALLERS - 1
    assert get("lock_wait.duration") == CALLERS - 1
    waits = points[
        "stampede_guard.lock_wait.duration", frozenset({("name", "weather")})
    ]
    assert isinstance(waits, HistogramDataPoint)
    assert waits.sum >= 0.05 * (CALLERS - 1)
    assert tuple(waits.explicit_bounds) == DEFAULT_BUCKETS
    assert {name for name, _ in points} == {
        "stampede_guard.hits",
        "stampede_guard.misses",
        "stampede_guard.locks_acquired",
        "stampede_guard.computations",
        "stampede_guard.compute.duration",
        "stampede_guard.lock_waits",
        "stampede_guard.lock_wait.duration",
    }


def test_opentelemetry_maps_every_event_to_its_instrument(
    reader: InMemoryMetricReader, provider: MeterProvider
) -> None:
    """Each kind of event is recorded on its own instrument, with its attributes."""
    hook = OpenTelemetryMetrics(meter_provider=provider)
    for event in EVERY_EVENT:
        hook(event)
    points = otel_points(reader)
    assert all(
        not attributes or ("name", "") not in attributes for _, attributes in points
    )

    def get(instrument: str, **attributes: str) -> float | None:
        return otel_value(points, instrument, **attributes)

    assert get("hits") == 1
    assert get("misses") == 1
    assert get("locks_acquired") == 1
    assert get("computations", outcome="success") == 1
    assert get("computations", outcome="error") == 1
    assert get("compute.duration") == 2
    for outcome in ("value", "lock", "timeout", "error"):
        assert get("lock_waits", outcome=outcome) == 1
    assert get("lock_wait.duration") == 4
    assert get("timeouts", action="compute") == 1
    assert get("timeouts", action="raise") == 1
    assert get("stale_served") == 1
    for reason in ("stale", "early", "manual"):
        assert get("refreshes", reason=reason) == 1
    assert get("refresh_failures") == 1
    assert get("backend_errors") == 1
    assert get("backend_skipped") == 1
    assert get("failures_cached") == 1
    assert get("failures_served") == 1
    compute = points["stampede_guard.compute.duration", frozenset()]
    assert isinstance(compute, HistogramDataPoint)
    assert compute.sum == 2.5


def test_opentelemetry_hooks_share_instruments_told_apart_by_name(
    reader: InMemoryMetricReader, provider: MeterProvider
) -> None:
    """Hooks named per function write to the same instruments with their own attribute."""
    weather = OpenTelemetryMetrics(meter_provider=provider, name="weather")
    rates = OpenTelemetryMetrics(meter_provider=provider, name="rates")
    weather(Hit("weather:Oslo"))
    weather(Hit("weather:Rome"))
    rates(Hit("rates:EUR"))
    points = otel_points(reader)
    assert otel_value(points, "hits", name="weather") == 2
    assert otel_value(points, "hits", name="rates") == 1
    assert "name='rates'" in repr(rates)


def test_opentelemetry_defaults_to_the_global_meter_provider() -> None:
    """Without a provider, the hook uses the global one (a no-op until one is set)."""
    hook = OpenTelemetryMetrics(name="global")
    for event in EVERY_EVENT:
        hook(event)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"name": 3}, TypeError),
        ({"buckets": [2.0, 1.0]}, ValueError),
        ({"buckets": ["1"]}, TypeError),
    ],
)
def test_opentelemetry_rejects_bad_arguments(
    kwargs: dict[str, Any], error: type
) -> None:
    """A bad name or bucket list fails when the hook is made."""
    with pytest.raises(error):
        OpenTelemetryMetrics(**kwargs)


# --- logging ------------------------------------------------------------------------


def logged_by(
    hook: Callable[[Event], None], caplog: pytest.LogCaptureFixture, events: list[Event]
) -> list[str]:
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="stampede_guard.events"):
        for event in events:
            hook(event)
    return [r.getMessage() for r in caplog.records]


def test_logging_hook_logs_a_stampede_one_line_per_event(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each event of a real stampede is one DEBUG line naming the event and the key."""
    with caplog.at_level(logging.DEBUG, logger="stampede_guard.events"):
        stampede_then_hit(LoggingHook())
    lines = [r.getMessage() for r in caplog.records]
    assert all(r.levelno == logging.DEBUG for r in caplog.records)
    assert all("\n" not in line for line in lines)
    assert lines.count("miss key=weather:Oslo") == CALLERS
    assert lines.count("lock_acquired key=weather:Oslo") == 1
    assert lines.count("hit key=weather:Oslo") == 1
    assert (
        sum(line.startswith("computed key=weather:Oslo seconds=") for line in lines)
        == 1
    )
    waits = [line for line in lines if line.startswith("lock_wait ")]
    assert len(waits) == CALLERS - 1
    assert all(line.endswith(" outcome=value") for line in waits)
    assert len(lines) == 2 * CALLERS + 2


def test_logging_hook_formats_every_event(caplog: pytest.LogCaptureFixture) -> None:
    """Every kind of event has its line, with its fields; errors by type only."""
    lines = logged_by(LoggingHook(), caplog, EVERY_EVENT)
    assert lines == [
        "hit key=k",
        "miss key=k",
        "lock_acquired key=k",
        "computed key=k seconds=0.500",
        "compute_error key=k seconds=2.000 error=ValueError",
        "lock_wait key=k seconds=0.250 outcome=value",
        "lock_wait key=k seconds=0.250 outcome=lock",
        "lock_wait key=k seconds=0.250 outcome=timeout",
        "lock_wait key=k seconds=0.250 outcome=error",
        "timeout key=k seconds=3.000 action=compute",
        "timeout key=k seconds=3.000 action=raise",
        "stale_served key=k seconds=1.000",
        "refresh key=k reason=stale",
        "refresh key=k reason=early",
        "refresh key=k reason=manual",
        "refresh_failed key=k error=OSError",
        "backend_failed key=k error=ConnectionError",
        "backend_skipped key=k",
        "failure_cached key=k error=TimeoutError seconds=5.000",
        "failure_served key=k error=TimeoutError",
    ]


def test_logging_hook_never_logs_an_error_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An exception's message may quote data: only its qualified type is logged."""

    class QuotaError(Exception):
        pass

    lines = logged_by(
        LoggingHook(), caplog, [ComputeError("k", 0.1, QuotaError("card 4111-1111"))]
    )
    assert len(lines) == 1
    assert "4111" not in lines[0]
    assert lines[0].endswith(f"error={__name__}.{QuotaError.__qualname__}")


def test_logging_hook_can_log_key_digests_instead_of_keys(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """digest_keys=True: a stable digest in place of the key, which never appears."""
    hook = LoggingHook(digest_keys=True)
    lines = logged_by(hook, caplog, [Miss("user:alice@example.com"), Hit("user:bob")])
    assert "alice" not in "".join(lines)
    assert lines[0] == f"miss key={key_digest('user:alice@example.com')}"
    assert key_digest("user:bob") != key_digest("user:alice@example.com")
    assert key_digest("user:bob") == key_digest("user:bob")
    assert key_digest("user:bob").startswith("blake2b:")
    assert len(key_digest("user:bob")) == len("blake2b:") + 16


def test_logging_hook_escapes_a_key_that_would_break_the_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A key with a line break is logged quoted and escaped, still on one line."""
    lines = logged_by(LoggingHook(), caplog, [Hit("city:Oslo\nhit key=forged")])
    assert lines == ["hit key='city:Oslo\\nhit key=forged'"]


def test_logging_hook_uses_the_given_logger_level_and_record_attributes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Lines go to the given logger at the given level, with the event and key attached."""
    logger = logging.getLogger("myapp.cache")
    hook = LoggingHook(logger, logging.INFO)
    with caplog.at_level(logging.INFO, logger="myapp.cache"):
        hook(Timeout("k", 1.0, "raise"))
    (record,) = caplog.records
    assert (record.name, record.levelno) == ("myapp.cache", logging.INFO)
    assert record.stampede_guard_event == "timeout"  # type: ignore[attr-defined]
    assert record.stampede_guard_key == "k"  # type: ignore[attr-defined]
    assert "level='INFO'" in repr(hook)


def test_logging_hook_below_the_loggers_level_logs_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A DEBUG hook on a logger set to INFO drops every event."""
    with caplog.at_level(logging.INFO, logger="stampede_guard.events"):
        LoggingHook()(Hit("k"))
    assert caplog.records == []


def test_logging_hook_rejects_a_level_that_is_not_an_int() -> None:
    """level must be a logging level number."""
    with pytest.raises(TypeError, match="level"):
        LoggingHook(level="DEBUG")  # type: ignore[arg-type]
