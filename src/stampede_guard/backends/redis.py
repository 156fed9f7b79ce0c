"""The Redis backend: coordinates every process and host that shares one Redis."""

from __future__ import annotations

from typing import Any, cast

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from stampede_guard._errors import BackendError
from stampede_guard.backends._listener import Listener
from stampede_guard.backends._protocol import Entry, Subscription
from stampede_guard.backends._redis_shared import (
    GET_OR_LOCK,
    SET_AND_NOTIFY,
    SET_AND_UNLOCK,
    UNLOCK,
    RedisCodec,
    check_client,
    milliseconds,
    pool_options,
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

    Args:
        client: A ``redis.Redis`` with ``decode_responses=False``. It is used as given;
            prefer `from_url`, which sets timeouts and a pool suited to many threads.
        serializer: How values become bytes. JSON by default: never unpickle what
            anyone with write access to Redis could have put there.
        prefix: Put before every key this backend writes (``<prefix>:{<tag>}:v:<key>``
            for values, ``...:l:<key>`` for locks).
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        serializer: Serializer | None = None,
        prefix: str = "sg",
    ) -> None:
        check_client(client, redis.Redis, "RedisBackend")
        self._client = client
        self._codec = RedisCodec(prefix, serializer)
        self._get_or_lock = client.register_script(GET_OR_LOCK)
        self._set_and_unlock = client.register_script(SET_AND_UNLOCK)
        self._set_and_notify = client.register_script(SET_AND_NOTIFY)
        self._unlock = client.register_script(UNLOCK)
        self._listener = Listener(client, self._codec)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        serializer: Serializer | None = None,
        prefix: str = "sg",
        socket_timeout: float = 1.0,
        connect_timeout: float = 1.0,
        max_connections: int = 100,
        pool_timeout: float = 10.0,
        **client_kwargs: Any,
    ) -> RedisBackend:
        """Connect to the Redis at *url* (``redis://``, ``rediss://`` or ``unix://``).

        The client it builds fails fast instead of inheriting redis-py's defaults (a
        5 s socket timeout retried 10 times: close to a minute against a hung server).

        Args:
            url: Where Redis is; credentials in it are never logged.
            serializer: See the class.
            prefix: See the class.
            socket_timeout: Seconds to wait for a reply; then the call fails with
                `BackendError` (after one immediate retry on a dropped connection).
            connect_timeout: Seconds to wait for a TCP connection.
            max_connections: Connections in the pool. Threads beyond it wait for a free
                connection instead of failing with "Too many connections".
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
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
        )
        pool = redis.BlockingConnectionPool.from_url(url, **options, **client_kwargs)
        # from_pool: the client owns the pool, so close() disconnects it too.
        client = redis.Redis.from_pool(pool)
        return cls(client, serializer=serializer, prefix=prefix)

    @property
    def client(self) -> redis.Redis:
        """The redis-py client this backend talks through."""
        return self._client

    def close(self) -> None:
        """Stop the notice listener; close the client (and a pool `from_url` made)."""
        self._listener.stop()
        self._client.close()

    def __repr__(self) -> str:
        # redis-py's own repr redacts credentials.
        return f"RedisBackend({self._client!r}, serializer={self._codec.serializer!r}, prefix={self._codec.prefix!r})"

    def get(self, key: str) -> Entry | None:
        """Return the entry for *key*: one ``GET``."""
        try:
            data = self._client.get(self._codec.value_key(key))
        except redis.RedisError as exc:
            raise BackendError(key, "get") from exc
        return self._codec.decode(key, cast("bytes | None", data))

    def get_or_lock(self, key: str, token: str, lock_ttl: float) -> Entry | str:
        """Return the entry for *key* or the lock holder's token: one script call."""
        codec = self._codec
        keys = codec.both_keys(key)
        try:
            reply = self._get_or_lock(keys, codec.get_or_lock_args(token, lock_ttl))
            claim = codec.claim(key, reply)
            if claim is None:  # an unreadable entry: lock as if there were none
                args = codec.get_or_lock_args(token, lock_ttl, ignore_value=True)
                claim = codec.claim(key, self._get_or_lock(keys, args))
        except redis.RedisError as exc:
            raise BackendError(key, "get_or_lock") from exc
        return cast("Entry | str", claim)

    def lock(self, key: str, token: str, lock_ttl: float) -> str:
        """Take the lock on *key* if it is free; return its holder: one script call."""
        args = self._codec.get_or_lock_args(token, lock_ttl, ignore_value=True)
        try:
            reply = self._get_or_lock(self._codec.both_keys(key), args)
        except redis.RedisError as exc:
            raise BackendError(key, "lock") from exc
        return cast("str", self._codec.claim(key, reply))

    def set(self, key: str, entry: Entry, ttl: float) -> Entry:
        """Store and announce *entry*: one script call. Return it as readers decode it."""
        data, stored = self._codec.encode(key, entry)
        args = (data, milliseconds(ttl), self._codec.channel(key))
        try:
            self._set_and_notify((self._codec.value_key(key),), args)
        except redis.RedisError as exc:
            raise BackendError(key, "set") from exc
        return stored

    def set_and_unlock(self, key: str, entry: Entry, ttl: float, token: str) -> Entry:
        """Store *entry*, release *token*'s lock, announce the entry: one script call."""
        data, stored = self._codec.encode(key, entry)
        args = (data, milliseconds(ttl), token, self._codec.channel(key))
        try:
            self._set_and_unlock(self._codec.both_keys(key), args)
        except redis.RedisError as exc:
            raise BackendError(key, "set_and_unlock") from exc
        return stored

    def unlock(self, key: str, token: str) -> bool:
        """Release (and announce) the lock on *key* if *token* holds it: one script."""
        args = (token, self._codec.channel(key))
        try:
            return bool(self._unlock((self._codec.lock_key(key),), args))
        except redis.RedisError as exc:
            raise BackendError(key, "unlock") from exc

    def subscribe(self, key: str) -> Subscription:
        """Hear of stores and releases of *key*, through this process's one listener."""
        return self._listener.subscribe(key)

    def delete(self, key: str) -> None:
        """Drop the entry for *key*: one ``DEL``."""
        try:
            self._client.delete(self._codec.value_key(key))
        except redis.RedisError as exc:
            raise BackendError(key, "delete") from exc
