"""The backend contract (`stampede_guard.testing.BackendContract`) on every backend."""

from __future__ import annotations

from collections.abc import Iterator

import fakeredis
import pytest

from stampede_guard import Backend, MemoryBackend, RedisBackend
from stampede_guard.testing import BackendContract


class TestMemoryBackend(BackendContract):
    """The in-memory backend keeps the contract."""

    @pytest.fixture
    def backend(self) -> Backend:
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
