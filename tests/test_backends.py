"""The backend contracts (`stampede_guard.testing`) on every backend, sync and async."""

from __future__ import annotations

from collections.abc import Iterator

import fakeredis
import pytest

from stampede_guard import (
    AsyncBackend,
    AsyncRedisBackend,
    Backend,
    MemoryBackend,
    RedisBackend,
)
from stampede_guard.testing import AsyncBackendContract, BackendContract


class TestMemoryBackend(BackendContract):
    """The in-memory backend keeps the contract."""

    @pytest.fixture
    def backend(self) -> Backend:
        return MemoryBackend()


class TestAsyncMemoryBackend(AsyncBackendContract):
    """The in-memory backend's async face keeps the async contract."""

    @pytest.fixture
    def backend(self) -> AsyncBackend:
        return MemoryBackend()


class TestRedisBackendOnFakeRedis(BackendContract):
    """The Redis backend keeps the contract on fakeredis (its Lua runs on lupa)."""

    @pytest.fixture
    def backend(self) -> Iterator[Backend]:
        client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
        yield RedisBackend(client, prefix="contract")
        client.close()


class TestRedisBackendOnRedisServer(BackendContract):
    """The Redis backend keeps the contract on a real redis-server."""

    @pytest.fixture
    def backend(self, redis_backend: RedisBackend) -> Backend:
        return redis_backend


class TestAsyncRedisBackendOnRedisServer(AsyncBackendContract):
    """The asyncio Redis backend keeps the async contract on a real redis-server.

    The contract closes the backend at the end of each test, in that test's loop.
    """

    @pytest.fixture
    def backend(self, redis_url: str, redis_prefix: str) -> AsyncBackend:
        return AsyncRedisBackend.from_url(redis_url, prefix=redis_prefix)
