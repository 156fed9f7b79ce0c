"""What a cache holds and a backend answers: entries, lock claims and notices.

Plain data, no I/O: the plan reads and writes these without importing any backend
code (``stampede_guard.backends`` re-exports them for backend authors).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final, Self, TypeAlias

__all__ = [
    "FENCE_SECONDS",
    "RELEASED",
    "CachedFailure",
    "Claim",
    "Entry",
    "Notice",
    "Released",
]


@dataclass(frozen=True, slots=True)
class Entry:
    """A cached value with what is known about how it was made.

    Attributes:
        value: What the decorated function returned.
        created_at: Wall-clock time (Unix seconds) when the value was stored.
        compute_seconds: How long computing it took; later used to refresh early.
        tags: What `invalidate_tag` invalidates it by: once any of these tags is
            invalidated after the entry's computation began, backends read it as
            absent (see `TagBackend`).
    """

    value: object
    created_at: float
    compute_seconds: float
    tags: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class CachedFailure:
    """A failure stored in place of a value (``cache_errors``), raised to every reader.

    Only the exception's type, by its qualified name, and its message are kept: an
    exception object may hold anything (a socket, a frame), and a name read back from
    a shared cache is never imported, only looked up among the types the decorator was
    told to cache (see ``_failures``).
    """

    type_name: str  # module.qualname of the exception's class
    message: str


# How long an invalidation fences out computations that began before it. A computation
# that ran longer than this is never stored (the plan keeps it to its callers), so the
# fence never has to outlive one.
FENCE_SECONDS: Final = 24 * 3600.0


class Claim(str):
    """The token holding a key's lock, with the backend's *ticket* for the look.

    A ticket is the backend's clock (in microseconds) when the look ran: a computation
    that starts after the look is newer than every computation that started before it.
    A store carries its computation's ticket, and a backend that fences refuses it when
    the stored value began later or an invalidation came after it. A ``str``, so that a
    backend written before tickets (returning the plain token) still serves: its stores
    are simply not fenced by age.
    """

    __slots__ = ("ticket",)

    ticket: int

    def __new__(cls, holder: str, ticket: int) -> Self:
        claim = super().__new__(cls, holder)
        claim.ticket = ticket
        return claim


class Released(enum.Enum):
    """The notice that a lock was let go without a value (its holder failed)."""

    RELEASED = "released"


RELEASED: Final = Released.RELEASED

Notice: TypeAlias = Entry | Released
