"""Freshness survives a step of the host's clock, and skew between hosts."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from stampede_guard import Backend, RedisBackend, cached_stampede_safe
from stampede_guard._clock import StepFreeClock
from stampede_guard.metrics import Event, Refresh

pytestmark = pytest.mark.timeout(30)

TTL = 0.3
HOUR = 3600.0


def test_a_step_of_the_hosts_clock_moves_no_freshness_clock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = StepFreeClock()
    before = clock()
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() - HOUR)
    assert 0 <= clock() - before < 60


def test_the_clock_follows_the_server_but_not_a_late_reply() -> None:
    clock = StepFreeClock()
    server = (clock() + 100) * 1e6
    clock.learn(int(server))  # the first: taken, however far off the host is
    assert abs(clock() - server / 1e6) < 1
    at = clock()
    clock.learn(int((at - 0.5) * 1e6))  # a reply that took half a second to read
    assert clock() >= at
    clock.learn(int((at - 10) * 1e6))  # the server's clock was stepped back
    assert clock() < at - 5
    back = clock()
    clock.learn(int((back + 3) * 1e6))  # forward: always taken
    assert clock() >= back + 2.9


def _refreshes(events: list[Event]) -> list[str]:
    return [e.reason for e in events if isinstance(e, Refresh)]


def test_stale_while_revalidate_survives_the_clock_stepped_back_an_hour(
    make_backend: Callable[[], Backend], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stepped back, the host's clock made every entry look an hour younger: served
    as fresh, never refreshed, until Redis dropped it (an ordinary miss)."""
    backend = make_backend()
    events: list[Event] = []
    computed: list[int] = []

    @cached_stampede_safe(
        key="swr",
        backend=backend,
        ttl=TTL,
        lock_timeout=TTL,
        stale_ttl=60,
        background_refresh=False,
        metrics=events.append,
    )
    def f() -> int:
        computed.append(len(computed))
        return len(computed)

    assert f() == 1
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() - HOUR)
    time.sleep(TTL * 1.5)  # past ttl, well within the stale window
    assert f() == 2, "past its ttl: refreshed by this caller (background_refresh=False)"
    assert _refreshes(events) == ["stale"]
    assert f() == 2
    assert computed == [0, 1]


@pytest.mark.redis
def test_a_host_an_hour_ahead_stamps_entries_by_the_servers_clock(
    redis_url: str, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Skew between hosts: one host's clock is an hour ahead. Its entries used to
    look an hour younger to every other host, so they were never refreshed."""
    real = time.time
    right = RedisBackend.from_url(redis_url, prefix=redis_prefix)
    monkeypatch.setattr(time, "time", lambda: real() + HOUR)
    ahead = RedisBackend.from_url(redis_url, prefix=redis_prefix)
    events: list[Event] = []

    def cached(backend: RedisBackend, value: str) -> Callable[[], str]:
        @cached_stampede_safe(
            key="skew",
            backend=backend,
            ttl=TTL,
            lock_timeout=TTL,
            stale_ttl=60,
            background_refresh=False,
            metrics=events.append,
        )
        def f() -> str:
            return value

        return f

    try:
        assert cached(ahead, "from the host ahead")() == "from the host ahead"
        monkeypatch.setattr(time, "time", real)
        time.sleep(TTL * 1.5)  # past ttl on the server's clock, within the stale window
        reader = cached(right, "from the right host")
        assert reader() == "from the right host", "past its ttl: refreshed"
        assert _refreshes(events) == ["stale"]
    finally:
        ahead.close()
        right.close()
