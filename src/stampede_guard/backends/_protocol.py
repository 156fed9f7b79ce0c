"""What a backend stores and the Protocol it implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = ["AsyncBackend", "Backend", "Entry"]


@dataclass(frozen=True, slots=True)
class Entry:
    """A cached value with what is known about how it was made.

    Attributes:
        value: What the decorated function returned.
        created_at: Wall-clock time (Unix seconds) when the value was stored.
        compute_seconds: How long computing it took; later used to refresh early.
    """

    value: object
    created_at: float
    compute_seconds: float


@runtime_checkable
class Backend(Protocol):
    """A store for entries and per-key locks, shared by every caller that must coordinate.

    Keys are the decorator's full cache keys; a backend maps them to its own storage.
    Locks are leases: *lock_ttl* bounds how long a dead holder blocks others, and a lock
    is only ever released by the caller holding its random *token*.
    Run `stampede_guard.testing.BackendContract` against an implementation to prove it.
    """

    def get(self, key: str) -> Entry | None:
        """Return the live entry for *key*, or None (expired, absent or unreadable)."""

    def get_or_lock(self, key: str, token: str, lock_ttl: float) -> Entry | str:
        """Return the entry for *key* if there is one; otherwise take its lock if free.

        Without an entry, returns the token that holds the lock afterwards: *token* if
        this call took it (for *lock_ttl* seconds), the holder's own token otherwise,
        so that waiters can tell when the lock has passed to a new holder.
        This must be atomic: it is the algorithm's "check again after locking" step, so
        a caller never takes the lock while a value is stored.
        """

    def set(self, key: str, entry: Entry, ttl: float) -> Entry:
        """Store *entry* for *ttl* seconds, replacing any previous one.

        Returns the entry as later reads will return it: a serializing backend returns
        the decoded copy, so the caller that computed gets what every other caller gets
        (with JSON, a tuple comes back as a list for everyone, not for all but one).
        """

    def set_and_unlock(self, key: str, entry: Entry, ttl: float, token: str) -> Entry:
        """Store *entry* as `set` does, then release the lock if *token* still holds it.

        The value is stored even if the lock has passed to someone else: a late
        leader's value is as good as the new leader's. Only the lock is fenced.
        """

    def unlock(self, key: str, token: str) -> bool:
        """Release the lock on *key* if *token* holds it; return whether it did."""

    def delete(self, key: str) -> None:
        """Drop the entry for *key* (its lock, if any, is left alone)."""


@runtime_checkable
class AsyncBackend(Protocol):
    """The `Backend` contract for asyncio code: the same six methods, as coroutines.

    Their names carry an ``a`` prefix so that one object can serve both kinds of code
    (`MemoryBackend` does; `AsyncRedisBackend` serves asyncio only). The semantics of
    each method are those of its `Backend` namesake.
    """

    async def aget(self, key: str) -> Entry | None:
        """See `Backend.get`."""

    async def aget_or_lock(self, key: str, token: str, lock_ttl: float) -> Entry | str:
        """See `Backend.get_or_lock`."""

    async def aset(self, key: str, entry: Entry, ttl: float) -> Entry:
        """See `Backend.set`."""

    async def aset_and_unlock(
        self, key: str, entry: Entry, ttl: float, token: str
    ) -> Entry:
        """See `Backend.set_and_unlock`."""

    async def aunlock(self, key: str, token: str) -> bool:
        """See `Backend.unlock`."""

    async def adelete(self, key: str) -> None:
        """See `Backend.delete`."""
