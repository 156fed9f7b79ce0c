"""The Redis backend: coordinates every process and host that shares one Redis."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

from stampede_guard._breaker import CircuitBreaker
from stampede_guard.backends._faults import Faults
from stampede_guard.backends._kept import KeptConnections
from stampede_guard.backends._listener import Listener
from stampede_guard.backends._protocol import FENCE_SECONDS, Claim, Entry, Subscription
from stampede_guard.backends._redis_clients import (
    SyncClient,
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

__all__ = ["RedisBackend"]


class RedisBackend:
    """Store entries and locks in Redis.

    Each method is one Redis command or one server-side script: a hit is one ``GET``;
    a miss is one script that returns the value or takes the lock (``SET NX PX`` with
    a random token); storing the value and releasing the lock is one more script.
    Scripts are sent once and then called by their SHA1 digest (``EVALSHA``).
    `AsyncRedisBackend` is the same for asyncio code.

    Every script touches only keys of one Redis Cluster slot (see `prefix`), so the
    backend works the same on one server, behind Sentinel and on a cluster.

    Args:
        client: A ``redis.Redis`` or ``redis.cluster.RedisCluster`` (or valkey-py's
            ``valkey.Valkey`` or ``valkey.cluster.ValkeyCluster``), with
            ``decode_responses=False``, used as given. A client made by a
            ``Sentinel``'s ``master_for`` is a ``Redis`` and will do. Prefer
            `from_url` or `from_sentinel`, which set timeouts and a pool suited to
            many threads.
        serializer: How values become bytes. JSON by default: never unpickle what
            anyone with write access to Redis could have put there.
        prefix: Put before every key this backend writes (``<prefix>:{<tag>}:v:<key>``
            for values, ``...:l:<key>`` for locks, ``...:n:<key>`` for the notice
            channel). The ``{<tag>}`` is a digest of the cache key: a Redis Cluster
            hash tag, which puts all three in one slot.
        breaker_failures: Failures in a row after which the circuit breaker opens:
            calls skip the server (and compute) instead of paying its timeout. One
            breaker per server (per node of a cluster), shared by every function on
            this backend. Refused writes (``READONLY``, ``OOM``) count as failures.
        breaker_reset: Seconds an open circuit skips its server; then one call at a
            time probes it, and success closes the circuit.
    """

    def __init__(
        self,
        client: SyncClient,
        *,
        serializer: Serializer | None = None,
        prefix: str = "sg",
        breaker_failures: int = 5,
        breaker_reset: float = 5.0,
    ) -> None:
        self._errors = check_client(client, asyncio=False, builder="RedisBackend")
        self._client = client
        self._sentinels: list[Any] = []  # clients of the sentinels, if from_sentinel
        self._kept: KeptConnections | None = None  # if from_url built the pool
        self._read: Callable[[str], object] = client.get
        self._codec = RedisCodec(prefix, serializer)
        self._faults = Faults(
            client,
            self._codec.value_key,
            failures=breaker_failures,
            reset_after=breaker_reset,
        )
        self._scripts = Scripts(client)
        self._listener = Listener(pubsub_factory(client, asyncio=False), self._codec)

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
    ) -> RedisBackend:
        """Connect to the Redis at *url* (``redis://``, ``rediss://`` or ``unix://``).

        The client it builds fails fast instead of inheriting redis-py's defaults (a
        5 s socket timeout retried 10 times: close to a minute against a hung server).
        A ``valkey://`` or ``valkeys://`` URL builds a valkey-py client instead (the
        ``stampede-guard[valkey]`` extra), with the same options.

        Args:
            url: Where Redis is; credentials in it are never logged. With *cluster*,
                any node of the cluster: the client discovers the others.
            serializer: See the class.
            prefix: See the class.
            breaker_failures: See the class.
            breaker_reset: See the class.
            cluster: Build a Redis Cluster client. It routes each call to the node
                that owns the key's slot and follows slot moves and failovers,
                retrying a failed call 3 times (after 0.1, 0.2 and 0.4 s) with a
                fresh slot map before it fails with `BackendError`.
            seed_nodes: More ``"host:port"`` nodes to discover the cluster from, if
                the one in *url* does not answer (cluster only).
            socket_timeout: Seconds to wait for a reply; then the call fails with
                `BackendError` (after one immediate retry on a dropped connection).
            connect_timeout: Seconds to wait for a TCP connection.
            max_connections: Connections in the pool (per node, on a cluster).
                Threads beyond it wait for a free connection instead of failing with
                "Too many connections". On one server, the backend keeps up to a
                quarter of them (16 at most) aside for its own commands, which skip
                the client's per-call pool checkout: a hit is then cheaper than a
                ``GET`` through the client.
            pool_timeout: Seconds a thread waits for a free connection, then fails.
                Generous on purpose: among a thousand threads of one process, a thread
                holding a connection may wait long for the GIL before giving it back.
            **client_kwargs: Passed on to the connection pool (``ssl_ca_certs``...).
        """
        options = pool_options(
            socket_timeout=socket_timeout,
            connect_timeout=connect_timeout,
            max_connections=max_connections,
            pool_timeout=pool_timeout,
        )
        client = build_client(
            url,
            asyncio=False,
            cluster=cluster,
            seed_nodes=seed_nodes,
            options=options,
            client_kwargs=client_kwargs,
        )
        backend = cls(
            client,
            serializer=serializer,
            prefix=prefix,
            breaker_failures=breaker_failures,
            breaker_reset=breaker_reset,
        )
        kept = kept_connections(client, asyncio=False, max_connections=max_connections)
        if kept is not None:
            backend._use(kept)
        return backend

    def _use(self, kept: KeptConnections) -> None:
        """Send GET and the scripts on *kept* connections instead of through the client."""
        self._kept = kept
        self._read = kept.get
        self._scripts.send_on(kept)

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
    ) -> RedisBackend:
        """Connect to the master that Redis Sentinel names *service_name*.

        The client asks the sentinels where the master is, and asks again when a
        connection fails or the server it reaches has become a replica (a failover):
        the call is then retried once, on the new master. Until the sentinels have
        promoted one, calls fail with `BackendError`. A failover can lose a lock,
        so a value may be computed twice; never a wrong value (docs/deployment.md).

        Args:
            sentinels: The sentinels, as ``"host:port"`` or ``(host, port)``.
            service_name: The master's name in the sentinels' configuration.
            serializer: See the class.
            prefix: See the class.
            breaker_failures: See the class.
            breaker_reset: See the class.
            socket_timeout: Seconds to wait for a reply, from a sentinel or the
                master; then the call fails (see `from_url`).
            connect_timeout: Seconds to wait for a TCP connection.
            max_connections: Connections to the master; a call beyond them fails
                with `BackendError` (redis-py has no blocking Sentinel pool).
            sentinel_kwargs: More options for the connections to the sentinels
                (``password``, ``ssl``...).
            **client_kwargs: Passed on to the master's connection pool.
        """
        options = pool_options(
            socket_timeout=socket_timeout,
            connect_timeout=connect_timeout,
            max_connections=max_connections,
            pool_timeout=0.0,
        )
        client, asking = build_sentinel_client(
            sentinels,
            service_name,
            asyncio=False,
            options=options,
            sentinel_kwargs=sentinel_kwargs,
            client_kwargs=client_kwargs,
        )
        backend = cls(
            client,
            serializer=serializer,
            prefix=prefix,
            breaker_failures=breaker_failures,
            breaker_reset=breaker_reset,
        )
        backend._sentinels = asking
        return backend

    @property
    def client(self) -> SyncClient:
        """The client this backend talks through."""
        return self._client

    def close(self) -> None:
        """Stop the notice listener; close the client (and a pool `from_url` made)."""
        self._listener.stop()
        if self._kept is not None:
            self._kept.close()
        self._client.close()
        for sentinel in self._sentinels:
            sentinel.close()

    def __repr__(self) -> str:
        # redis-py's own repr redacts credentials.
        return f"RedisBackend({self._client!r}, serializer={self._codec.serializer!r}, prefix={self._codec.prefix!r})"

    def breaker_for(self, key: str) -> CircuitBreaker:
        """Return the circuit breaker of the server that serves *key* (see the class)."""
        return self._faults.breaker_for(key)

    def now(self) -> float:
        """Return the server's time (Unix seconds), learned from its replies.

        Entries are stamped and judged fresh by it, so a host's clock step or skew
        changes no freshness decision (see ``stampede_guard._clock``).
        """
        return self._codec.clock()

    def get(self, key: str) -> Entry | None:
        """Return the entry for *key*: one ``GET``."""
        try:
            data = self._read(self._codec.value_key(key))
        except self._errors as exc:
            raise self._faults.error(key, "get", exc) from exc
        return self._codec.decode(key, cast("bytes | None", data))

    def get_or_lock(self, key: str, token: str, lock_ttl: float) -> Entry | Claim:
        """Return the entry for *key* or the lock holder's token: one script call."""
        codec = self._codec
        keys = codec.both_keys(key)
        try:
            reply = self._scripts.get_or_lock(
                keys, codec.get_or_lock_args(token, lock_ttl)
            )
            claim = codec.claim(key, reply)
            if claim is None:  # an unreadable entry: lock as if there were none
                args = codec.get_or_lock_args(token, lock_ttl, ignore_value=True)
                claim = codec.claim(key, self._scripts.get_or_lock(keys, args))
        except self._errors as exc:
            raise self._faults.error(key, "get_or_lock", exc) from exc
        return cast("Entry | Claim", claim)

    def lock(self, key: str, token: str, lock_ttl: float) -> Claim:
        """Take the lock on *key* if it is free; return its holder: one script call."""
        args = self._codec.get_or_lock_args(token, lock_ttl, ignore_value=True)
        try:
            reply = self._scripts.get_or_lock(self._codec.both_keys(key), args)
        except self._errors as exc:
            raise self._faults.error(key, "lock", exc) from exc
        return cast("Claim", self._codec.claim(key, reply))

    def set(
        self, key: str, entry: Entry, ttl: float, *, ticket: int | None = None
    ) -> Entry | None:
        """Store and announce *entry*: one script call. Return it as readers decode it.

        Returns None, storing nothing, if *ticket* is fenced off (see `Backend.set`).
        """
        keys, args, stored = self._codec.store(key, entry, ttl, ticket)
        try:
            result = self._scripts.set_and_notify(keys, args)
        except self._errors as exc:
            raise self._faults.error(key, "set", exc) from exc
        return stored if self._codec.stored(result) else None

    def set_and_unlock(
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
            result = self._scripts.set_and_unlock(keys, args)
        except self._errors as exc:
            raise self._faults.error(key, "set_and_unlock", exc) from exc
        return stored if self._codec.stored(result) else None

    def unlock(self, key: str, token: str) -> bool:
        """Release (and announce) the lock on *key* if *token* holds it: one script."""
        args = (token, self._codec.channel(key))
        try:
            return bool(self._scripts.unlock((self._codec.lock_key(key),), args))
        except self._errors as exc:
            raise self._faults.error(key, "unlock", exc) from exc

    def extend(self, key: str, token: str, lock_ttl: float) -> bool:
        """Renew *token*'s lock on *key* for *lock_ttl* s if it still holds it: one script."""
        args = (token, milliseconds(lock_ttl))
        try:
            return bool(self._scripts.extend((self._codec.lock_key(key),), args))
        except self._errors as exc:
            raise self._faults.error(key, "extend", exc) from exc

    def subscribe(self, key: str) -> Subscription:
        """Hear of stores and releases of *key*, through this process's one listener."""
        return self._listener.subscribe(key)

    def delete(self, key: str) -> None:
        """Invalidate *key* (see `Backend.delete`): one script call."""
        codec = self._codec
        args = (codec.channel(key), milliseconds(FENCE_SECONDS))
        try:
            self._scripts.invalidate(codec.fenced_keys(key), args)
        except self._errors as exc:
            raise self._faults.error(key, "delete", exc) from exc
