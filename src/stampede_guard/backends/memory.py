"""The in-memory backend: per process, thread-safe, values kept as Python objects."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from stampede_guard.backends._protocol import Entry

__all__ = ["MemoryBackend"]


class MemoryBackend:
    """Keep entries and locks in this process's memory.

    Values are stored as the very objects the function returned (no serialization, so
    no copy: treat them as read-only). Expiry runs on the monotonic clock. Coordinates
    the threads and asyncio tasks of one process (one object serves both: its async
    methods never block, they hold a mutex for microseconds); use `RedisBackend` or
    `AsyncRedisBackend` to coordinate processes or hosts.

    Args:
        clock: Monotonic time source, in seconds; tests pass a fake one.
    """

    # Expired entries are dropped lazily on access, and swept whenever the store has
    # doubled in size since the last sweep, so memory stays bounded by live keys.
    _MIN_SWEEP_SIZE = 1024

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._mutex = threading.Lock()
        self._entries: dict[str, tuple[Entry, float]] = {}
        self._locks: dict[str, tuple[str, float]] = {}
        self._sweep_at = self._MIN_SWEEP_SIZE

    def __repr__(self) -> str:
        return f"MemoryBackend(entries={len(self._entries)}, locks={len(self._locks)})"

    def get(self, key: str) -> Entry | None:
        """Return the live entry for *key*, or None."""
        with self._mutex:
            return self._live_entry(key, self._clock())

    def get_or_lock(self, key: str, token: str, lock_ttl: float) -> Entry | str:
        """Return the entry for *key*, or the lock holder's token (taking a free lock)."""
        with self._mutex:
            now = self._clock()
            entry = self._live_entry(key, now)
            if entry is not None:
                return entry
            held = self._locks.get(key)
            if held is not None and held[1] > now:
                return held[0]
            self._locks[key] = (token, now + lock_ttl)
            return token

    def set(self, key: str, entry: Entry, ttl: float) -> Entry:
        """Store *entry* for *ttl* seconds; return it (the very object)."""
        with self._mutex:
            self._store(key, entry, ttl)
        return entry

    def set_and_unlock(self, key: str, entry: Entry, ttl: float, token: str) -> Entry:
        """Store *entry* and release the lock if *token* still holds it."""
        with self._mutex:
            self._store(key, entry, ttl)
            self._release(key, token)
        return entry

    def unlock(self, key: str, token: str) -> bool:
        """Release the lock on *key* if *token* holds it."""
        with self._mutex:
            return self._release(key, token)

    def delete(self, key: str) -> None:
        """Drop the entry for *key*."""
        with self._mutex:
            self._entries.pop(key, None)

    # The asyncio face: the same operations, which never wait on I/O.

    async def aget(self, key: str) -> Entry | None:
        """See `get`."""
        return self.get(key)

    async def aget_or_lock(self, key: str, token: str, lock_ttl: float) -> Entry | str:
        """See `get_or_lock`."""
        return self.get_or_lock(key, token, lock_ttl)

    async def aset(self, key: str, entry: Entry, ttl: float) -> Entry:
        """See `set`."""
        return self.set(key, entry, ttl)

    async def aset_and_unlock(
        self, key: str, entry: Entry, ttl: float, token: str
    ) -> Entry:
        """See `set_and_unlock`."""
        return self.set_and_unlock(key, entry, ttl, token)

    async def aunlock(self, key: str, token: str) -> bool:
        """See `unlock`."""
        return self.unlock(key, token)

    async def adelete(self, key: str) -> None:
        """See `delete`."""
        self.delete(key)

    def clear(self) -> None:
        """Drop every entry and lock."""
        with self._mutex:
            self._entries.clear()
            self._locks.clear()

    def _live_entry(self, key: str, now: float) -> Entry | None:
        stored = self._entries.get(key)
        if stored is None:
            return None
        if stored[1] <= now:
            del self._entries[key]
            return None
        return stored[0]

    def _store(self, key: str, entry: Entry, ttl: float) -> None:
        now = self._clock()
        self._entries[key] = (entry, now + ttl)
        if len(self._entries) + len(self._locks) >= self._sweep_at:
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
        self._entries = {k: v for k, v in self._entries.items() if v[1] > now}
        self._locks = {k: v for k, v in self._locks.items() if v[1] > now}
        self._sweep_at = max(
            self._MIN_SWEEP_SIZE, 2 * (len(self._entries) + len(self._locks))
        )


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
