"""Redis Sentinel: `from_sentinel` against a real master, replica and sentinel.

The servers are private loopback processes started by this module and stopped by pid.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from _load import Load
from _servers import (
    SentinelSet,
    Server,
    start_sentinels,
    wait_for,
)
from stampede_guard import AsyncRedisBackend, BackendError, RedisBackend
from stampede_guard.testing import AsyncBackendContract, BackendContract

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(60)]

SERVICE = "sgmaster"


def _start_sentinels(workdir: Path) -> SentinelSet:
    return start_sentinels(workdir, SERVICE)


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[SentinelSet]:
    """Return a Sentinel set of this test's own, which it may break."""
    watching = _start_sentinels(tmp_path)
    yield watching
    watching.stop()


@pytest.fixture(scope="module")
def steady_sentinels(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[SentinelSet]:
    """Return a Sentinel set shared by this module's tests that do not break it."""
    watching = _start_sentinels(tmp_path_factory.mktemp("sentinels"))
    yield watching
    watching.stop()


@pytest.fixture
def prefix() -> str:
    """Return a key prefix of this test's own."""
    return f"t{uuid.uuid4().hex[:8]}"


class TestSentinelBackendContract(BackendContract):
    """The backend contract, on the master a sentinel names."""

    @pytest.fixture
    def backend(
        self, steady_sentinels: SentinelSet, prefix: str
    ) -> Iterator[RedisBackend]:
        backend = RedisBackend.from_sentinel(
            [steady_sentinels.address], SERVICE, prefix=prefix
        )
        yield backend
        backend.close()


class TestAsyncSentinelBackendContract(AsyncBackendContract):
    """The async backend contract, on the master a sentinel names."""

    @pytest.fixture
    def backend(self, steady_sentinels: SentinelSet, prefix: str) -> AsyncRedisBackend:
        return AsyncRedisBackend.from_sentinel(
            [("127.0.0.1", steady_sentinels.sentinel.port)], SERVICE, prefix=prefix
        )


def _is_master(server: Server) -> bool:
    with server.client() as client:
        return bool(client.info("replication").get("role") == "master")


def test_from_sentinel_finds_the_master_and_caches_there(
    sentinels: SentinelSet,
) -> None:
    """from_sentinel asks the sentinel for the master and stores values on it."""
    backend = RedisBackend.from_sentinel([sentinels.address], SERVICE, prefix="s")
    try:
        client = backend.client
        assert isinstance(client, redis.Redis)
        assert client.connection_pool.connection_kwargs["socket_timeout"] == 1.0
        assert backend.get_or_lock("k", "token", 5) == "token"
        assert (
            repr(backend) == f"RedisBackend(sentinel service {SERVICE!r}, prefix='s')"
        )
        with sentinels.master.client() as master:
            assert master.dbsize() == 1
    finally:
        backend.close()


def test_async_from_sentinel_finds_the_master(sentinels: SentinelSet) -> None:
    """AsyncRedisBackend.from_sentinel does the same for asyncio code."""

    async def main() -> object:
        backend = AsyncRedisBackend.from_sentinel(
            [("127.0.0.1", sentinels.sentinel.port)], SERVICE, prefix="s"
        )
        try:
            return await backend.aget_or_lock("k", "token", 5)
        finally:
            await backend.aclose()

    assert asyncio.run(main()) == "token"


def _probe(backend: RedisBackend, n: int) -> bool:
    try:
        return backend.get_or_lock(f"probe{n}", "token", 5) == "token"
    except BackendError:
        return False


def test_a_failover_under_load_serves_no_wrong_value(sentinels: SentinelSet) -> None:
    """The master is killed mid-load: callers get right values or BackendError, then the new master."""
    prefix = f"t{uuid.uuid4().hex[:8]}"
    made = [
        RedisBackend.from_sentinel([sentinels.address], SERVICE, prefix=prefix)
        for _ in range(2)
    ]
    keys = [f"key:{n}" for n in range(4)]
    try:
        with Load(made, keys, threads=3) as load:
            load.until_more(served=50)  # under way
            sentinels.master.kill()
            wait_for("the replica's promotion", lambda: _is_master(sentinels.replica))
            served_at_promotion = load.tally.served
            # Values served, and every key computed again, by the new master.
            load.until_more(served=50, computed=len(keys))
        tally = load.tally
        assert tally.wrong == []
        assert set(tally.errors) <= {"BackendError"}
        assert tally.served > served_at_promotion  # the new master serves
        # A lock lost with the old master can cost one duplicate computation, no more.
        assert max(tally.most_at_once.values()) <= 2
        # The backends now talk to the promoted replica (a pooled connection to the
        # dead master may still fail once or twice before the pool drops it).
        for n, backend in enumerate(made):
            wait_for(
                "the backend to reach the new master",
                lambda n=n, backend=backend: _probe(backend, n),
            )
        with sentinels.replica.client() as new_master:
            assert len(list(new_master.scan_iter(f"{prefix}:*:l:probe*"))) == len(made)
        print(
            f"sentinel failover: {sum(tally.errors.values())} BackendErrors, {tally.served} served"
        )
    finally:
        for backend in made:
            backend.close()
