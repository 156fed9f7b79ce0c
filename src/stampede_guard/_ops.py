"""The operations a plan asks its driver to carry out, one frozen object each."""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, TypeAlias

from stampede_guard._entry import Entry

__all__ = [
    "AwaitFlight",
    "AwaitNotice",
    "Bypass",
    "Compute",
    "Delete",
    "Extend",
    "Get",
    "GetOrLock",
    "Op",
    "Set",
    "SetAndUnlock",
    "Spawn",
    "Subscribe",
    "TakeLock",
    "Tick",
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
class TakeLock:
    """Take the lock with *token* if it is free, whatever is stored; sends back the holder.

    Unlike `GetOrLock` it does not look at the value: a refresh locks a key that
    holds one.
    """

    key: str
    token: str
    lock_ttl: float


@dataclass(frozen=True, slots=True)
class Extend:
    """Extend *token*'s lock on *key* to *lock_ttl*; sends back whether it still held it."""

    key: str
    token: str
    lock_ttl: float


@dataclass(frozen=True, slots=True)
class Tick:
    """Wait *seconds* beside a running computation (see `Compute.watchdog`).

    Sends back True, or False once the computation has ended (then the watchdog
    stops). An asyncio driver may instead cancel the watchdog, which ends it too.
    """

    seconds: float


@dataclass(frozen=True, slots=True)
class Compute:
    """Call the decorated function for *key*; sends back its value (or its exception).

    With *watchdog* (a plan of `Tick` and `Extend`: lease renewal), the driver runs it
    beside the function and stops it when the function returns. While the function
    runs, a call of the same key from inside it (same thread or task chain) fails at
    once instead of waiting for itself. With *apart* (asyncio), the computation and
    the rest of the plan run in a task of their own: a cancelled caller returns at
    once, and the task goes on for at most *bound* seconds to store the value.
    """

    key: str
    watchdog: Generator[Op, Any, None] | None = None
    apart: bool = False
    bound: float = 0.0


@dataclass(frozen=True, slots=True)
class Bypass:
    """Call the decorated function as it is, outside the cache; sends back its value."""


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
class Delete:
    """Delete *key*'s value (an invalidation); sends back None."""

    key: str


@dataclass(frozen=True, slots=True)
class Subscribe:
    """Ask to hear when *key* is stored or unlocked; sends back a subscription handle.

    The handle is opaque to the plan. It is None where the backend cannot notify;
    `AwaitNotice` then simply sleeps.
    """

    key: str


@dataclass(frozen=True, slots=True)
class AwaitNotice:
    """Wait up to *seconds* for a notice on *subscription* (from `Subscribe`).

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


@dataclass(frozen=True, slots=True)
class Spawn:
    """Run *steps* (a plan) in the background; sends back None at once.

    The sync driver runs it in a daemon thread, the asyncio driver in a task that the
    caller's wrapper keeps until it is done. Nobody awaits it: *steps* handles its
    own failures.
    """

    steps: Generator[Op, Any, None]


Op: TypeAlias = (
    Get
    | GetOrLock
    | TakeLock
    | Extend
    | Tick
    | Compute
    | Bypass
    | Set
    | SetAndUnlock
    | Unlock
    | Delete
    | Subscribe
    | AwaitNotice
    | AwaitFlight
    | Unsubscribe
    | Spawn
)
