"""The operations a plan asks its driver to carry out, one frozen object each."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

from stampede_guard.backends._protocol import Entry

__all__ = [
    "Await",
    "AwaitFlight",
    "Compute",
    "Get",
    "GetOrLock",
    "Lock",
    "Op",
    "Renewal",
    "Set",
    "SetAndUnlock",
    "Subscribe",
    "Unlock",
    "Unsubscribe",
]


@dataclass(frozen=True, slots=True)
class Get:
    """Read the entry for *key*; the driver sends back ``Entry | None``."""

    key: str


@dataclass(frozen=True, slots=True)
class GetOrLock:
    """Read the entry, or take the lock with *token*; sends back ``Entry | bool``."""

    key: str
    token: str
    lock_ttl: float


@dataclass(frozen=True, slots=True)
class Lock:
    """Take the lock with *token* if it is free, whatever is stored; sends back the holder."""

    key: str
    token: str
    lock_ttl: float


@dataclass(frozen=True, slots=True)
class Renewal:
    """Keep *token*'s lock on *key* alive while computing.

    Every third of *lock_ttl*, extend it to *lock_ttl*, for *limit* seconds at most.
    """

    key: str
    token: str
    lock_ttl: float
    limit: float


@dataclass(frozen=True, slots=True)
class Compute:
    """Call the decorated function for *key*; sends back its value (or its exception).

    With *renewal*, the driver renews the lock's lease while the function runs. While
    it runs, a call of the same key from inside it (same thread or task chain) fails
    at once instead of waiting for itself. With *apart* (asyncio), the computation and
    the rest of the plan run in a task of their own: a cancelled caller returns at
    once, and the task goes on for at most *bound* seconds to store the value.
    """

    key: str
    renewal: Renewal | None = None
    apart: bool = False
    bound: float = 0.0


@dataclass(frozen=True, slots=True)
class Set:
    """Store *entry* without holding the lock; sends back the stored Entry, or None.

    *ticket* is that of the look before the computation began (None if the backend
    gives none): the backend refuses the store (None) if a later value or an
    invalidation came after it.
    """

    key: str
    entry: Entry
    ttl: float
    ticket: int | None


@dataclass(frozen=True, slots=True)
class SetAndUnlock:
    """Store *entry* and release *token*'s lock; sends back the stored Entry, or None.

    None: refused for its *ticket*, as `Set` (the lock is released all the same).
    """

    key: str
    entry: Entry
    ttl: float
    token: str
    ticket: int | None


@dataclass(frozen=True, slots=True)
class Unlock:
    """Release the lock held by *token* without storing anything; sends back a bool.

    With *apart*, the driver releases it without the caller waiting (in a thread or a
    task of its own, failures logged) and sends back None: for a release after a
    failed store, which has already cost the caller its one socket timeout.
    """

    key: str
    token: str
    apart: bool = False


@dataclass(frozen=True, slots=True)
class Subscribe:
    """Ask to hear when *key* is stored or unlocked; sends back a subscription handle.

    The handle is opaque to the plan. It is None where the backend cannot notify;
    `Await` then simply sleeps.
    """

    key: str


@dataclass(frozen=True, slots=True)
class Await:
    """Wait up to *seconds* for news on *subscription*.

    Sends back the stored `Entry` if one was announced, `RELEASED` if the lock was let
    go without a value, or None when the time ran out (or nothing can be heard).
    """

    subscription: object
    seconds: float


@dataclass(frozen=True, slots=True)
class AwaitFlight:
    """Wait up to *seconds* for *flight* (another caller in this process) to finish.

    Sends back True once it has an outcome, False if the time ran out first.
    """

    flight: object
    seconds: float


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    """Stop listening on *subscription* (from `Subscribe`); sends back None, never raises."""

    subscription: object


Op: TypeAlias = (
    Get
    | GetOrLock
    | Lock
    | Compute
    | Set
    | SetAndUnlock
    | Unlock
    | Subscribe
    | Await
    | AwaitFlight
    | Unsubscribe
)
