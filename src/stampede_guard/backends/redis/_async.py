"""The asyncio Redis backend: `RedisBackend`'s twin over a ``redis.asyncio`` client."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Sequence
from typing import Any, TypeVar, cast

from stampede_guard._entry import Claim, Entry
from stampede_guard._near import Near
from stampede_guard.backends._protocol import AsyncSubscription
from stampede_guard.backends.redis import _many
from stampede_guard.backends.redis._backend import RedisBase
from stampede_guard.backends.redis._clients import AsyncClient, pubsub_factory
from stampede_guard.backends.redis._codec import Call, Unchecked
from stampede_guard.backends.redis._listener import AsyncListener
from stampede_guard.backends.redis._many import CallFailed, Flow, Many, Pipelined

__all__ = ["AsyncRedisBackend"]

T = TypeVar("T")


class AsyncRedisBackend(RedisBase["AsyncClient"]):
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
        near_cache: See `RedisBackend`.
    """

    _asyncio = True

    def _prepare(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None  # where the client runs
        self._binding = threading.Lock()  # loops in two threads may both come first

    def _attach(self, client: AsyncClient) -> None:
        super()._attach(client)
        # redis-py's asyncio cluster client discovers the cluster on its first call;
        # many first calls at once race in that discovery and break each other's
        # connections. So the backend makes the first call alone (see `_discover`).
        self._discovered = not hasattr(client, "get_primaries")
        self._discovery = asyncio.Lock()

    def _listen(self, client: AsyncClient) -> None:
        self._listener = AsyncListener(
            pubsub_factory(client, asyncio=True), self._codec
        )
        if self._near is not None:  # a new loop's listener: the old one's is gone
            self._near.owner = None
            self._near.stopped()

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

    async def _discover(self) -> None:
        """Let one task discover the cluster while the others wait for it."""
        async with self._discovery:
            if not self._discovered:
                await self._client.initialize()
                self._discovered = True

    async def _send(self, call: Call[T]) -> T:
        """See `RedisBackend._send`; first, bind the client to this loop (see the class)."""
        try:
            self._bind()
            if not self._discovered:
                await self._discover()
            writing = self._writing(call)
            if writing is None:
                reply = await self._scripts.run(call.script, call.keys, call.args)
            else:
                with writing:
                    reply = await self._scripts.run(call.script, call.keys, call.args)
        except self._errors as exc:
            raise self._faults.error(call.key, call.operation, exc) from exc
        return call.read(reply)

    async def _send_many(self, many: Many[T]) -> list[T]:
        """See `RedisBackend._send_many`; first, bind the client to this loop."""
        if not many.calls:
            return []
        try:
            self._bind()
            if not self._discovered:
                await self._discover()
            with _many.Writes(self._near, many):
                if len(many.calls) == 1:
                    call = many.calls[0]
                    reply = await self._scripts.run(call.script, call.keys, call.args)
                    replies = [reply]
                else:
                    replies = await self._pipelined(many.calls)
        except self._errors as exc:
            raise self._faults.error(many.keys[0], many.operation, exc) from exc
        except CallFailed as failed:
            error = self._faults.error(failed.call.key, many.operation, failed.cause)
            raise error from failed.cause
        return many.read(replies)

    async def _pipelined(self, calls: Sequence[Call[Any]]) -> list[Any]:
        """See `RedisBackend._pipelined` (the nodes' pipelines are sent concurrently)."""
        sent = Pipelined(calls)
        while todo := sent.todo():
            pipe = self._client.pipeline()
            for call in todo:
                self._scripts.queue(pipe, call.script, call.keys, call.args)
            for name in sent.answer(await pipe.execute(raise_on_error=False)):
                await self._scripts.load(name)
        return sent.replies()

    async def _drive(self, flow: Flow[T]) -> T:
        """See `RedisBackend._drive`."""
        try:
            many = next(flow)
            while True:
                many = flow.send(await self._send_many(many))
        except StopIteration as done:
            value: T = done.value
            return value

    async def aget_many(self, keys: Sequence[str]) -> list[Entry | None]:
        """See `RedisBackend.get_many`."""
        if self._near is not None:
            self._bind()  # the listener it may start belongs to this loop

        def begin() -> tuple[Near, int | None, float]:
            return self._near_read(self._listener.keep)

        flow = _many.get_many(self._batches, keys, self._near, begin)
        return await self._drive(flow)

    async def aget_or_lock_many(
        self, keys: Sequence[str], token: str, lock_ttl: float
    ) -> list[Entry | Claim]:
        """See `RedisBackend.get_or_lock_many`."""
        flow = _many.get_or_lock_many(self._batches, keys, token, lock_ttl)
        return await self._drive(flow)

    async def aset_and_unlock_many(
        self, items: Sequence[tuple[str, Entry, float, int | None]], token: str
    ) -> list[Entry | None]:
        """See `RedisBackend.set_and_unlock_many`."""
        return await self._drive(_many.stored(self._batches, items, token))

    async def aunlock_many(self, keys: Sequence[str], token: str) -> list[bool]:
        """See `RedisBackend.unlock_many`."""
        return await self._drive(_many.send_only(self._batches.unlock(keys, token)))

    async def aget(self, key: str) -> Entry | None:
        """Return the entry for *key*: one ``GET`` (see `RedisBackend.get`)."""
        if self._near is not None:
            found = self._near.lookup(key)
            if found is not None:
                return found
            self._bind()  # the listener it may start belongs to this loop
            near, start, began = self._near_read(self._listener.keep)
            entry, left, size = await self._read_checked(key)
            if entry is not None and start is not None:
                near.admit(key, entry, start, began=began, remote_ttl=left, weight=size)
            return entry
        try:
            self._bind()
            if not self._discovered:
                await self._discover()
            codec = self._codec
            if codec.reads_checked(key):  # a tagged value's: see RedisBackend.get
                return (await self._read_checked(key))[0]
            data = await self._read(codec.value_key(key))
        except self._errors as exc:
            raise self._faults.error(key, "get", exc) from exc
        entry = codec.decode(key, data)
        if codec.tagged(key, entry):
            return (await self._read_checked(key))[0]
        return entry

    async def _read_checked(self, key: str) -> tuple[Entry | None, float | None, int]:
        """See `RedisBackend._read_checked`."""
        read = await self._send(self._codec.near_read(key))
        if type(read[0]) is Unchecked:
            read = await self._drive(_many.settle_read(self._batches, read))
        return cast("tuple[Entry | None, float | None, int]", read)

    async def aget_or_lock(
        self, key: str, token: str, lock_ttl: float
    ) -> Entry | Claim:
        """Return the entry for *key* or the lock holder's token: one script call."""
        found = await self._send(self._codec.get_or_lock(key, token, lock_ttl))
        if found is None:  # an unreadable entry: lock as if there were none
            call = self._codec.lock(key, token, lock_ttl, "get_or_lock")
            return await self._send(call)
        if isinstance(found, Unchecked):  # a cluster's tagged value: its tags checked
            flow = _many.settle_lock(self._batches, key, found, token, lock_ttl)
            return await self._drive(flow)
        return found

    async def alock(self, key: str, token: str, lock_ttl: float) -> Claim:
        """Take the lock on *key* if it is free; return its holder: one script call."""
        return await self._send(self._codec.lock(key, token, lock_ttl))

    async def aset(
        self, key: str, entry: Entry, ttl: float, *, ticket: int | None = None
    ) -> Entry | None:
        """See `RedisBackend.set`."""
        if entry.tags and self._codec.cluster:  # its tags stamped first
            item = (key, entry, ttl, ticket)
            return (await self._drive(_many.stored(self._batches, [item], None)))[0]
        return await self._send(self._codec.store(key, entry, ttl, ticket))

    async def aset_and_unlock(
        self,
        key: str,
        entry: Entry,
        ttl: float,
        token: str,
        *,
        ticket: int | None = None,
    ) -> Entry | None:
        """See `RedisBackend.set_and_unlock`."""
        if entry.tags and self._codec.cluster:  # its tags stamped first
            item = (key, entry, ttl, ticket)
            return (await self._drive(_many.stored(self._batches, [item], token)))[0]
        call = self._codec.store_and_unlock(key, entry, ttl, token, ticket)
        return await self._send(call)

    async def aunlock(self, key: str, token: str) -> bool:
        """Release (and announce) the lock on *key* if *token* holds it: one script."""
        return await self._send(self._codec.unlock(key, token))

    async def aextend(self, key: str, token: str, lock_ttl: float) -> bool:
        """Renew *token*'s lock on *key* for *lock_ttl* s if it still holds it: one script."""
        return await self._send(self._codec.extend(key, token, lock_ttl))

    async def asubscribe(self, key: str) -> AsyncSubscription:
        """Hear of stores and releases of *key*, through this backend's one listener."""
        self._bind()
        if not self._discovered:
            # The listener picks a cluster master to listen on, and a fresh cluster
            # client knows none until discovered. A failure here is not raised:
            # notices only make waiting faster, and the listener retries.
            with contextlib.suppress(*self._errors):
                await self._discover()
        return await self._listener.subscribe(key)

    async def adelete(self, key: str) -> None:
        """Invalidate *key* (see `Backend.delete`): one script call."""
        await self._send(self._codec.invalidate(key))

    async def invalidate_tag(self, tag: str) -> None:
        """Invalidate every value stored with *tag* (see `RedisBackend.invalidate_tag`)."""
        await self._send(self._tagging(tag))
        self._tag_done(tag)

    async def ainvalidate_tag(self, tag: str) -> None:
        """The same as `invalidate_tag`, by the asyncio methods' a-prefixed name."""
        await self.invalidate_tag(tag)
