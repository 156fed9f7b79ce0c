"""The peers: stampede_guard and each library's documented stampede-protected call.

Every peer wraps the same cached function (``compute(k)``, given by the harness) and
exposes ``call(k)``, ``prewarm(n)`` (check *n* connections out of its pool and back,
so connection set-up is not measured) and a close method. Shared settings (see
perf-anchors §1): value TTL 900 s, lock timeout/lease 10 s, connection pools capped
at 2048 (redis-py's default pool stops at 100 connections and then raises
``MaxConnectionsError``), keys ``bench:<k>``.

The peer libraries are imported only inside the builder that needs them, so a missing
library makes its peer *skipped*, not the run.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, cast
from urllib.parse import urlparse

import redis
import redis.asyncio
import redis.asyncio.connection
import redis.connection

from common import LOCK_TIMEOUT_S, POOL_MAX, TTL_S, value_key

__all__ = [
    "PEERS",
    "AsyncCompute",
    "AsyncPeer",
    "PeerInfo",
    "SyncCompute",
    "SyncPeer",
    "make_async_peer",
    "make_sync_peer",
    "skip_reason",
]

Value = dict[str, object]
SyncCompute = Callable[[str], Value]
AsyncCompute = Callable[[str], Awaitable[Value]]
Kind = Literal["sync", "async"]


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """A peer: its name, whether it is sync or async, and what it needs installed."""

    name: str
    kind: Kind
    modules: tuple[str, ...]
    uses_redis: bool
    summary: str


PEERS: dict[str, PeerInfo] = {
    p.name: p
    for p in (
        PeerInfo(
            "naive", "sync", (), uses_redis=True, summary="GET; miss: compute, SET EX"
        ),
        PeerInfo(
            "reference",
            "sync",
            (),
            uses_redis=True,
            summary="textbook lock-and-poll: SET NX PX lock, double-check, CAS release; waiters poll 0.1*2^n x5",
        ),
        PeerInfo(
            "dogpile",
            "sync",
            ("dogpile.cache",),
            uses_redis=True,
            summary="dogpile.cache.redis, distributed_lock, @cache_on_arguments",
        ),
        PeerInfo(
            "redis_lock",
            "sync",
            ("redis_lock",),
            uses_redis=True,
            summary="python-redis-lock around cache-aside",
        ),
        PeerInfo(
            "stampede_guard",
            "sync",
            ("stampede_guard",),
            uses_redis=True,
            summary="@cached_stampede_safe, RedisBackend.from_url",
        ),
        PeerInfo(
            "naive_async",
            "async",
            (),
            uses_redis=True,
            summary="naive on redis.asyncio",
        ),
        PeerInfo(
            "reference_async",
            "async",
            (),
            uses_redis=True,
            summary="reference on redis.asyncio",
        ),
        PeerInfo(
            "aiocache",
            "async",
            ("aiocache",),
            uses_redis=True,
            summary="@cached_stampede(lease=10), Cache.REDIS, JsonSerializer",
        ),
        PeerInfo(
            "cashews",
            "async",
            ("cashews",),
            uses_redis=True,
            summary="@cache(ttl=900, key=..., lock=True)",
        ),
        PeerInfo(
            "stampede_guard_async",
            "async",
            ("stampede_guard",),
            uses_redis=True,
            summary="@cached_stampede_safe on async def, AsyncRedisBackend.from_url",
        ),
        # In-process only (no Redis): opt in with --peers.
        PeerInfo(
            "stampede_guard_mem",
            "sync",
            ("stampede_guard",),
            uses_redis=False,
            summary="@cached_stampede_safe, MemoryBackend (one process)",
        ),
        PeerInfo(
            "stampede_guard_mem_async",
            "async",
            ("stampede_guard",),
            uses_redis=False,
            summary="@cached_stampede_safe on async def, MemoryBackend",
        ),
    )
}

DEFAULT_PEERS = tuple(name for name, p in PEERS.items() if p.uses_redis)


def skip_reason(name: str) -> str | None:
    """Return why peer *name* cannot run here (a library is missing), or None."""
    for module in PEERS[name].modules:
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - any import failure skips the peer
            return f"{module} not importable ({type(exc).__name__}: {exc})"
    return None


class SyncPeer(Protocol):
    """A sync peer, built by `make_sync_peer`."""

    def call(self, k: str) -> object:
        """Return the value of *k*, through the peer's stampede protection."""

    def prewarm(self, n: int) -> None:
        """Open *n* pooled connections now, so the stampede does not."""

    def close(self) -> None:
        """Release connections."""


class AsyncPeer(Protocol):
    """An async peer, built by `make_async_peer` inside the event loop it runs in."""

    async def call(self, k: str) -> object:
        """Return the value of *k*, through the peer's stampede protection."""

    async def prewarm(self, n: int) -> None:
        """Open *n* pooled connections now, so the stampede does not."""

    async def aclose(self) -> None:
        """Release connections."""


# --- pools -----------------------------------------------------------------------


def sync_pool(url: str) -> redis.ConnectionPool:
    """Return a redis-py pool capped at POOL_MAX connections."""
    return redis.ConnectionPool.from_url(url, max_connections=POOL_MAX)


def async_pool(url: str) -> redis.asyncio.ConnectionPool:
    """Return a redis.asyncio pool capped at POOL_MAX connections."""
    return redis.asyncio.ConnectionPool.from_url(url, max_connections=POOL_MAX)


def prewarm_sync_pool(pool: redis.ConnectionPool, n: int) -> None:
    """Check *n* connections out of *pool* (connecting them) and give them back."""
    get = cast("Callable[[], redis.connection.Connection]", pool.get_connection)
    conns = [get() for _ in range(n)]
    for conn in conns:
        pool.release(conn)


async def prewarm_async_pool(pool: redis.asyncio.ConnectionPool, n: int) -> None:
    """Check *n* connections out of *pool* (connecting them) and give them back."""
    get = cast(
        "Callable[[], Awaitable[redis.asyncio.connection.Connection]]",
        pool.get_connection,
    )
    conns = [await get() for _ in range(n)]
    for conn in conns:
        await pool.release(conn)


# --- naive and the quick-reference algorithm, written here ------------------------

# Compare-and-delete: release the lock only if it still holds our token.
RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""
BASE_DELAY_S = 0.1
MAX_RETRIES = 5


def lock_key(k: str) -> str:
    """Return the Redis key of the reference algorithm's lock for *k*."""
    return f"bench:lock:{k}"


class Naive:
    """Cache-aside with no protection: GET; on a miss compute and SET EX."""

    def __init__(self, url: str, compute: SyncCompute) -> None:
        self.pool = sync_pool(url)
        self.r = redis.Redis(connection_pool=self.pool)
        self.compute = compute

    def call(self, k: str) -> object:
        """Return the value of *k*."""
        raw = self.r.get(value_key(k))
        if raw is not None:
            return json.loads(cast("bytes", raw))
        value = self.compute(k)
        self.r.set(value_key(k), json.dumps(value), ex=TTL_S)
        return value

    def prewarm(self, n: int) -> None:
        """Open *n* connections."""
        prewarm_sync_pool(self.pool, n)

    def close(self) -> None:
        """Close the pool."""
        self.pool.disconnect()


class Reference(Naive):
    """The textbook lock-and-poll algorithm, sync: what most hand-written guards do.

    GET; on a miss ``SET lock token NX PX``; the holder double-checks with GET,
    computes, SETs and releases with a compare-and-delete script. A caller that
    does not get the lock sleeps 0.1, 0.2, 0.4, 0.8, 1.6 s; after each sleep it GETs
    and, on a miss, tries the lock again. After the fifth it computes without the
    lock (fail open).
    """

    def __init__(self, url: str, compute: SyncCompute) -> None:
        super().__init__(url, compute)
        self.release = self.r.register_script(RELEASE_LUA)

    def _get(self, k: str) -> object | None:
        raw = self.r.get(value_key(k))
        return None if raw is None else json.loads(cast("bytes", raw))

    def _compute_and_set(self, k: str) -> object:
        value = self.compute(k)
        self.r.set(value_key(k), json.dumps(value), ex=TTL_S)
        return value

    def _try_lead(self, k: str) -> tuple[bool, object | None]:
        token = secrets.token_hex(16)
        if not self.r.set(lock_key(k), token, nx=True, px=LOCK_TIMEOUT_S * 1000):
            return False, None
        try:
            value = self._get(k)  # double-check: another holder may have finished
            if value is None:
                value = self._compute_and_set(k)
            return True, value
        finally:
            self.release(keys=[lock_key(k)], args=[token])

    def call(self, k: str) -> object:
        """Return the value of *k*."""
        value = self._get(k)
        if value is not None:
            return value
        led, value = self._try_lead(k)
        if led:
            return value
        for retry in range(MAX_RETRIES):
            time.sleep(BASE_DELAY_S * 2**retry)
            value = self._get(k)
            if value is not None:
                return value
            if retry < MAX_RETRIES - 1:
                led, value = self._try_lead(k)
                if led:
                    return value
        return self._compute_and_set(k)  # fail open


class NaiveAsync:
    """`Naive` on redis.asyncio."""

    def __init__(self, url: str, compute: AsyncCompute) -> None:
        self.pool = async_pool(url)
        self.r = redis.asyncio.Redis(connection_pool=self.pool)
        self.compute = compute

    async def call(self, k: str) -> object:
        """Return the value of *k*."""
        raw = await self.r.get(value_key(k))
        if raw is not None:
            return json.loads(cast("bytes", raw))
        value = await self.compute(k)
        await self.r.set(value_key(k), json.dumps(value), ex=TTL_S)
        return value

    async def prewarm(self, n: int) -> None:
        """Open *n* connections."""
        await prewarm_async_pool(self.pool, n)

    async def aclose(self) -> None:
        """Close the pool."""
        await self.pool.disconnect()


class ReferenceAsync(NaiveAsync):
    """`Reference` on redis.asyncio (asyncio.sleep instead of time.sleep)."""

    def __init__(self, url: str, compute: AsyncCompute) -> None:
        super().__init__(url, compute)
        self.release = self.r.register_script(RELEASE_LUA)

    async def _get(self, k: str) -> object | None:
        raw = await self.r.get(value_key(k))
        return None if raw is None else json.loads(cast("bytes", raw))

    async def _compute_and_set(self, k: str) -> object:
        value = await self.compute(k)
        await self.r.set(value_key(k), json.dumps(value), ex=TTL_S)
        return value

    async def _try_lead(self, k: str) -> tuple[bool, object | None]:
        token = secrets.token_hex(16)
        if not await self.r.set(lock_key(k), token, nx=True, px=LOCK_TIMEOUT_S * 1000):
            return False, None
        try:
            value = await self._get(k)
            if value is None:
                value = await self._compute_and_set(k)
            return True, value
        finally:
            await self.release(keys=[lock_key(k)], args=[token])

    async def call(self, k: str) -> object:
        """Return the value of *k*."""
        value = await self._get(k)
        if value is not None:
            return value
        led, value = await self._try_lead(k)
        if led:
            return value
        for retry in range(MAX_RETRIES):
            await asyncio.sleep(BASE_DELAY_S * 2**retry)
            value = await self._get(k)
            if value is not None:
                return value
            if retry < MAX_RETRIES - 1:
                led, value = await self._try_lead(k)
                if led:
                    return value
        return await self._compute_and_set(k)  # fail open


# --- third-party peers ----------------------------------------------------------


class Dogpile:
    """dogpile.cache's Redis backend with its distributed (redis-py) lock."""

    def __init__(self, url: str, compute: SyncCompute) -> None:
        from dogpile.cache import make_region  # noqa: PLC0415

        self.pool = sync_pool(url)
        region = make_region().configure(
            "dogpile.cache.redis",
            expiration_time=TTL_S,
            arguments={
                "connection_pool": self.pool,
                "distributed_lock": True,
                "thread_local_lock": False,
                "lock_timeout": LOCK_TIMEOUT_S,
            },
        )

        def keys(_namespace: object, _fn: object) -> Callable[[str], str]:
            return value_key

        def fn(k: str) -> object:
            return compute(k)

        cached: Callable[[str], object] = region.cache_on_arguments(
            function_key_generator=keys
        )(fn)
        self._cached = cached

    def call(self, k: str) -> object:
        """Return the value of *k*."""
        return self._cached(k)

    def prewarm(self, n: int) -> None:
        """Open *n* connections."""
        prewarm_sync_pool(self.pool, n)

    def close(self) -> None:
        """Close the pool."""
        self.pool.disconnect()


class RedisLock(Naive):
    """python-redis-lock's README pattern around cache-aside.

    GET; on a miss ``with redis_lock.Lock(r, key, expire=10)``: GET again; on a miss
    compute and SET. Waiters block in BLPOP on the lock's signal list.
    """

    def __init__(self, url: str, compute: SyncCompute) -> None:
        import redis_lock  # noqa: PLC0415

        super().__init__(url, compute)
        self._lock: Callable[..., Any] = redis_lock.Lock

    def call(self, k: str) -> object:
        """Return the value of *k*."""
        raw = self.r.get(value_key(k))
        if raw is not None:
            return json.loads(cast("bytes", raw))
        with self._lock(self.r, value_key(k), expire=LOCK_TIMEOUT_S):
            raw = self.r.get(value_key(k))
            if raw is not None:
                return json.loads(cast("bytes", raw))
            value = self.compute(k)
            self.r.set(value_key(k), json.dumps(value), ex=TTL_S)
            return value


class StampedeGuard:
    """stampede_guard with `RedisBackend.from_url` (pool capped like every peer's)."""

    def __init__(self, url: str, compute: SyncCompute, *, memory: bool = False) -> None:
        import stampede_guard as sg  # noqa: PLC0415

        self.backend: Any
        if memory:
            self.backend = sg.MemoryBackend()
        else:
            self.backend = sg.RedisBackend.from_url(
                url, prefix="bench", max_connections=POOL_MAX
            )

        def fn(k: str) -> object:
            return compute(k)

        self._cached: Callable[[str], object] = sg.cached_stampede_safe(
            key="bench:{k}",
            ttl=TTL_S,
            lock_timeout=LOCK_TIMEOUT_S,
            backend=self.backend,
        )(fn)

    def call(self, k: str) -> object:
        """Return the value of *k*."""
        return self._cached(k)

    def prewarm(self, n: int) -> None:
        """Open *n* connections."""
        client = getattr(self.backend, "client", None)
        if client is not None:
            prewarm_sync_pool(client.connection_pool, n)

    def close(self) -> None:
        """Close the backend's client."""
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()


class AioCache:
    """aiocache's ``cached_stampede`` on its Redis cache, JSON serializer."""

    def __init__(self, url: str, compute: AsyncCompute) -> None:
        from aiocache import Cache, cached_stampede  # noqa: PLC0415
        from aiocache.serializers import JsonSerializer  # noqa: PLC0415

        where = urlparse(url)

        def key_builder(_fn: object, k: str) -> str:
            return value_key(k)

        async def fn(k: str) -> object:
            return await compute(k)

        decorator: Any = cached_stampede(
            lease=LOCK_TIMEOUT_S,
            ttl=TTL_S,
            cache=Cache.REDIS,
            serializer=JsonSerializer(),
            endpoint=where.hostname,
            port=where.port,
            pool_max_size=POOL_MAX,
            key_builder=key_builder,
        )
        self._cached: Callable[[str], Awaitable[object]] = decorator(fn)
        self._cache: Any = decorator.cache

    async def call(self, k: str) -> object:
        """Return the value of *k*."""
        return await self._cached(k)

    async def prewarm(self, n: int) -> None:
        """Open *n* connections."""
        await prewarm_async_pool(self._cache.client.connection_pool, n)

    async def aclose(self) -> None:
        """Close the cache."""
        await self._cache.close()


class Cashews:
    """cashews' ``@cache(..., lock=True)`` on its Redis backend, defaults kept."""

    def __init__(self, url: str, compute: AsyncCompute) -> None:
        from cashews import Cache  # noqa: PLC0415

        self._cache: Any = Cache()
        self._backend: Any = self._cache.setup(url, max_connections=POOL_MAX)

        async def fn(k: str) -> object:
            return await compute(k)

        decorator: Any = self._cache(ttl=TTL_S, key="bench:{k}", lock=True)
        self._cached: Callable[[str], Awaitable[object]] = decorator(fn)

    async def call(self, k: str) -> object:
        """Return the value of *k*."""
        return await self._cached(k)

    async def prewarm(self, n: int) -> None:
        """Connect, then open *n* connections."""
        await self._cache.init()
        await prewarm_async_pool(self._backend._client.connection_pool, n)  # noqa: SLF001

    async def aclose(self) -> None:
        """Close the backend."""
        await self._cache.close()


class StampedeGuardAsync:
    """stampede_guard on ``async def`` with `AsyncRedisBackend.from_url`."""

    def __init__(
        self, url: str, compute: AsyncCompute, *, memory: bool = False
    ) -> None:
        import stampede_guard as sg  # noqa: PLC0415

        self.backend: Any
        if memory:
            self.backend = sg.MemoryBackend()
        else:
            self.backend = sg.AsyncRedisBackend.from_url(
                url, prefix="bench", max_connections=POOL_MAX
            )

        async def fn(k: str) -> object:
            return await compute(k)

        self._cached: Callable[[str], Awaitable[object]] = sg.cached_stampede_safe(
            key="bench:{k}",
            ttl=TTL_S,
            lock_timeout=LOCK_TIMEOUT_S,
            backend=self.backend,
        )(fn)

    async def call(self, k: str) -> object:
        """Return the value of *k*."""
        return await self._cached(k)

    async def prewarm(self, n: int) -> None:
        """Open *n* connections."""
        client = getattr(self.backend, "client", None)
        if client is not None:
            await prewarm_async_pool(client.connection_pool, n)

    async def aclose(self) -> None:
        """Close the backend's client."""
        aclose = getattr(self.backend, "aclose", None)
        if aclose is not None:
            await aclose()


def make_sync_peer(name: str, url: str, compute: SyncCompute) -> SyncPeer:
    """Build sync peer *name* around *compute*."""
    match name:
        case "naive":
            return Naive(url, compute)
        case "reference":
            return Reference(url, compute)
        case "dogpile":
            return Dogpile(url, compute)
        case "redis_lock":
            return RedisLock(url, compute)
        case "stampede_guard":
            return StampedeGuard(url, compute)
        case "stampede_guard_mem":
            return StampedeGuard(url, compute, memory=True)
        case _:
            msg = f"no sync peer {name!r}"
            raise ValueError(msg)


def make_async_peer(name: str, url: str, compute: AsyncCompute) -> AsyncPeer:
    """Build async peer *name* around *compute* (call inside the loop it will run in)."""
    match name:
        case "naive_async":
            return NaiveAsync(url, compute)
        case "reference_async":
            return ReferenceAsync(url, compute)
        case "aiocache":
            return AioCache(url, compute)
        case "cashews":
            return Cashews(url, compute)
        case "stampede_guard_async":
            return StampedeGuardAsync(url, compute)
        case "stampede_guard_mem_async":
            return StampedeGuardAsync(url, compute, memory=True)
        case _:
            msg = f"no async peer {name!r}"
            raise ValueError(msg)
