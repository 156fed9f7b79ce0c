"""The operations a plan asks its driver to carry out, one frozen object each."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

from stampede_guard.backends._protocol import Entry

__all__ = [
    "Compute",
    "Get",
    "GetOrLock",
    "Op",
    "Set",
    "SetAndUnlock",
    "Sleep",
    "Unlock",
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
class Compute:
    """Call the decorated function; sends back its value (or throws its exception)."""


@dataclass(frozen=True, slots=True)
class Set:
    """Store *entry* without holding the lock (a waiter that timed out); sends the stored Entry."""

    key: str
    entry: Entry
    ttl: float


@dataclass(frozen=True, slots=True)
class SetAndUnlock:
    """Store *entry* and release the lock held by *token*; sends back the stored Entry."""

    key: str
    entry: Entry
    ttl: float
    token: str


@dataclass(frozen=True, slots=True)
class Unlock:
    """Release the lock held by *token* without storing anything; sends back a bool."""

    key: str
    token: str


@dataclass(frozen=True, slots=True)
class Sleep:
    """Wait *seconds* before looking again; sends back None."""

    seconds: float


Op: TypeAlias = Get | GetOrLock | Compute | Set | SetAndUnlock | Unlock | Sleep
