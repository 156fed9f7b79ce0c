"""A Redis shared with other teams: someone flushes it, or pauses it, mid-stampede."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from _servers import Server
from stampede_guard import RedisBackend, cached_stampede_safe

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]

CALLERS = 8


def test_a_flush_mid_stampede_serves_every_caller_and_leaves_no_lock(
    own_server: Server,
) -> None:
    """FLUSHALL while the leader computes drops its lock: a waiter may compute again
    (the documented duplicate), but every caller gets a value and no lock is left."""
    backends = [RedisBackend.from_url(own_server.url, prefix="team") for _ in range(2)]
    admin = own_server.client()
    computing = threading.Event()
    flushed = threading.Event()
    computed: list[int] = []
    mutex = threading.Lock()

    def make(backend: RedisBackend) -> Callable[[], int]:
        @cached_stampede_safe(key="report", backend=backend, lock_timeout=5)
        def report() -> int:
            with mutex:
                computed.append(len(computed))
                n = len(computed)
            if n == 1:
                computing.set()
                assert flushed.wait(10)
            return n

        return report

    functions = [make(b) for b in backends]  # two "processes"
    try:
        with ThreadPoolExecutor(CALLERS) as pool:
            calls = [pool.submit(functions[i % 2]) for i in range(CALLERS)]
            assert computing.wait(10)
            admin.flushall()
            flushed.set()
            results = [call.result(timeout=30) for call in calls]
        assert set(results) <= set(range(1, len(computed) + 1))
        assert 1 <= len(computed) <= 3, "at most the flushed lock's duplicates"
        assert not list(admin.scan_iter(match="team:*:l:*"))
        assert functions[0]() in results, "the stored value serves later calls"
    finally:
        for backend in backends:
            backend.close()
