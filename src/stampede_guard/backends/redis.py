"""The Redis backend: coordinates every process and host that shares one Redis."""

from __future__ import annotations

import logging
from typing import Any, cast

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from stampede_guard._errors import BackendError, SerializationError
from stampede_guard.backends._protocol import Entry
from stampede_guard.backends._redis_keys import (
    GET_OR_LOCK,
    SET_AND_UNLOCK,
    UNLOCK,
    lock_key,
    milliseconds,
    validate_prefix,
    value_key,
)
from stampede_guard.serializers import (
    MAGIC,
    JsonSerializer,
    Serializer,
    decode_entry,
    encode_entry,
)

__all__ = ["RedisBackend"]

logger = logging.getLogger("stampede_guard")


class RedisBackend:
    """Store entries and locks in Redis.

    Each method is one Redis command or one server-side script: a hit is one ``GET``;
    a miss is one script that returns the value or takes the lock (``SET NX PX`` with
    a random token); storing the value and releasing the lock is one more script.
    Scripts are sent once and then called by their SHA1 digest (``EVALSHA``).

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
        self._client = _check_client(client)
        self._serializer = _check_serializer(serializer)
        self._prefix = validate_prefix(prefix)
        self._get_or_lock = client.register_script(GET_OR_LOCK)
        self._set_and_unlock = client.register_script(SET_AND_UNLOCK)
        self._unlock = client.register_script(UNLOCK)

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
        pool = redis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=pool_timeout,
            socket_timeout=socket_timeout,
            socket_connect_timeout=connect_timeout,
            socket_keepalive=True,
            health_check_interval=30,
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
            **client_kwargs,
        )
        return cls(
            redis.Redis(connection_pool=pool), serializer=serializer, prefix=prefix
        )

    @property
    def client(self) -> redis.Redis:
        """The redis-py client this backend talks through."""
        return self._client

    def __repr__(self) -> str:
        # redis-py's own repr redacts credentials.
        return f"RedisBackend({self._client!r}, serializer={self._serializer!r}, prefix={self._prefix!r})"

    def get(self, key: str) -> Entry | None:
        """Return the entry for *key*: one ``GET``."""
        try:
            # The client was checked to return bytes (decode_responses=False).
            data = cast("bytes | None", self._client.get(value_key(self._prefix, key)))
        except redis.RedisError as exc:
            raise BackendError(key, "get") from exc
        return None if data is None else self._decode(key, data)

    def get_or_lock(self, key: str, token: str, lock_ttl: float) -> Entry | str:
        """Return the entry for *key* or the lock holder's token: one script call."""
        keys = (value_key(self._prefix, key), lock_key(self._prefix, key))
        args: list[bytes | str | int] = [token, milliseconds(lock_ttl), MAGIC, 0]
        try:
            has_value, found = self._get_or_lock(keys=keys, args=args)
            if has_value:
                entry = self._decode(key, found)
                if entry is not None:
                    return entry
                # An envelope that does not decode (another serializer's, a later
                # version's, a damaged payload) is no value either: ask for the lock
                # alone, and our result will replace it.
                args[3] = 1
                _, found = self._get_or_lock(keys=keys, args=args)
        except redis.RedisError as exc:
            raise BackendError(key, "get_or_lock") from exc
        # Time stands still inside a script, so a lock that SET NX found held still
        # has its holder for the GET; the empty fallback only keeps the types honest.
        return found.decode() if isinstance(found, bytes) else ""

    def set(self, key: str, entry: Entry, ttl: float) -> Entry:
        """Store *entry*: one ``SET PX``. Return it as readers will decode it."""
        data, stored = self._encode(key, entry)
        try:
            self._client.set(value_key(self._prefix, key), data, px=milliseconds(ttl))
        except redis.RedisError as exc:
            raise BackendError(key, "set") from exc
        return stored

    def set_and_unlock(self, key: str, entry: Entry, ttl: float, token: str) -> Entry:
        """Store *entry* and release the lock held by *token*: one script call."""
        data, stored = self._encode(key, entry)
        keys = (value_key(self._prefix, key), lock_key(self._prefix, key))
        try:
            self._set_and_unlock(keys=keys, args=(data, milliseconds(ttl), token))
        except redis.RedisError as exc:
            raise BackendError(key, "set_and_unlock") from exc
        return stored

    def unlock(self, key: str, token: str) -> bool:
        """Release the lock on *key* if *token* holds it: one script call."""
        try:
            return bool(
                self._unlock(keys=(lock_key(self._prefix, key),), args=(token,))
            )
        except redis.RedisError as exc:
            raise BackendError(key, "unlock") from exc

    def delete(self, key: str) -> None:
        """Drop the entry for *key*: one ``DEL``."""
        try:
            self._client.delete(value_key(self._prefix, key))
        except redis.RedisError as exc:
            raise BackendError(key, "delete") from exc

    def _encode(self, key: str, entry: Entry) -> tuple[bytes, Entry]:
        """Return the bytes to store and the entry readers will decode from them.

        Decoding here too means a value the serializer cannot read back is refused
        before it is stored, and the computing caller gets what everyone else gets.
        """
        try:
            data = encode_entry(entry, self._serializer)
            return data, decode_entry(data, self._serializer)
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            raise SerializationError(
                key, type(entry.value), self._serializer.name, str(exc)
            ) from exc

    def _decode(self, key: str, data: bytes) -> Entry | None:
        try:
            return decode_entry(data, self._serializer)
        except ValueError as exc:
            # Never log the bytes: they may hold someone's data.
            logger.warning(
                "unreadable cache entry for key %r treated as a miss: %s", key, exc
            )
            return None


def _check_client(client: object) -> redis.Redis:
    if not isinstance(client, redis.Redis):
        msg = f"client must be a redis.Redis, not {type(client).__qualname__}; use RedisBackend.from_url(url) to build one"
        raise TypeError(msg)
    if client.get_connection_kwargs().get("decode_responses"):
        msg = "the Redis client has decode_responses=True; RedisBackend stores bytes, so pass a client created with decode_responses=False"
        raise ValueError(msg)
    return client


def _check_serializer(serializer: object) -> Serializer:
    if serializer is None:
        return JsonSerializer()
    if not isinstance(serializer, Serializer):
        msg = f"serializer={serializer!r} needs a name and dumps() and loads() methods (see stampede_guard.Serializer)"
        raise TypeError(msg)
    return serializer
