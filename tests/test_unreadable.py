"""A poison entry is reported to the metrics hook of the call that meets it.

The codec that finds an entry unreadable sits below every decorated function sharing
its backend; the drivers tell it, through a context variable, whose hook to report to.
Every test plants the poison on a real redis-server.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint
from prometheus_client import CollectorRegistry

from stampede_guard import (
    AsyncRedisBackend,
    RedisBackend,
    SignedPickleSerializer,
    StampedeStats,
    cached_stampede_safe,
)
from stampede_guard.backends import Claim
from stampede_guard.backends.redis._codec import lock_key, value_key
from stampede_guard.contrib.logging import LoggingHook
from stampede_guard.contrib.opentelemetry import OpenTelemetryMetrics
from stampede_guard.contrib.prometheus import PrometheusMetrics
from stampede_guard.metrics import Computed, Event, Miss, UnreadableEntry
from stampede_guard.serializers import JsonSerializer, decode_entry

pytestmark = pytest.mark.timeout(30)

# A valid JSON envelope whose payload is nested 100,000 deep: json.loads recurses out.
DEEP_JSON = (
    b"SG\x01\x04json"
    + struct.pack("!dd", time.time(), 0.01)
    + b"[" * 100_000
    + b"]" * 100_000
)


def unreadable(events: list[Event]) -> list[UnreadableEntry]:
    return [e for e in events if isinstance(e, UnreadableEntry)]


def computed(events: list[Event]) -> int:
    return sum(isinstance(e, Computed) for e in events)


def assert_replaced(client: redis.Redis, prefix: str, key: str, value: object) -> None:
    """The stored entry of *key* is now *value*, readable; no lock is left."""
    stored = client.get(value_key(prefix, key))
    assert isinstance(stored, bytes)
    assert decode_entry(stored, JsonSerializer()).value == value
    assert client.exists(lock_key(prefix, key)) == 0


def stored_is(client: redis.Redis, prefix: str, key: str, value: object) -> bool:
    """Whether *key*'s stored entry reads as *value* and its lock is gone."""
    stored = client.get(value_key(prefix, key))
    if not isinstance(stored, bytes) or client.exists(lock_key(prefix, key)):
        return False
    try:
        return decode_entry(stored, JsonSerializer()).value == value
    except ValueError:
        return False


@pytest.fixture
def json_backend(redis_url: str, redis_prefix: str) -> Iterator[RedisBackend]:
    backend = RedisBackend.from_url(redis_url, prefix=redis_prefix)
    yield backend
    backend.close()


def test_a_poison_json_entry_is_reported_once_computed_once_and_replaced(
    json_backend: RedisBackend, redis_client: redis.Redis, redis_prefix: str
) -> None:
    """JSON nested 100,000 deep: one UnreadableEntry naming RecursionError, one computation."""
    events: list[Event] = []

    @cached_stampede_safe(key="doc", backend=json_backend, metrics=events.append)
    def doc() -> dict[str, int]:
        return {"n": 1}

    assert doc() == {"n": 1}
    redis_client.set(value_key(redis_prefix, "doc"), DEEP_JSON)
    events.clear()
    assert doc() == {"n": 1}
    assert unreadable(events) == [UnreadableEntry("doc", "RecursionError")]
    assert events.index(UnreadableEntry("doc", "RecursionError")) < events.index(
        Miss("doc")
    ), "reported before the miss it causes"
    assert computed(events) == 1
    assert_replaced(redis_client, redis_prefix, "doc", {"n": 1})
    events.clear()
    assert doc() == {"n": 1}
    assert unreadable(events) == []
    assert computed(events) == 0


def test_a_signed_pickle_of_a_class_that_is_gone_is_reported_by_its_exception_type(
    redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    """A poison pickle is reported as ModuleNotFoundError, computed once and replaced."""
    gone = types.ModuleType("stampede_guard_gone_for_metrics")

    class Old:
        pass

    Old.__module__ = gone.__name__
    Old.__qualname__ = "Old"
    gone.Old = Old  # type: ignore[attr-defined]
    sys.modules[gone.__name__] = gone
    serializer = SignedPickleSerializer(b"s" * 32)
    backend = RedisBackend.from_url(
        redis_url, prefix=redis_prefix, serializer=serializer
    )
    events: list[Event] = []
    calls = [0]

    @cached_stampede_safe(key="profile", backend=backend, metrics=events.append)
    def profile() -> object:
        calls[0] += 1
        return Old() if calls[0] == 1 else "fresh"

    try:
        try:
            assert isinstance(profile(), Old)
        finally:
            del sys.modules[gone.__name__]
        events.clear()
        assert profile() == "fresh"
        assert unreadable(events) == [UnreadableEntry("profile", "ModuleNotFoundError")]
        assert calls[0] == 2
        name = value_key(redis_prefix, "profile")
        stored = redis_client.get(name)
        assert isinstance(stored, bytes)
        assert decode_entry(stored, serializer, key=name).value == "fresh"
        assert redis_client.exists(lock_key(redis_prefix, "profile")) == 0
    finally:
        backend.close()


def test_an_asyncio_call_reports_a_poison_entry_once(
    redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    """The asyncio driver reports to the call's hook like the sync one."""
    events: list[Event] = []

    async def scenario() -> None:
        backend = AsyncRedisBackend.from_url(redis_url, prefix=redis_prefix)

        @cached_stampede_safe(key="doc", backend=backend, metrics=events.append)
        async def doc() -> dict[str, int]:
            return {"n": 2}

        try:
            assert await doc() == {"n": 2}
            redis_client.set(value_key(redis_prefix, "doc"), DEEP_JSON)
            events.clear()
            assert await doc() == {"n": 2}
        finally:
            await backend.aclose()

    asyncio.run(scenario())
    assert unreadable(events) == [UnreadableEntry("doc", "RecursionError")]
    assert computed(events) == 1
    assert_replaced(redis_client, redis_prefix, "doc", {"n": 2})


class PoisonAtLock(RedisBackend):
    """Plants the poison when a refresh takes the lock, so its double-check meets it."""

    client_for_poison: redis.Redis
    prefix_for_poison: str

    def lock(self, key: str, token: str, lock_ttl: float) -> Claim:
        self.client_for_poison.set(value_key(self.prefix_for_poison, key), DEEP_JSON)
        return super().lock(key, token, lock_ttl)


def test_a_background_refresh_reports_to_the_functions_hook(
    redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    """A refresh running in its own thread still reports what it meets to the hook."""
    backend = PoisonAtLock.from_url(redis_url, prefix=redis_prefix)
    assert isinstance(backend, PoisonAtLock)
    backend.client_for_poison = redis_client
    backend.prefix_for_poison = redis_prefix
    events: list[Event] = []
    seen = threading.Event()

    def hook(event: Event) -> None:
        events.append(event)
        if isinstance(event, UnreadableEntry):
            seen.set()

    calls = [0]

    @cached_stampede_safe(
        key="doc",
        backend=backend,
        ttl=0.2,
        lock_timeout=0.2,
        stale_ttl=30,
        metrics=hook,
    )
    def doc() -> int:
        calls[0] += 1
        return calls[0]

    try:
        assert doc() == 1
        time.sleep(0.3)  # stale now: the next call serves it and refreshes behind
        assert doc() == 1
        assert seen.wait(10), "the background refresh reported the poison"
        deadline = time.monotonic() + 10
        while not stored_is(redis_client, redis_prefix, "doc", 2):
            assert time.monotonic() < deadline, "the refresh stored its value"
            time.sleep(0.01)
        assert unreadable(events) == [UnreadableEntry("doc", "RecursionError")]
        assert calls[0] == 2
        assert_replaced(redis_client, redis_prefix, "doc", 2)
    finally:
        backend.close()


class AsyncPoisonAtLock(AsyncRedisBackend):
    """`PoisonAtLock` for asyncio."""

    client_for_poison: redis.Redis
    prefix_for_poison: str

    async def alock(self, key: str, token: str, lock_ttl: float) -> Claim:
        self.client_for_poison.set(value_key(self.prefix_for_poison, key), DEEP_JSON)
        return await super().alock(key, token, lock_ttl)


def test_an_asyncio_background_refresh_reports_to_the_functions_hook(
    redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    """A refresh running in a task of its own still reports what it meets to the hook."""
    events: list[Event] = []
    calls = [0]

    async def scenario() -> None:
        backend = AsyncPoisonAtLock.from_url(redis_url, prefix=redis_prefix)
        assert isinstance(backend, AsyncPoisonAtLock)
        backend.client_for_poison = redis_client
        backend.prefix_for_poison = redis_prefix

        @cached_stampede_safe(
            key="doc",
            backend=backend,
            ttl=0.2,
            lock_timeout=0.2,
            stale_ttl=30,
            metrics=events.append,
        )
        async def doc() -> int:
            calls[0] += 1
            return calls[0]

        try:
            assert await doc() == 1
            await asyncio.sleep(0.3)  # stale now: served, and refreshed behind
            assert await doc() == 1
            deadline = time.monotonic() + 10
            while not stored_is(redis_client, redis_prefix, "doc", 2):
                assert time.monotonic() < deadline, "the refresh stored its value"
                await asyncio.sleep(0.01)
        finally:
            await backend.aclose()

    asyncio.run(scenario())
    assert unreadable(events) == [UnreadableEntry("doc", "RecursionError")]
    assert calls[0] == 2


def test_a_call_without_a_hook_inside_one_with_a_hook_reports_to_neither(
    json_backend: RedisBackend, redis_client: redis.Redis, redis_prefix: str
) -> None:
    """An inner function's poison entry is never counted under the outer function."""
    events: list[Event] = []

    @cached_stampede_safe(key="inner", backend=json_backend)
    def inner() -> int:
        return 1

    @cached_stampede_safe(key="outer", backend=json_backend, metrics=events.append)
    def outer() -> int:
        return inner() + 1

    assert inner() == 1
    redis_client.set(value_key(redis_prefix, "inner"), DEEP_JSON)
    assert outer() == 2
    assert unreadable(events) == []
    assert_replaced(redis_client, redis_prefix, "inner", 1)


@pytest.fixture
def otel() -> Iterator[tuple[InMemoryMetricReader, MeterProvider]]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    yield reader, provider
    provider.shutdown()


def otel_sum(reader: InMemoryMetricReader, name: str) -> float:
    data = reader.get_metrics_data()
    assert data is not None
    return sum(
        point.value
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == name
        for point in metric.data.data_points
        if isinstance(point, NumberDataPoint)
    )


def test_every_exporter_counts_an_unreadable_entry(
    json_backend: RedisBackend,
    redis_client: redis.Redis,
    redis_prefix: str,
    otel: tuple[InMemoryMetricReader, MeterProvider],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """StampedeStats, Prometheus, OpenTelemetry and the logging hook each count it once."""
    reader, provider = otel
    registry = CollectorRegistry()
    stats = StampedeStats()
    hooks: list[Callable[[Event], Any]] = [
        stats,
        PrometheusMetrics(registry=registry),
        OpenTelemetryMetrics(meter_provider=provider),
        LoggingHook(),
    ]

    def every(event: Event) -> None:
        for hook in hooks:
            hook(event)

    @cached_stampede_safe(key="doc", backend=json_backend, metrics=every)
    def doc() -> int:
        return 1

    doc()
    redis_client.set(value_key(redis_prefix, "doc"), DEEP_JSON)
    with caplog.at_level(logging.DEBUG, logger="stampede_guard.events"):
        doc()
    assert stats.snapshot().unreadable_entries == 1
    assert stats.snapshot().computations == 2
    assert (
        registry.get_sample_value(
            "stampede_guard_unreadable_entries_total", {"name": ""}
        )
        == 1
    )
    assert otel_sum(reader, "stampede_guard.unreadable_entries") == 1
    lines = [
        r.getMessage() for r in caplog.records if r.name == "stampede_guard.events"
    ]
    assert lines.count("unreadable_entry key=doc reason=RecursionError") == 1
