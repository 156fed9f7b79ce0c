"""The Prometheus and OpenTelemetry exporters count the near cache's events.

Near hits are `Hit` events with ``near=True``, counted per function beside (and also
in) the hits; evictions, invalidations and flushes come from ``NearCache(metrics=)``
and carry that hook's own name. Fed directly, then once through a real near-cached
Redis backend whose one hook serves both the function and the near cache.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import get_args, get_type_hints

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import CollectorRegistry

from _waiting import until
from stampede_guard import NearCache, RedisBackend, cached_stampede_safe
from stampede_guard.contrib import _instruments as spec
from stampede_guard.contrib.opentelemetry import OpenTelemetryMetrics
from stampede_guard.contrib.prometheus import PrometheusMetrics
from stampede_guard.metrics import (
    Event,
    Hit,
    Miss,
    NearEvent,
    NearEviction,
    NearFlush,
    NearInvalidation,
)
from test_contrib import otel_points, otel_value, sample

REASONS = ("lost", "stopped", "fork")
NEAR_SERIES = (
    "near_hits_total",
    "near_evictions_total",
    "near_invalidations_total",
)

# Two remote hits, three near hits, and every near-cache event, once or more.
NEAR_EVENTS: list[Event | NearEvent] = [
    Hit("k"),
    Hit("k", near=False),
    *(Hit("k", near=True) for _ in range(3)),
    Miss("k"),
    *(NearEviction(f"k{i}") for i in range(4)),
    *(NearInvalidation(f"k{i}") for i in range(5)),
    NearFlush("lost", 7),
    NearFlush("lost", 0),
    NearFlush("stopped", 2),
    NearFlush("fork", 1),
]

pytestmark = pytest.mark.usefixtures("abandoned_connections_collected")


@pytest.fixture
def otel() -> Iterator[tuple[InMemoryMetricReader, MeterProvider]]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    yield reader, provider
    provider.shutdown()


def test_the_flush_label_values_are_every_flush_reason() -> None:
    """near_flushes is labelled by reason, with exactly the values NearFlush can carry."""
    assert spec.NEAR_FLUSHES.label == "reason"
    assert spec.NEAR_FLUSHES.values == get_args(get_type_hints(NearFlush)["reason"])
    assert spec.NEAR_FLUSHES.values == REASONS


# --- Prometheus ---------------------------------------------------------------------


def test_prometheus_counts_near_hits_within_hits_and_every_near_event() -> None:
    """Near hits are a subset of hits; evictions, invalidations, flushes by reason."""
    registry = CollectorRegistry()
    hook = PrometheusMetrics(registry=registry, name="weather")
    for event in NEAR_EVENTS:
        hook(event)

    def get(metric: str, **labels: str) -> float | None:
        return sample(registry, metric, name="weather", **labels)

    assert get("hits_total") == 5
    assert get("near_hits_total") == 3
    assert get("misses_total") == 1
    assert get("near_evictions_total") == 4
    assert get("near_invalidations_total") == 5
    assert get("near_flushes_total", reason="lost") == 2  # flushes, not entries
    assert get("near_flushes_total", reason="stopped") == 1
    assert get("near_flushes_total", reason="fork") == 1


def test_prometheus_near_series_are_exported_at_zero_before_any_event() -> None:
    """A new hook's near series exist at zero, one flush series per reason."""
    registry = CollectorRegistry()
    PrometheusMetrics(registry=registry)
    for metric in NEAR_SERIES:
        assert sample(registry, metric, name="") == 0
    for reason in REASONS:
        assert sample(registry, "near_flushes_total", name="", reason=reason) == 0


def test_prometheus_a_remote_hit_counts_in_hits_only() -> None:
    """Hit(near=False) leaves near_hits_total at zero: hits - near_hits are remote."""
    registry = CollectorRegistry()
    hook = PrometheusMetrics(registry=registry, name="f")
    hook(Hit("k"))
    hook(Hit("k", near=True))
    hits = sample(registry, "hits_total", name="f")
    near = sample(registry, "near_hits_total", name="f")
    assert (hits, near) == (2, 1)


def test_prometheus_near_events_carry_the_near_cache_hooks_name() -> None:
    """Hooks of one registry file near events under their own name: a function's hook
    given to NearCache too files them under the function; a hook of its own apart."""
    registry = CollectorRegistry()
    weather = PrometheusMetrics(registry=registry, name="weather")
    near = PrometheusMetrics(registry=registry, name="near")
    weather(Hit("weather:Oslo", near=True))
    weather(NearInvalidation("weather:Oslo"))
    near(NearEviction("rates:EUR"))
    near(NearFlush("lost", 3))
    assert sample(registry, "near_hits_total", name="weather") == 1
    assert sample(registry, "near_invalidations_total", name="weather") == 1
    assert sample(registry, "near_evictions_total", name="weather") == 0
    assert sample(registry, "near_evictions_total", name="near") == 1
    assert sample(registry, "near_flushes_total", name="near", reason="lost") == 1
    assert sample(registry, "near_invalidations_total", name="near") == 0


def test_prometheus_keeps_the_existing_series_and_their_labels() -> None:
    """The near counters are new families; hits_total keeps its one label, name."""
    registry = CollectorRegistry()
    PrometheusMetrics(registry=registry, name="f")(Hit("k", near=True))
    families = {family.name: family for family in registry.collect()}
    assert {
        "stampede_guard_near_hits",
        "stampede_guard_near_evictions",
        "stampede_guard_near_invalidations",
        "stampede_guard_near_flushes",
    } <= set(families)
    hits = [
        s for s in families["stampede_guard_hits"].samples if s.name.endswith("_total")
    ]
    assert [s.labels for s in hits] == [{"name": "f"}]
    labels = {
        name
        for family in families.values()
        for s in family.samples
        for name in s.labels
    }
    assert labels <= {"name", "outcome", "action", "reason", "le"}


# --- OpenTelemetry ------------------------------------------------------------------


def test_opentelemetry_records_near_hits_within_hits_and_every_near_event(
    otel: tuple[InMemoryMetricReader, MeterProvider],
) -> None:
    """The same counts as Prometheus, on the dotted instruments."""
    reader, provider = otel
    hook = OpenTelemetryMetrics(meter_provider=provider, name="weather")
    for event in NEAR_EVENTS:
        hook(event)
    points = otel_points(reader)

    def get(instrument: str, **attributes: str) -> float | None:
        return otel_value(points, instrument, name="weather", **attributes)

    assert get("hits") == 5
    assert get("near_hits") == 3
    assert get("misses") == 1
    assert get("near_evictions") == 4
    assert get("near_invalidations") == 5
    assert get("near_flushes", reason="lost") == 2
    assert get("near_flushes", reason="stopped") == 1
    assert get("near_flushes", reason="fork") == 1


def test_opentelemetry_an_unnamed_hook_records_near_events_without_a_name(
    otel: tuple[InMemoryMetricReader, MeterProvider],
) -> None:
    """A hook made without a name records only the reason attribute on a flush."""
    reader, provider = otel
    hook = OpenTelemetryMetrics(meter_provider=provider)
    hook(NearFlush("fork", 10))
    hook(NearEviction("k"))
    points = otel_points(reader)
    assert otel_value(points, "near_flushes", reason="fork") == 1
    assert otel_value(points, "near_evictions") == 1
    assert otel_value(points, "near_flushes", name="", reason="fork") is None


def test_opentelemetry_records_no_near_hit_for_a_remote_hit(
    otel: tuple[InMemoryMetricReader, MeterProvider],
) -> None:
    """Without a near cache, no near instrument gets a data point."""
    reader, provider = otel
    hook = OpenTelemetryMetrics(meter_provider=provider, name="f")
    hook(Hit("k"))
    hook(Miss("k"))
    points = otel_points(reader)
    assert otel_value(points, "hits", name="f") == 1
    assert not any(".near_" in instrument for instrument, _ in points)


# --- Through a real near cache ------------------------------------------------------


def test_one_hook_on_function_and_near_cache_counts_what_the_events_say(
    redis_url: str, redis_prefix: str
) -> None:
    """A hook given to the decorator and to NearCache counts every event it was sent,
    near hits and invalidations under the function's name, the close's flush too."""
    registry = CollectorRegistry()
    prometheus = PrometheusMetrics(registry=registry, name="weather")
    events: list[Event | NearEvent] = []
    lock = threading.Lock()

    def hook(event: Event | NearEvent) -> None:
        with lock:
            events.append(event)
        prometheus(event)

    backend = RedisBackend.from_url(
        redis_url, prefix=redis_prefix, near_cache=NearCache(ttl=30, metrics=hook)
    )

    @cached_stampede_safe(key="weather:{city}", backend=backend, ttl=60, metrics=hook)
    def get_weather(city: str) -> str:
        return city.upper()

    def get(metric: str, **labels: str) -> float:
        value = sample(registry, metric, name="weather", **labels)
        assert value is not None
        return value

    def counted(kind: type[object]) -> int:
        with lock:
            return sum(isinstance(e, kind) for e in events)

    try:
        until("a near hit", lambda: get_weather("Oslo") and get("near_hits_total"), 10)
        get_weather.invalidate("Oslo")
        until("the invalidation heard", lambda: get("near_invalidations_total"), 10)
    finally:
        backend.close()
    until("the close's flush", lambda: get("near_flushes_total", reason="stopped"), 10)
    with lock:
        hits = [e for e in events if isinstance(e, Hit)]
        flushed = [e for e in events if isinstance(e, NearFlush)]
    assert get("hits_total") == len(hits)
    assert get("near_hits_total") == sum(e.near for e in hits) >= 1
    assert get("hits_total") - get("near_hits_total") == sum(not e.near for e in hits)
    assert get("near_invalidations_total") == counted(NearInvalidation) >= 1
    assert get("near_evictions_total") == counted(NearEviction) == 0
    for reason in REASONS:
        assert get("near_flushes_total", reason=reason) == sum(
            e.reason == reason for e in flushed
        )
