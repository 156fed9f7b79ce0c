"""The Redis backend: coordinates every process and host that shares one Redis."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar, cast

from stampede_guard._entry import Claim, Entry
from stampede_guard._near import Near
from stampede_guard.backends._protocol import Subscription
from stampede_guard.backends.redis import _many
from stampede_guard.backends.redis._backend import RedisBase
from stampede_guard.backends.redis._clients import SyncClient, pubsub_factory
from stampede_guard.backends.redis._codec import Call, Unchecked
from stampede_guard.backends.redis._listener import Listener
from stampede_guard.backends.redis._many import CallFailed, Flow, Many, Pipelined

__all__ = ["RedisBackend"]

T = TypeVar("T")


class RedisBackend(RedisBase["SyncClient"]):
    """Store entries and locks in Redis.

    Each method is one Redis command or one server-side script: a hit is one ``GET``;
    a miss is one script that returns the value or takes the lock (``SET NX PX`` with
    a random token); storing the value and releasing the lock is one more script.
    Scripts are sent once and then called by their SHA1 digest (``EVALSHA``).
    `AsyncRedisBackend` is the same for asyncio code.

    Every script touches only keys of one Redis Cluster slot (see `prefix`), so the
    backend works the same on one server, behind Sentinel and on a cluster.

    The batch methods (`get_many`, `get_or_lock_many`, `set_and_unlock_many`,
    `unlock_many`) decide each key as their single namesakes do, in one script call
    for all keys: one round trip. A cluster refuses a script over several slots, so
    there it is one call per slot, sent in one pipeline: one round trip per node.

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
        near_cache: Keep what this process reads in its memory too, and serve the
            next reads from there with no round trip (`NearCache`): every store and
            invalidation, in any process, drops the key from every near cache. See
            docs/near-cache.md.
    """

    _asyncio = False

    def _listen(self, client: SyncClient) -> None:
        self._listener = Listener(pubsub_factory(client, asyncio=False), self._codec)

    def close(self) -> None:
        """Stop the notice listener; close the client (and a pool `from_url` made)."""
        self._listener.stop()
        if self._kept is not None:
            self._kept.close()
        self._client.close()
        for sentinel in self._sentinels:
            sentinel.close()

    def _send(self, call: Call[T]) -> T:
        """Run *call*'s script and read its reply; a client's error is a BackendError."""
        writing = self._writing(call)
        try:
            if writing is None:
                reply = self._scripts.run(call.script, call.keys, call.args)
            else:
                with writing:
                    reply = self._scripts.run(call.script, call.keys, call.args)
        except self._errors as exc:
            raise self._faults.error(call.key, call.operation, exc) from exc
        return call.read(reply)

    def _send_many(self, many: Many[T]) -> list[T]:
        """Send *many*'s calls: one script call, or one pipeline on a cluster."""
        if not many.calls:
            return []
        try:
            with _many.Writes(self._near, many):
                if len(many.calls) == 1:
                    call = many.calls[0]
                    replies = [self._scripts.run(call.script, call.keys, call.args)]
                else:
                    replies = self._pipelined(many.calls)
        except self._errors as exc:
            raise self._faults.error(many.keys[0], many.operation, exc) from exc
        except CallFailed as failed:
            error = self._faults.error(failed.call.key, many.operation, failed.cause)
            raise error from failed.cause
        return many.read(replies)

    def _pipelined(self, calls: Sequence[Call[Any]]) -> list[Any]:
        """Send *calls* in one pipeline (one round trip per node; see `Pipelined`)."""
        sent = Pipelined(calls)
        while todo := sent.todo():
            pipe = self._client.pipeline()
            for call in todo:
                self._scripts.queue(pipe, call.script, call.keys, call.args)
            for name in sent.answer(pipe.execute(raise_on_error=False)):
                self._scripts.load(name)
        return sent.replies()

    def _drive(self, flow: Flow[T]) -> T:
        """Run a batch method's *flow*, sending each `Many` it yields."""
        try:
            many = next(flow)
            while True:
                many = flow.send(self._send_many(many))
        except StopIteration as done:
            value: T = done.value
            return value

    def get(self, key: str) -> Entry | None:
        """Return the entry for *key*: one ``GET`` (none for a near cache's hit)."""
        if self._near is not None:
            found = self._near.lookup(key)
            if found is not None:
                return found
            near, start, began = self._near_read(self._listener.keep)
            entry, left, size = self._read_checked(key)
            if entry is not None and start is not None:
                near.admit(key, entry, start, began=began, remote_ttl=left, weight=size)
            return entry
        codec = self._codec
        if codec.reads_checked(key):  # a tagged value's: its tags checked, one script
            return self._read_checked(key)[0]
        # A hit: the one call not made through `_send`, to spare it building a Call.
        try:
            data = self._read(codec.value_key(key))
        except self._errors as exc:
            raise self._faults.error(key, "get", exc) from exc
        entry = codec.decode(key, data)
        if codec.tagged(key, entry):  # first seen tagged: read again, checked
            return self._read_checked(key)[0]
        return entry

    def _read_checked(self, key: str) -> tuple[Entry | None, float | None, int]:
        """READ *key*, tags checked: by the script, or after it on a cluster."""
        read = self._send(self._codec.near_read(key))
        if type(read[0]) is Unchecked:
            read = self._drive(_many.settle_read(self._batches, read))
        return cast("tuple[Entry | None, float | None, int]", read)

    def get_many(self, keys: Sequence[str]) -> list[Entry | None]:
        """Return the entry of each key, in order, as `get` would: one script call.

        A near cache answers what it holds; one script reads the rest (values and
        their remaining time), and they fill the near cache as `get`'s read does.
        """

        def begin() -> tuple[Near, int | None, float]:
            return self._near_read(self._listener.keep)

        return self._drive(_many.get_many(self._batches, keys, self._near, begin))

    def get_or_lock_many(
        self, keys: Sequence[str], token: str, lock_ttl: float
    ) -> list[Entry | Claim]:
        """Return, per key, its entry or its lock's holder (see `get_or_lock`).

        One script call (atomic per key, all keys locked by one *token*); a second
        one only for keys whose stored bytes are unreadable.
        """
        flow = _many.get_or_lock_many(self._batches, keys, token, lock_ttl)
        return self._drive(flow)

    def set_and_unlock_many(
        self, items: Sequence[tuple[str, Entry, float, int | None]], token: str
    ) -> list[Entry | None]:
        """`set_and_unlock` of each (key, entry, ttl, ticket) item: one script call."""
        return self._drive(_many.stored(self._batches, items, token))

    def unlock_many(self, keys: Sequence[str], token: str) -> list[bool]:
        """`unlock` of each key: one script call; whether *token* held each lock."""
        return self._drive(_many.send_only(self._batches.unlock(keys, token)))

    def get_or_lock(self, key: str, token: str, lock_ttl: float) -> Entry | Claim:
        """Return the entry for *key* or the lock holder's token: one script call."""
        found = self._send(self._codec.get_or_lock(key, token, lock_ttl))
        if found is None:  # an unreadable entry: lock as if there were none
            return self._send(self._codec.lock(key, token, lock_ttl, "get_or_lock"))
        if isinstance(found, Unchecked):  # a cluster's tagged value: its tags checked
            flow = _many.settle_lock(self._batches, key, found, token, lock_ttl)
            return self._drive(flow)
        return found

    def lock(self, key: str, token: str, lock_ttl: float) -> Claim:
        """Take the lock on *key* if it is free; return its holder: one script call."""
        return self._send(self._codec.lock(key, token, lock_ttl))

    def set(
        self, key: str, entry: Entry, ttl: float, *, ticket: int | None = None
    ) -> Entry | None:
        """Store and announce *entry*: one script call. Return it as readers decode it.

        Returns None, storing nothing, if *ticket* is fenced off (see `Backend.set`).
        """
        if entry.tags and self._codec.cluster:  # its tags stamped first
            item = (key, entry, ttl, ticket)
            return self._drive(_many.stored(self._batches, [item], None))[0]
        return self._send(self._codec.store(key, entry, ttl, ticket))

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
        if entry.tags and self._codec.cluster:  # its tags stamped first
            item = (key, entry, ttl, ticket)
            return self._drive(_many.stored(self._batches, [item], token))[0]
        return self._send(self._codec.store_and_unlock(key, entry, ttl, token, ticket))

    def unlock(self, key: str, token: str) -> bool:
        """Release (and announce) the lock on *key* if *token* holds it: one script."""
        return self._send(self._codec.unlock(key, token))

    def extend(self, key: str, token: str, lock_ttl: float) -> bool:
        """Renew *token*'s lock on *key* for *lock_ttl* s if it still holds it: one script."""
        return self._send(self._codec.extend(key, token, lock_ttl))

    def subscribe(self, key: str) -> Subscription:
        """Hear of stores and releases of *key*, through this process's one listener."""
        return self._listener.subscribe(key)

    def delete(self, key: str) -> None:
        """Invalidate *key* (see `Backend.delete`): one script call."""
        self._send(self._codec.invalidate(key))

    def invalidate_tag(self, tag: str) -> None:
        """Invalidate every value stored with *tag*, in every process: one write.

        See `TagBackend.invalidate_tag`. On a cluster too: the tag's stamp is one
        key, in a slot of its own.
        """
        self._send(self._tagging(tag))
        self._tag_done(tag)
