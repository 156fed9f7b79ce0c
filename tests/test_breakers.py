"""One circuit breaker per server, refused writes, and a store that stalls: real servers."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio

from _proxy import Proxy
from _servers import Server, binary, free_port, start_data_server
from stampede_guard import (
    AsyncRedisBackend,
    BackendError,
    Entry,
    RedisBackend,
    cached_stampede_safe,
)
from stampede_guard._breaker import CircuitBreaker
from stampede_guard.metrics import BackendFailed, BackendSkipped, Event

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]


def closed_port_url() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"


@pytest.fixture
def replica(tmp_path: Path) -> Iterator[Server]:
    """A redis-server that reads but refuses writes: the replica of a master that is gone."""
    server = start_data_server(
        binary("redis-server"), tmp_path, "--replicaof", "127.0.0.1", str(free_port())
    )
    yield server
    server.stop()


@pytest.fixture
def full_server(tmp_path: Path) -> Iterator[Server]:
    """A redis-server out of memory under ``noeviction``: reads work, writes are refused."""
    server = start_data_server(
        binary("redis-server"), tmp_path, "--maxmemory-policy", "noeviction"
    )
    server.client().config_set("maxmemory", "1")
    yield server
    server.stop()


def test_fifty_functions_on_one_dead_server_share_one_breaker() -> None:
    """The breaker is the backend's: 5 failures in all open it for every function."""
    backend = RedisBackend.from_url(closed_port_url())
    events: list[Event] = []
    functions = []
    for n in range(50):

        @cached_stampede_safe(key=f"f{n}:{{x}}", backend=backend, metrics=events.append)
        def f(x: int, n: int = n) -> int:
            return x + n

        functions.append(f)

    assert [f(1) for f in functions] == [1 + n for n in range(50)]
    failed = sum(isinstance(e, BackendFailed) for e in events)
    skipped = sum(isinstance(e, BackendSkipped) for e in events)
    assert (failed, skipped) == (5, 45)
    assert backend.breaker_for("f0:1") is backend.breaker_for("f49:1")
    backend.close()


def test_breaker_thresholds_are_backend_options() -> None:
    backend = RedisBackend.from_url(closed_port_url(), breaker_failures=2)
    events: list[Event] = []

    @cached_stampede_safe(key="k:{x}", backend=backend, metrics=events.append)
    def f(x: int) -> int:
        return x

    assert [f(i) for i in range(6)] == list(range(6))
    assert sum(isinstance(e, BackendFailed) for e in events) == 2
    assert sum(isinstance(e, BackendSkipped) for e in events) == 4
    backend.close()


@pytest.mark.parametrize(
    ("options", "names"),
    [
        ({"breaker_failures": 0}, "breaker_failures"),
        ({"breaker_failures": 2.5}, "breaker_failures"),
        ({"breaker_reset": 0}, "breaker_reset"),
        ({"breaker_reset": float("nan")}, "breaker_reset"),
        ({"breaker_reset": 1e9}, "breaker_reset"),
    ],
)
def test_bad_breaker_options_are_refused_at_construction(
    options: dict[str, float], names: str
) -> None:
    with pytest.raises(ValueError, match=names):
        RedisBackend.from_url(closed_port_url(), **options)  # type: ignore[arg-type]


def test_a_half_open_breaker_lets_one_probe_through_at_a_time() -> None:
    now = [0.0]
    breaker = CircuitBreaker(failures=1, reset_after=5.0, clock=lambda: now[0])
    breaker.failed()
    assert not breaker.allow()
    now[0] = 5.0
    assert breaker.allow(), "the first call after the pause probes"
    assert not breaker.allow(), "a second caller does not probe at the same time"
    breaker.failed()  # the probe failed: another pause
    now[0] = 9.0
    assert not breaker.allow()
    now[0] = 10.0
    assert breaker.allow()
    breaker.succeeded()
    assert breaker.allow()
    assert breaker.allow()
    assert not breaker.open


def test_a_probe_that_never_reports_does_not_keep_the_circuit_open() -> None:
    """A probing call cancelled before it learned anything: another probes later."""
    now = [0.0]
    breaker = CircuitBreaker(failures=1, reset_after=5.0, clock=lambda: now[0])
    breaker.failed()
    now[0] = 5.0
    assert breaker.allow()  # the probe, which is then cancelled: no report
    now[0] = 9.9
    assert not breaker.allow()
    now[0] = 10.0
    assert breaker.allow(), "a new probe after another pause"


@pytest.mark.parametrize("server_fixture", ["replica", "full_server"])
def test_refused_writes_open_the_breaker_and_are_logged_once_with_the_reason(
    server_fixture: str,
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """READONLY or OOM: reads work, writes do not; the breaker still opens."""
    server: Server = request.getfixturevalue(server_fixture)
    backend = RedisBackend.from_url(server.url)
    events: list[Event] = []
    calls = 0

    @cached_stampede_safe(key="w:{city}", backend=backend, metrics=events.append)
    def weather(city: str) -> str:
        nonlocal calls
        calls += 1
        return city.upper()

    with caplog.at_level(logging.DEBUG, logger="stampede_guard"):
        assert [weather("oslo") for _ in range(20)] == ["OSLO"] * 20
    failures = [e for e in events if isinstance(e, BackendFailed)]
    assert len(failures) == 5, "refused writes count as failures: the circuit opens"
    assert sum(isinstance(e, BackendSkipped) for e in events) == 15
    reason = "READONLY" if server_fixture == "replica" else "OOM"
    for event in failures:
        assert isinstance(event.error, BackendError)
        assert event.error.refused is not None
        assert event.error.refused.startswith(reason)
        assert event.error.server == f"127.0.0.1:{server.port}"
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    refusals = [r for r in warnings if "refuses writes" in r.getMessage()]
    assert len(refusals) == 1
    assert reason in refusals[0].getMessage()
    assert f"127.0.0.1:{server.port}" in refusals[0].getMessage()
    opened = [r for r in warnings if "calls skip it" in r.getMessage()]
    assert len(opened) == 1
    # Only the first refusal is a warning; the other failed calls log at debug.
    per_call = [r for r in warnings if "computing without it" in r.getMessage()]
    assert len(per_call) == 0
    assert calls == 20
    backend.close()


def test_hits_are_served_while_writes_are_refused(full_server: Server) -> None:
    """Values stored before the server filled up are hits; misses compute, uncached."""
    admin = full_server.client()
    admin.config_set("maxmemory", "0")
    backend = RedisBackend.from_url(full_server.url)
    calls: list[int] = []

    @cached_stampede_safe(key="k:{x}", backend=backend)
    def f(x: int) -> int:
        calls.append(x)
        return x

    assert [f(x) for x in range(3)] == [0, 1, 2]
    admin.config_set("maxmemory", "1")
    calls.clear()
    for _ in range(3):
        assert [f(x) for x in range(6)] == list(range(6))
    assert calls == [3, 4, 5] * 3, "the stored ones are hits, the others computed"
    backend.close()


class Recording(RedisBackend):
    """A RedisBackend that records which thread stored and released each lock."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.stored_by: list[str] = []
        self.released_by: list[str] = []
        self.released = threading.Event()

    def set_and_unlock(self, *args: object, **kwargs: object) -> Entry | None:
        self.stored_by.append(threading.current_thread().name)
        return super().set_and_unlock(*args, **kwargs)  # type: ignore[arg-type]

    def unlock(self, key: str, token: str) -> bool:
        self.released_by.append(threading.current_thread().name)
        try:
            return super().unlock(key, token)
        finally:
            self.released.set()


def test_a_stalled_store_costs_the_leaders_caller_one_socket_timeout(
    own_server: Server,
) -> None:
    """CLIENT PAUSE WRITE during the computation: the store times out, and the caller
    returns without also waiting for the release (sent from another thread)."""
    backend = Recording(
        redis.Redis.from_url(own_server.url, socket_timeout=0.5), prefix="stall"
    )
    admin = own_server.client()
    events: list[Event] = []

    @cached_stampede_safe(key="k", backend=backend, metrics=events.append)
    def f() -> int:
        admin.client_pause(20000, all=False)
        return 7

    try:
        assert f() == 7
        caller = threading.current_thread().name
        assert backend.stored_by == [caller]
        assert any(isinstance(e, BackendFailed) for e in events)
        assert backend.released.wait(10), "the release is still sent"
        assert caller not in backend.released_by
    finally:
        admin.client_unpause()
        backend.close()


def test_a_stalled_store_with_raise_still_releases_apart(own_server: Server) -> None:
    backend = Recording(
        redis.Redis.from_url(own_server.url, socket_timeout=0.5), prefix="stall"
    )
    admin = own_server.client()

    @cached_stampede_safe(key="k", backend=backend, on_backend_error="raise")
    def f() -> int:
        admin.client_pause(20000, all=False)
        return 7

    try:
        with pytest.raises(BackendError):
            f()
        assert backend.released.wait(10)
        assert threading.current_thread().name not in backend.released_by
    finally:
        admin.client_unpause()
        backend.close()


def test_a_stalled_store_releases_apart_in_asyncio_too(own_server: Server) -> None:
    released: list[asyncio.Task[object] | None] = []

    class AsyncRecording(AsyncRedisBackend):
        async def aunlock(self, key: str, token: str) -> bool:
            released.append(asyncio.current_task())
            return await super().aunlock(key, token)

    async def main() -> None:
        backend = AsyncRecording(
            redis.asyncio.Redis.from_url(own_server.url, socket_timeout=0.5),
            prefix="stall",
        )
        admin = redis.asyncio.Redis.from_url(own_server.url)

        @cached_stampede_safe(key="k", backend=backend)
        async def f() -> int:
            await admin.client_pause(20000, all=False)
            return 7

        try:
            assert await f() == 7
            caller = asyncio.current_task()
            for _ in range(500):  # the release task starts after the caller returned
                if released:
                    break
                await asyncio.sleep(0.01)
            assert released, "the release is still sent"
            assert released[0] is not caller
        finally:
            await admin.client_unpause()
            await asyncio.sleep(0)  # let the release task finish or fail
            await backend.aclose()
            await admin.aclose()

    asyncio.run(main())


def test_a_black_holed_store_costs_the_leaders_caller_one_socket_timeout(
    proxy: Proxy, redis_client: redis.Redis, redis_prefix: str
) -> None:
    """The connection stops answering without closing while the leader computes: the
    store times out once, the caller returns, and the release goes apart on a new
    connection, so no lock is left behind for its lease."""
    backend = Recording.from_url(proxy.url(), socket_timeout=0.5, prefix=redis_prefix)
    events: list[Event] = []

    @cached_stampede_safe(key="k", backend=backend, metrics=events.append)
    def f() -> int:
        assert proxy.blackhole() >= 1  # the connection the lock was taken on
        return 7

    try:
        assert f() == 7
        caller = threading.current_thread().name
        assert backend.stored_by == [caller]
        assert any(isinstance(e, BackendFailed) for e in events)
        assert backend.released.wait(10), "the release is still sent"
        assert caller not in backend.released_by
        assert not list(redis_client.scan_iter(match=f"{redis_prefix}:*:l:*"))
    finally:
        backend.close()
