"""The Protocols a backend implements (and, re-exported, the data it stores)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

# The data a backend exchanges with the plan lives in a core module, so the plan needs
# no backend code; re-exported here, where backends and their users have found them.
from stampede_guard._entry import (
    FENCE_SECONDS,
    RELEASED,
    CachedFailure,
    Claim,
    Entry,
    Notice,
    Released,
)

__all__ = [
    "FENCE_SECONDS",
    "RELEASED",
    "AsyncBackend",
    "AsyncBatchBackend",
    "AsyncNotifier",
    "AsyncSubscription",
    "AsyncTagBackend",
    "Backend",
    "BatchBackend",
    "CachedFailure",
    "Claim",
    "Entry",
    "Notice",
    "Notifier",
    "Released",
    "Subscription",
    "TagBackend",
]


@runtime_checkable
class Backend(Protocol):
    """A store for entries and per-key locks, shared by every caller that must coordinate.

    Keys are the decorator's full cache keys; a backend maps them to its own storage.
    Locks are leases: *lock_ttl* bounds how long a dead holder blocks others, and a lock
    is only ever released by the caller holding its random *token*.

    Fencing (optional but what makes `delete` final): `get_or_lock` and `lock` return a
    `Claim` carrying a ticket, and the stores take the ticket of the look that preceded
    their computation. A store is refused (returns None) when the stored value's ticket
    is later, or when a `delete` came after the ticket. A `delete` is remembered for
    `FENCE_SECONDS`; the plan never stores a computation that ran longer.
    Run `stampede_guard.testing.BackendContract` against an implementation to prove it.
    """

    def get(self, key: str) -> Entry | None:
        """Return the live entry for *key*, or None (expired, absent or unreadable)."""

    def get_or_lock(self, key: str, token: str, lock_ttl: float) -> Entry | str:
        """Return the entry for *key* if there is one; otherwise take its lock if free.

        Without an entry, returns the token that holds the lock afterwards: *token* if
        this call took it (for *lock_ttl* seconds), the holder's own token otherwise,
        so that waiters can tell when the lock has passed to a new holder. A fencing
        backend returns it as a `Claim`.
        This must be atomic: it is the algorithm's "check again after locking" step, so
        a caller never takes the lock while a value is stored.
        """

    def lock(self, key: str, token: str, lock_ttl: float) -> str:
        """Take the lock on *key* if it is free, whatever is stored; return its holder.

        Used to refresh a value that is still stored (stale, or due for an early
        refresh) under the same lock as a miss, so one caller at a time computes it.
        """

    def set(
        self, key: str, entry: Entry, ttl: float, *, ticket: int | None = None
    ) -> Entry | None:
        """Store *entry* for *ttl* seconds, replacing any previous one.

        Returns the entry as later reads will return it: a serializing backend returns
        the decoded copy, so the caller that computed gets what every other caller gets
        (with JSON, a tuple comes back as a list for everyone, not for all but one).
        With a *ticket* (see `Claim`), returns None and stores nothing if the stored
        value began later or the key was deleted after the ticket.
        """

    def set_and_unlock(
        self,
        key: str,
        entry: Entry,
        ttl: float,
        token: str,
        *,
        ticket: int | None = None,
    ) -> Entry | None:
        """Store *entry* as `set` does and release *token*'s lock: a fenced write.

        If another token holds the lock now (this caller's lease ran out and someone
        took over), nothing is stored and that lock is left alone: the new holder is
        computing a newer value. If the lock is free, the entry is stored. Returns
        the entry as readers would decode it, stored or not, except that a store
        refused for its *ticket* (see `set`) returns None; the lock is released then.
        """

    def extend(self, key: str, token: str, lock_ttl: float) -> bool:
        """Renew the lease of *token*'s lock on *key* to *lock_ttl* seconds from now.

        Returns False, changing nothing, if *token* no longer holds the lock.
        """

    def unlock(self, key: str, token: str) -> bool:
        """Release the lock on *key* if *token* holds it; return whether it did."""

    def delete(self, key: str) -> None:
        """Invalidate *key*: drop its entry, revoke its lock, fence out older stores.

        Final: once it returns, no computation that began before it (by ticket) can
        store its value, and the next caller takes the lock at once. The release is
        announced, so waiters look again instead of waiting for the revoked holder.
        """


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

    async def alock(self, key: str, token: str, lock_ttl: float) -> str:
        """See `Backend.lock`."""

    async def aset(
        self, key: str, entry: Entry, ttl: float, *, ticket: int | None = None
    ) -> Entry | None:
        """See `Backend.set`."""

    async def aset_and_unlock(
        self,
        key: str,
        entry: Entry,
        ttl: float,
        token: str,
        *,
        ticket: int | None = None,
    ) -> Entry | None:
        """See `Backend.set_and_unlock`."""

    async def aextend(self, key: str, token: str, lock_ttl: float) -> bool:
        """See `Backend.extend`."""

    async def aunlock(self, key: str, token: str) -> bool:
        """See `Backend.unlock`."""

    async def adelete(self, key: str) -> None:
        """See `Backend.delete`."""


# Batches: an optional capability. A backend that has it serves many keys in one
# call, one round trip instead of one per key, for functions that compute many values
# at once. Each key is decided exactly as the single method decides it.


@runtime_checkable
class BatchBackend(Protocol):
    """A `Backend` that can look, lock, store and release many keys in one call.

    Each method does, for every key in order, what its single namesake does (same
    results, same fencing, same announcements), as if called once per key one after
    the other; a key may repeat, and is then decided again, as a second call would.
    The batch need not be atomic as a whole, only per key: another caller may see
    some keys of a batch done and others not yet.
    Results come back in the order of the keys given.
    """

    def get_many(self, keys: Sequence[str]) -> list[Entry | None]:
        """Return `Backend.get` of each key."""

    def get_or_lock_many(
        self, keys: Sequence[str], token: str, lock_ttl: float
    ) -> list[Entry | Claim]:
        """Return `Backend.get_or_lock` of each key, every lock taken for *token*."""

    def set_and_unlock_many(
        self, items: Sequence[tuple[str, Entry, float, int | None]], token: str
    ) -> list[Entry | None]:
        """Return `Backend.set_and_unlock` of each (key, entry, ttl, ticket) item.

        Raises `SerializationError` (of a serializing backend) before storing
        anything if one of the entries cannot be encoded.
        """

    def unlock_many(self, keys: Sequence[str], token: str) -> list[bool]:
        """Return `Backend.unlock` of each key."""


@runtime_checkable
class AsyncBatchBackend(Protocol):
    """`BatchBackend` for asyncio code: the same four methods, as coroutines."""

    async def aget_many(self, keys: Sequence[str]) -> list[Entry | None]:
        """See `BatchBackend.get_many`."""

    async def aget_or_lock_many(
        self, keys: Sequence[str], token: str, lock_ttl: float
    ) -> list[Entry | Claim]:
        """See `BatchBackend.get_or_lock_many`."""

    async def aset_and_unlock_many(
        self, items: Sequence[tuple[str, Entry, float, int | None]], token: str
    ) -> list[Entry | None]:
        """See `BatchBackend.set_and_unlock_many`."""

    async def aunlock_many(self, keys: Sequence[str], token: str) -> list[bool]:
        """See `BatchBackend.unlock_many`."""


# Tags: an optional capability. A backend that has it keeps `Entry.tags` with each
# entry and invalidates every entry carrying a tag in one call.


@runtime_checkable
class TagBackend(Protocol):
    """A `Backend` that can invalidate all entries carrying a tag at once.

    Entries stored with `Entry.tags` are read as absent (by `get`, `get_or_lock` and
    the batch reads) once one of their tags was invalidated, and a store whose ticket
    precedes a tag's invalidation is refused, as after `delete`.
    """

    def invalidate_tag(self, tag: str) -> None:
        """Invalidate every entry stored with *tag*, in every process sharing it.

        Final as `delete` is: once it returns, no entry carrying *tag* that was
        stored before is read again, and no computation that began before it stores
        a value carrying *tag*.
        """


@runtime_checkable
class AsyncTagBackend(Protocol):
    """`TagBackend` for asyncio code."""

    async def ainvalidate_tag(self, tag: str) -> None:
        """See `TagBackend.invalidate_tag`."""


# Notifications: an optional capability. A backend that has it wakes waiters the moment
# a value is stored (or a lock let go) instead of at their next poll; without it,
# waiters poll with backoff, which stays the safety net for lost notifications anyway.


class Subscription(Protocol):
    """News about one key, from `Notifier.subscribe`."""

    def wait(self, seconds: float) -> Notice | None:
        """Return the next notice, or None if none came within *seconds*."""

    def close(self) -> None:
        """Stop listening; never raises."""


@runtime_checkable
class Notifier(Protocol):
    """A `Backend` that can announce stores and releases to waiters, as they happen.

    A notice announces an entry stored by `set` or `set_and_unlock` (carrying it, so
    waiters need not read it back) or a lock released by `unlock`. Notices may be lost;
    waiters keep polling as a fallback.
    """

    def subscribe(self, key: str) -> Subscription:
        """Start listening for notices about *key*; must not miss any sent after it returns."""


class AsyncSubscription(Protocol):
    """`Subscription` for asyncio code."""

    async def wait(self, seconds: float) -> Notice | None:
        """See `Subscription.wait`."""

    async def close(self) -> None:
        """See `Subscription.close`."""


@runtime_checkable
class AsyncNotifier(Protocol):
    """`Notifier` for an `AsyncBackend`."""

    async def asubscribe(self, key: str) -> AsyncSubscription:
        """See `Notifier.subscribe`."""
