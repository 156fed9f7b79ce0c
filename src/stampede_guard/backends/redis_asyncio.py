"""The asyncio Redis backend: `RedisBackend`'s twin over a ``redis.asyncio`` client."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeAlias, cast

from stampede_guard._breaker import CircuitBreaker
from stampede_guard.backends._faults import Faults
from stampede_guard.backends._kept import AsyncKeptConnections
from stampede_guard.backends._listener import AsyncListener
from stampede_guard.backends._protocol import (
    FENCE_SECONDS,
    AsyncSubscription,
    Claim,
    Entry,
)
from stampede_guard.backends._redis_clients import (
    AsyncClient,
    build_client,
    build_sentinel_client,
    check_client,
    kept_connections,
    pool_options,
    pubsub_factory,
)
from stampede_guard.backends._redis_shared import (
    RedisCodec,
    Scripts,
    milliseconds,
)
from stampede_guard.serializers import Serializer

__all__ = ["AsyncRedisBackend"]

# A client, the clients of its sentinels, and its kept connections if any.
_Connection: TypeAlias = tuple[Any, list[Any], AsyncKeptConnections | None]


class AsyncRedisBackend:
    """Store entries and locks in Redis, from asyncio code.

    Same keys, scripts and stored format as `RedisBackend`, so sync and async code
    sharing one Redis coordinate with each other.

    A ``redis.asyncio`` client belongs to the event loop it first runs in. A backend
    made by `from_url` or `from_sentinel` makes itself a new client when it is used in
    another loop after the previous one stopped (``asyncio.run`` after
    ``asyncio.run``, as in a task queue's workers); the stopped loop's connections are
    left to it. With a *client* passed in, or while the previous loop still runs in
    another thread, a call from another loop raises `RuntimeError` instead.

    Args:
        client: A ``redis.asyncio.Redis`` or ``redis.asyncio.cluster.RedisCluster`` (or
            their ``valkey.asyncio`` twins), with ``decode_responses=False``, used as
            is.
        serializer: See `RedisBackend`.
        prefix: See `RedisBackend`.
        breaker_failures: See `RedisBackend`.
        breaker_reset: See `RedisBackend`.
    """

    def __init__(
        self,
        client: AsyncClient,
        *,
        serializer: Serializer | None = None,
        prefix: str = "sg",
        breaker_failures: int = 5,
        breaker_reset: float = 5.0,
    ) -> None:
        self._errors = check_client(client, asyncio=True, builder="AsyncRedisBackend")
        self._codec = RedisCodec(prefix, serializer)
        # Outlives the clients made per event loop: the servers stay the same.
        self._faults = Faults(
            client,
            self._codec.value_key,
            failures=breaker_failures,
            reset_after=breaker_reset,
        )
        # How from_url and from_sentinel make the client again, for a new event loop.
        self._connect: Callable[[], _Connection] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # where the client runs
        self._binding = threading.Lock()  # loops in two threads may both come first
        self._attach(client)

    def _attach(self, client: AsyncClient) -> None:
        """Talk through *client* (the one given, or one made for a new event loop)."""
        self._client = client
        self._faults.use(client)
        self._sentinels: list[Any] = []  # clients of the sentinels, if from_sentinel
        self._kept: AsyncKeptConnections | None = None  # if from_url built the pool
        # redis-py's asyncio cluster client discovers the cluster on its first call;
        # many first calls at once race in that discovery and break each other's
        # connections. So the backend makes the first call alone (see `_discover`).
        self._discovered = not hasattr(client, "get_primaries")
        self._discovery = asyncio.Lock()
        self._scripts = Scripts(client)
        self._read: Callable[[str], Awaitable[object]] = client.get
        self._listener = AsyncListener(
            pubsub_factory(client, asyncio=True), self._codec
        )

    def _use(self, kept: AsyncKeptConnections) -> None:
        """Send GET and the scripts on *kept* connections instead of through the client."""
        self._kept = kept
        self._read = kept.get
        self._scripts.send_on(kept)

    def _adopt(self, connection: _Connection) -> None:
        """Talk through what `from_url` or `from_sentinel` made."""
        client, sentinels, kept = connection
        if client is not self._client:
            self._attach(client)
        self._sentinels = sentinels
        if kept is not None:
            self._use(kept)

    @classmethod
    def _connected(
        cls,
        connect: Callable[[], _Connection],
        serializer: Serializer | None,
        prefix: str,
        breakers: tuple[int, float],
    ) -> AsyncRedisBackend:
        """Return a backend on what *connect* makes, which it calls again per loop."""
        connection = connect()
        backend = cls(
            connection[0],
            serializer=serializer,
            prefix=prefix,
            breaker_failures=breakers[0],
            breaker_reset=breakers[1],
        )
        backend._connect = connect
        backend._adopt(connection)
        return backend

    def _bind(self) -> None:
        """Make sure the client belongs to the running event loop (see the class)."""
        loop = asyncio.get_running_loop()
        if loop is self._loop:
            return
        with self._binding:
            previous = self._loop
            if previous is loop:
                return
            if previous is not None and previous.is_running():
                msg = (
                    "this AsyncRedisBackend is in use by an event loop running in "
                    "another thread, and redis.asyncio connections cannot be shared "
                    "between event loops: give each thread's loop a backend of its own"
                )
                raise RuntimeError(msg)
            if previous is not None:  # stopped: its connections stay with it
                if self._connect is None:
                    msg = (
                        "this AsyncRedisBackend's client ran in an event loop that has "
                        "stopped, and its connections cannot move to another loop: "
                        "make the backend with AsyncRedisBackend.from_url(...), which "
                        "makes a new client for each new loop, or pass a client made "
                        "in this loop"
                    )
                    raise RuntimeError(msg)
                self._adopt(self._connect())
            self._loop = loop

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        serializer: Serializer | None = None,
        prefix: str = "sg",
        breaker_failures: int = 5,
        breaker_reset: float = 5.0,
        cluster: bool = False,
        seed_nodes: Sequence[str] = (),
        socket_timeout: float = 1.0,
        connect_timeout: float = 1.0,
        max_connections: int = 100,
        pool_timeout: float = 10.0,
        **client_kwargs: Any,
    ) -> AsyncRedisBackend:
        """Connect to the Redis at *url*; the options are those of `RedisBackend.from_url`.

        Tasks beyond *max_connections* wait (up to *pool_timeout*) for a connection,
        except on a cluster: redis-py's asyncio cluster client has no blocking pool,
        so a call beyond *max_connections* per node fails with `BackendError`.
        """
        options = pool_options(
            socket_timeout=socket_timeout,
            connect_timeout=connect_timeout,
            max_connections=max_connections,
            pool_timeout=pool_timeout,
        )

        def connect() -> _Connection:
            client = build_client(
                url,
                asyncio=True,
                cluster=cluster,
                seed_nodes=seed_nodes,
                options=options,
                client_kwargs=client_kwargs,
            )
            kept = kept_connections(
                client, asyncio=True, max_connections=max_connections
            )
            return client, [], kept

        return cls._connected(
            connect, serializer, prefix, (breaker_failures, breaker_reset)
        )

    @classmethod
    def from_sentinel(
        cls,
        sentinels: Sequence[str | tuple[str, int]],
        service_name: str,
        *,
        serializer: Serializer | None = None,
        prefix: str = "sg",
        breaker_failures: int = 5,
        breaker_reset: float = 5.0,
        socket_timeout: float = 1.0,
        connect_timeout: float = 1.0,
        max_connections: int = 100,
        sentinel_kwargs: dict[str, Any] | None = None,
        **client_kwargs: Any,
    ) -> AsyncRedisBackend:
        """Connect to the master Sentinel names *service_name*; see `RedisBackend.from_sentinel`."""
        options = pool_options(
            socket_timeout=socket_timeout,
            connect_timeout=connect_timeout,
            max_connections=max_connections,
            pool_timeout=0.0,
        )

        def connect() -> _Connection:
            client, asking = build_sentinel_client(
                sentinels,
                service_name,
                asyncio=True,
                options=options,
                sentinel_kwargs=sentinel_kwargs,
                client_kwargs=client_kwargs,
            )
            return client, asking, None

        return cls._connected(
            connect, serializer, prefix, (breaker_failures, breaker_reset)
        )

    @property
    def client(self) -> AsyncClient:
        """The asyncio client this backend talks through (in the loop it last ran in).

        A backend made by `from_url` or `from_sentinel` makes a new one for a new loop.
        """
        return self._client

    async def aclose(self) -> None:
        """Stop the notice listener; close the client (and a pool `from_url` made).

        Only the running loop's connections can be closed: called from another loop
        than the client's, it does nothing (a stopped loop's connections are left to
        it).
        """
        if self._loop is not None and self._loop is not asyncio.get_running_loop():
            return
        await self._listener.stop()
        if self._kept is not None:
            await self._kept.close()
        await self._client.aclose()
        for sentinel in self._sentinels:
            await sentinel.aclose()

    def __repr__(self) -> str:
        return f"AsyncRedisBackend({self._client!r}, serializer={self._codec.serializer!r}, prefix={self._codec.prefix!r})"

    async def _discover(self) -> None:
        """Let one task discover the cluster while the others wait for it."""
        async with self._discovery:
            if not self._discovered:
                await self._client.initialize()
                self._discovered = True

    def breaker_for(self, key: str) -> CircuitBreaker:
        """Return the circuit breaker of the server that serves *key* (see the class)."""
        return self._faults.breaker_for(key)

    def now(self) -> float:
        """Return the server's time (Unix seconds), learned from its replies.

        Entries are stamped and judged fresh by it, so a host's clock step or skew
        changes no freshness decision (see ``stampede_guard._clock``).
        """
        return self._codec.clock()

    async def aget(self, key: str) -> Entry | None:
        """Return the entry for *key*: one ``GET``."""
        try:
            self._bind()
            if not self._discovered:
                await self._discover()
            data = await self._read(self._codec.value_key(key))
        except self._errors as exc:
            raise self._faults.error(key, "get", exc) from exc
        return self._codec.decode(key, cast("bytes | None", data))

    async def aget_or_lock(
        self, key: str, token: str, lock_ttl: float
    ) -> Entry | Claim:
        """Return the entry for *key* or the lock holder's token: one script call."""
        codec = self._codec
        keys = codec.both_keys(key)
        try:
            self._bind()
            if not self._discovered:
                await self._discover()
            reply = await self._scripts.get_or_lock(
                keys, codec.get_or_lock_args(token, lock_ttl)
            )
            claim = codec.claim(key, reply)
            if claim is None:  # an unreadable entry: lock as if there were none
                args = codec.get_or_lock_args(token, lock_ttl, ignore_value=True)
                claim = codec.claim(key, await self._scripts.get_or_lock(keys, args))
        except self._errors as exc:
            raise self._faults.error(key, "get_or_lock", exc) from exc
        return cast("Entry | Claim", claim)

    async def alock(self, key: str, token: str, lock_ttl: float) -> Claim:
        """Take the lock on *key* if it is free; return its holder: one script call."""
        args = self._codec.get_or_lock_args(token, lock_ttl, ignore_value=True)
        try:
            self._bind()
            if not self._discovered:
                await self._discover()
            reply = await self._scripts.get_or_lock(self._codec.both_keys(key), args)
        except self._errors as exc:
            raise self._faults.error(key, "lock", exc) from exc
        return cast("Claim", self._codec.claim(key, reply))

    async def aset(
        self, key: str, entry: Entry, ttl: float, *, ticket: int | None = None
    ) -> Entry | None:
        """Store and announce *entry*: one script call. Return it as readers decode it.

        Returns None, storing nothing, if *ticket* is fenced off (see `Backend.set`).
        """
        keys, args, stored = self._codec.store(key, entry, ttl, ticket)
        try:
            self._bind()
            if not self._discovered:
                await self._discover()
            result = await self._scripts.set_and_notify(keys, args)
        except self._errors as exc:
            raise self._faults.error(key, "set", exc) from exc
        return stored if self._codec.stored(result) else None

    async def aset_and_unlock(
        self,
        key: str,
        entry: Entry,
        ttl: float,
        token: str,
        *,
        ticket: int | None = None,
    ) -> Entry | None:
        """Store *entry*, release *token*'s lock, announce the entry: one script call.

        Returns None if *ticket* is fenced off (see `Backend.set_and_unlock`).
        """
        keys, args, stored = self._codec.store_and_unlock(
            key, entry, ttl, token, ticket
        )
        try:
            self._bind()
            if not self._discovered:
                await self._discover()
            result = await self._scripts.set_and_unlock(keys, args)
        except self._errors as exc:
            raise self._faults.error(key, "set_and_unlock", exc) from exc
        return stored if self._codec.stored(result) else None

    async def aunlock(self, key: str, token: str) -> bool:
        """Release (and announce) the lock on *key* if *token* holds it: one script."""
        args = (token, self._codec.channel(key))
        try:
            self._bind()
            if not self._discovered:
                await self._discover()
            return bool(await self._scripts.unlock((self._codec.lock_key(key),), args))
        except self._errors as exc:
            raise self._faults.error(key, "unlock", exc) from exc

    async def aextend(self, key: str, token: str, lock_ttl: float) -> bool:
        """Renew *token*'s lock on *key* for *lock_ttl* s if it still holds it: one script."""
        args = (token, milliseconds(lock_ttl))
        try:
            self._bind()
            if not self._discovered:
                await self._discover()
            return bool(await self._scripts.extend((self._codec.lock_key(key),), args))
        except self._errors as exc:
            raise self._faults.error(key, "extend", exc) from exc

    async def asubscribe(self, key: str) -> AsyncSubscription:
        """Hear of stores and releases of *key*, through this backend's one listener."""
        self._bind()
        return await self._listener.subscribe(key)

    async def adelete(self, key: str) -> None:
        """Invalidate *key* (see `Backend.delete`): one script call."""
        codec = self._codec
        args = (codec.channel(key), milliseconds(FENCE_SECONDS))
        try:
            self._bind()
            if not self._discovered:
                await self._discover()
            await self._scripts.invalidate(codec.fenced_keys(key), args)
        except self._errors as exc:
            raise self._faults.error(key, "delete", exc) from exc
