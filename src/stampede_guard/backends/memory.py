"""The in-memory backend: per process, thread-safe, values kept as Python objects."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeAlias

from stampede_guard._bounded import BoundedStore, check_maxsize
from stampede_guard._clock import StepFreeClock
from stampede_guard._tags import check_tag
from stampede_guard.backends._protocol import (
    FENCE_SECONDS,
    RELEASED,
    Claim,
    Entry,
    Notice,
)

__all__ = ["MemoryBackend"]

_Keys: TypeAlias = set[str]  # (in the class, ``set`` is a method's name)


class MemoryBackend:
    """Keep entries and locks in this process's memory.

    Values are stored as the very objects the function returned (no serialization, so
    no copy: treat them as read-only). Expiry runs on the monotonic clock. Coordinates
    the threads and asyncio tasks of one process (one object serves both: its async
    methods never block, they hold a mutex for microseconds); use `RedisBackend` or
    `AsyncRedisBackend` to coordinate processes or hosts.

    At most *maxsize* entries are kept: past it, the least recently used goes (an
    evicted key is a miss, computed once again under the same stampede protection).

    Args:
        maxsize: Most entries kept; None for no limit. The default, 100,000, bounds
            the store at roughly 30 MB of small values (measured: 29 MB per 100,000
            live keys of a small dict each), which no container should run out of
            memory over, while a working set that fits is never evicted. An unbounded
            store grew until the ttl of every key it ever saw ran out.
        clock: Monotonic time source, in seconds; tests pass a fake one.
    """

    # Expired entries are dropped lazily on access, and swept whenever the store has
    # doubled in size since the last sweep, so memory stays bounded by live keys.
    _MIN_SWEEP_SIZE = 1024

    #: Reads cost no I/O, so a hit is answered before any in-process coalescing.
    local = True

    def __init__(
        self,
        *,
        maxsize: int | None = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._wall = StepFreeClock()
        self._mutex = threading.Lock()
        self._entries: BoundedStore[str, Entry] = BoundedStore(
            check_maxsize(maxsize, "MemoryBackend", allow_none=True), clock=clock
        )
        #: `get` as a closure, which the decorator calls first (its hot path).
        self.local_read = self._entries.reader()
        self._locks: dict[str, tuple[str, float]] = {}
        # Per key, the ticket below which stores are refused (the stored value's, or
        # an invalidation's), and until when that holds.
        self._floors: dict[str, tuple[int, float]] = {}
        # Per tag, the ticket of its last invalidation (stores of computations begun
        # before it are refused) and until when; and the keys stored with it.
        self._tag_floors: dict[str, tuple[int, float]] = {}
        self._tagged: dict[str, _Keys] = {}
        self._last_ticket = 0
        self._sweep_at = self._MIN_SWEEP_SIZE
        self._listeners: dict[str, set[_Listener]] = {}

    def __repr__(self) -> str:
        return f"MemoryBackend(entries={len(self._entries)}, locks={len(self._locks)})"

    @property
    def maxsize(self) -> int | None:
        """The most entries kept (None: no limit)."""
        return self._entries.maxsize

    @property
    def evictions(self) -> int:
        """Entries dropped so far to keep within *maxsize*."""
        return self._entries.evictions

    def now(self) -> float:
        """Return the time (Unix seconds) entries are stamped and judged fresh by.

        The wall clock when the backend was made, advanced by a clock that never
        steps: a step of the host's clock changes no freshness decision.
        """
        return self._wall()

    def get(self, key: str) -> Entry | None:
        """Return the live entry for *key*, or None."""
        # No mutex: the store's read is atomic (see `BoundedStore`).
        return self.local_read(key)

    def get_or_lock(self, key: str, token: str, lock_ttl: float) -> Entry | Claim:
        """Return the entry for *key*, or the lock holder's token (taking a free lock)."""
        with self._mutex:
            return self._get_or_take(key, token, lock_ttl, self._clock())

    def _get_or_take(
        self, key: str, token: str, lock_ttl: float, now: float
    ) -> Entry | Claim:
        entry = self._live_entry(key, now)
        if entry is not None:
            return entry
        return self._take(key, token, lock_ttl, now)

    def lock(self, key: str, token: str, lock_ttl: float) -> Claim:
        """Take the lock on *key* if it is free; return its holder's token."""
        with self._mutex:
            return self._take(key, token, lock_ttl, self._clock())

    def _take(self, key: str, token: str, lock_ttl: float, now: float) -> Claim:
        held = self._locks.get(key)
        if held is None or held[1] <= now:
            self._locks[key] = held = (token, now + lock_ttl)
        return Claim(held[0], self._ticket(now))

    def _ticket(self, now: float) -> int:
        # Microseconds of the monotonic clock, strictly increasing even when it stands
        # still (a fake clock), so two looks are always ordered.
        self._last_ticket = max(self._last_ticket + 1, int(now * 1e6))
        return self._last_ticket

    def set(
        self, key: str, entry: Entry, ttl: float, *, ticket: int | None = None
    ) -> Entry | None:
        """Store *entry* for *ttl* seconds; return it (the very object), or None if fenced."""
        with self._mutex:
            now = self._clock()
            if self._fenced(key, ticket, now, entry.tags):
                return None
            self._store(key, entry, ttl, ticket, now)
            listeners = self._listeners.get(key)
        _announce(listeners, entry)
        return entry

    def set_and_unlock(
        self,
        key: str,
        entry: Entry,
        ttl: float,
        token: str,
        *,
        ticket: int | None = None,
    ) -> Entry | None:
        """Store *entry* and release the lock, unless another token holds it (fenced)."""
        with self._mutex:
            listeners, notice = self._store_and_release(
                key, entry, ttl, token, ticket=ticket, now=self._clock()
            )
        _announce(listeners, notice)
        return None if notice is RELEASED else entry

    def _store_and_release(
        self,
        key: str,
        entry: Entry,
        ttl: float,
        token: str,
        *,
        ticket: int | None,
        now: float,
    ) -> tuple[_Listeners, Notice]:
        """Decide `set_and_unlock` (under the mutex); return whom to tell, and what."""
        if self._fenced(key, ticket, now, entry.tags):
            # Refused: a newer value or an invalidation came after this computation
            # began. Neither stored nor announced; the lock, if still ours, is let go.
            released = self._release(key, token)
            return (self._listeners.get(key) if released else None), RELEASED
        held = self._locks.get(key)
        if held is None or held[0] == token or held[1] <= now:
            self._store(key, entry, ttl, ticket, now)
            self._release(key, token)
        return self._listeners.get(key), entry

    def unlock(self, key: str, token: str) -> bool:
        """Release the lock on *key* if *token* holds it."""
        with self._mutex:
            released, listeners = self._unlock(key, token)
        _announce(listeners, RELEASED)
        return released

    def _unlock(self, key: str, token: str) -> tuple[bool, _Listeners]:
        """Decide `unlock` (under the mutex); return whether, and whom to tell."""
        released = self._release(key, token)
        return released, (self._listeners.get(key) if released else None)

    # Batches: one mutex acquisition for every key, each decided by the very helper
    # its single method uses; announced once the mutex is let go, as they are.

    def get_many(self, keys: Sequence[str]) -> list[Entry | None]:
        """Return the live entry of each key (see `get`)."""
        return [self.local_read(key) for key in keys]

    def get_or_lock_many(
        self, keys: Sequence[str], token: str, lock_ttl: float
    ) -> list[Entry | Claim]:
        """Return, per key, its entry or its lock holder's token (see `get_or_lock`)."""
        with self._mutex:
            now = self._clock()
            return [self._get_or_take(key, token, lock_ttl, now) for key in keys]

    def set_and_unlock_many(
        self, items: Sequence[tuple[str, Entry, float, int | None]], token: str
    ) -> list[Entry | None]:
        """`set_and_unlock` each (key, entry, ttl, ticket) item (see `set_and_unlock`)."""
        with self._mutex:
            now = self._clock()
            decided = [
                self._store_and_release(key, entry, ttl, token, ticket=ticket, now=now)
                for key, entry, ttl, ticket in items
            ]
        for listeners, notice in decided:
            _announce(listeners, notice)
        return [
            None if notice is RELEASED else entry
            for (_, entry, _, _), (_, notice) in zip(items, decided, strict=True)
        ]

    def unlock_many(self, keys: Sequence[str], token: str) -> list[bool]:
        """Release each key's lock that *token* holds (see `unlock`)."""
        with self._mutex:
            decided = [self._unlock(key, token) for key in keys]
        for _, listeners in decided:
            _announce(listeners, RELEASED)
        return [released for released, _ in decided]

    def extend(self, key: str, token: str, lock_ttl: float) -> bool:
        """Renew *token*'s lock on *key* for *lock_ttl* seconds if it still holds it."""
        with self._mutex:
            now = self._clock()
            held = self._locks.get(key)
            if held is None or held[0] != token or held[1] <= now:
                return False
            self._locks[key] = (token, now + lock_ttl)
            return True

    def subscribe(self, key: str) -> _Subscription:
        """Hear of stores and releases of *key* from now on (threads)."""
        listener = _Listener(queue.SimpleQueue(), None)
        self._listen(key, listener)
        return _Subscription(self, key, listener)

    async def asubscribe(self, key: str) -> _AsyncSubscription:
        """Hear of stores and releases of *key* from now on (this event loop)."""
        listener = _Listener(asyncio.Queue(), asyncio.get_running_loop())
        self._listen(key, listener)
        return _AsyncSubscription(self, key, listener)

    def _listen(self, key: str, listener: _Listener) -> None:
        with self._mutex:
            self._listeners.setdefault(key, set()).add(listener)

    def _unlisten(self, key: str, listener: _Listener) -> None:
        with self._mutex:
            listeners = self._listeners.get(key)
            if listeners is not None:
                listeners.discard(listener)
                if not listeners:
                    del self._listeners[key]

    def delete(self, key: str) -> None:
        """Invalidate *key*: drop its entry, revoke its lock, refuse older stores."""
        with self._mutex:
            now = self._clock()
            self._entries.pop(key)
            revoked = self._locks.pop(key, None)
            self._floors[key] = (self._ticket(now), now + FENCE_SECONDS)
            listeners = self._listeners.get(key) if revoked is not None else None
        _announce(listeners, RELEASED)  # waiters look again rather than wait for it

    def invalidate_tag(self, tag: str) -> None:
        """Invalidate every entry stored with *tag*, and fence out older stores of it.

        Final as `delete` is: no computation that began before this returns stores a
        value carrying *tag*. In memory the tagged entries are dropped at once (the
        keys stored with the tag are indexed); Redis does it in O(1) writes instead.
        """
        check_tag(tag)  # as Redis does: the same tags work on both
        with self._mutex:
            now = self._clock()
            self._tag_floors[tag] = (self._ticket(now), now + FENCE_SECONDS)
            for key in self._carrying(tag, self._tagged.pop(tag, set())):
                self._entries.pop(key)

    def _carrying(self, tag: str, keys: _Keys) -> _Keys:
        """The keys of *keys* whose stored entry still carries *tag*."""
        found = ((key, self._entries.peek(key)) for key in keys)
        return {key for key, kept in found if kept is not None and tag in kept[0].tags}

    # The asyncio face: the same operations, which never wait on I/O.

    async def aget(self, key: str) -> Entry | None:
        """See `get`."""
        return self.get(key)

    async def aget_or_lock(
        self, key: str, token: str, lock_ttl: float
    ) -> Entry | Claim:
        """See `get_or_lock`."""
        return self.get_or_lock(key, token, lock_ttl)

    async def alock(self, key: str, token: str, lock_ttl: float) -> Claim:
        """See `lock`."""
        return self.lock(key, token, lock_ttl)

    async def aset(
        self, key: str, entry: Entry, ttl: float, *, ticket: int | None = None
    ) -> Entry | None:
        """See `set`."""
        return self.set(key, entry, ttl, ticket=ticket)

    async def aset_and_unlock(
        self,
        key: str,
        entry: Entry,
        ttl: float,
        token: str,
        *,
        ticket: int | None = None,
    ) -> Entry | None:
        """See `set_and_unlock`."""
        return self.set_and_unlock(key, entry, ttl, token, ticket=ticket)

    async def aget_many(self, keys: Sequence[str]) -> list[Entry | None]:
        """See `get_many`."""
        return self.get_many(keys)

    async def aget_or_lock_many(
        self, keys: Sequence[str], token: str, lock_ttl: float
    ) -> list[Entry | Claim]:
        """See `get_or_lock_many`."""
        return self.get_or_lock_many(keys, token, lock_ttl)

    async def aset_and_unlock_many(
        self, items: Sequence[tuple[str, Entry, float, int | None]], token: str
    ) -> list[Entry | None]:
        """See `set_and_unlock_many`."""
        return self.set_and_unlock_many(items, token)

    async def aunlock_many(self, keys: Sequence[str], token: str) -> list[bool]:
        """See `unlock_many`."""
        return self.unlock_many(keys, token)

    async def aextend(self, key: str, token: str, lock_ttl: float) -> bool:
        """See `extend`."""
        return self.extend(key, token, lock_ttl)

    async def aunlock(self, key: str, token: str) -> bool:
        """See `unlock`."""
        return self.unlock(key, token)

    async def adelete(self, key: str) -> None:
        """See `delete`."""
        self.delete(key)

    async def ainvalidate_tag(self, tag: str) -> None:
        """See `invalidate_tag`."""
        self.invalidate_tag(tag)

    def clear(self) -> None:
        """Drop every entry and lock."""
        with self._mutex:
            self._entries.clear()
            self._locks.clear()
            self._floors.clear()
            self._tag_floors.clear()
            self._tagged.clear()

    def _live_entry(self, key: str, now: float) -> Entry | None:
        del now  # the store reads the same clock
        return self.local_read(key)

    def _fenced(
        self, key: str, ticket: int | None, now: float, tags: tuple[str, ...] = ()
    ) -> bool:
        """Whether a store of a computation that began at *ticket* must be refused."""
        if ticket is None:
            return False
        # A later computation stored its value, or an invalidation came after ours:
        # of the key, or of one of the value's tags.
        for floor in (self._floors.get(key), *map(self._tag_floors.get, tags)):
            if floor is not None and floor[1] > now and floor[0] > ticket:
                return True
        return False

    def _store(
        self, key: str, entry: Entry, ttl: float, ticket: int | None, now: float
    ) -> None:
        if ticket is not None:
            floor = self._floors.get(key)
            # The floor lives as long as the value, or as long as an invalidation's
            # fence still has to, whichever is longer.
            until = now + ttl if floor is None else max(now + ttl, floor[1])
            self._floors[key] = (ticket, until)
        self._entries.put(key, entry, now + ttl)
        for tag in entry.tags:
            self._tagged.setdefault(tag, set()).add(key)
        if len(self._entries) + len(self._locks) + len(self._floors) >= self._sweep_at:
            self._sweep(now)

    def _release(self, key: str, token: str) -> bool:
        held = self._locks.get(key)
        # An expired lock may already belong to someone else's past; only the exact
        # token may delete it, and an expired one of ours is as good as released.
        if held is None or held[0] != token:
            return False
        del self._locks[key]
        return held[1] > self._clock()

    def _sweep(self, now: float) -> None:
        self._entries.sweep()
        self._locks = {k: v for k, v in self._locks.items() if v[1] > now}
        self._floors = {k: v for k, v in self._floors.items() if v[1] > now}
        self._tag_floors = {k: v for k, v in self._tag_floors.items() if v[1] > now}
        self._tagged = {
            tag: kept
            for tag, keys in self._tagged.items()
            if (kept := self._carrying(tag, keys))
        }
        live = len(self._entries) + len(self._locks) + len(self._floors)
        self._sweep_at = max(self._MIN_SWEEP_SIZE, 2 * live)


class _Listener:
    """Where one subscription's notices go: a thread queue, or an event loop's queue."""

    __slots__ = ("loop", "notices")

    def __init__(
        self,
        notices: queue.SimpleQueue[Notice] | asyncio.Queue[Notice],
        loop: asyncio.AbstractEventLoop | None,
    ) -> None:
        self.notices = notices
        self.loop = loop

    def deliver(self, notice: Notice) -> None:
        if self.loop is None:
            self.notices.put_nowait(notice)
            return
        # From any thread; a loop that has closed has nobody left to tell.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.notices.put_nowait, notice)


# Whom a change of one key must be told (None: nobody), decided under the mutex.
_Listeners: TypeAlias = set[_Listener] | None


def _announce(listeners: _Listeners, notice: Notice) -> None:
    for listener in list(listeners or ()):
        listener.deliver(notice)


class _Subscription:
    def __init__(self, backend: MemoryBackend, key: str, listener: _Listener) -> None:
        self._backend, self._key, self._listener = backend, key, listener

    def wait(self, seconds: float) -> Notice | None:
        notices = self._listener.notices
        assert isinstance(notices, queue.SimpleQueue)  # noqa: S101 - built that way
        try:
            return notices.get(timeout=seconds)
        except queue.Empty:
            return None

    def close(self) -> None:
        self._backend._unlisten(self._key, self._listener)  # noqa: SLF001


class _AsyncSubscription:
    def __init__(self, backend: MemoryBackend, key: str, listener: _Listener) -> None:
        self._backend, self._key, self._listener = backend, key, listener

    async def wait(self, seconds: float) -> Notice | None:
        notices = self._listener.notices
        assert isinstance(notices, asyncio.Queue)  # noqa: S101 - built that way
        try:
            return await asyncio.wait_for(notices.get(), seconds)
        except TimeoutError:
            return None

    async def close(self) -> None:
        self._backend._unlisten(self._key, self._listener)  # noqa: SLF001


_default: MemoryBackend | None = None
_default_guard = threading.Lock()


def default_backend() -> MemoryBackend:
    """Return the process-wide MemoryBackend used when no backend= is given.

    This is stampede_guard's one piece of module-level state: decorated functions that
    name no backend share it, so their keys must differ (the default keys do).
    """
    global _default  # noqa: PLW0603
    with _default_guard:
        if _default is None:
            _default = MemoryBackend()
        return _default
