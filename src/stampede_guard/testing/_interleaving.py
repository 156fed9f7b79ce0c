"""The operations of an interleaving: what a property test does to a decorated function.

`stampede_guard.testing.strategies.interleavings` draws lists of them (with hypothesis);
`perform` carries one out on a sync decorated function of one argument, the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeAlias, assert_never

from stampede_guard import CachedFunction
from stampede_guard.testing._clock import VirtualClock

__all__ = ["Advance", "Call", "Invalidate", "Operation", "Refresh", "perform"]


@dataclass(frozen=True, slots=True)
class Call:
    """Call the function with *key*."""

    key: int


@dataclass(frozen=True, slots=True)
class Invalidate:
    """Invalidate the cached value of *key* (``fn.invalidate(key)``)."""

    key: int


@dataclass(frozen=True, slots=True)
class Refresh:
    """Recompute and store the value of *key* now (``fn.refresh(key)``)."""

    key: int


@dataclass(frozen=True, slots=True)
class Advance:
    """Move the virtual clock *seconds* forward."""

    seconds: float


Operation: TypeAlias = Call | Invalidate | Refresh | Advance


def perform(
    operation: Operation, fn: CachedFunction[[int], Any], clock: VirtualClock
) -> object:
    """Carry out *operation* on *fn* and *clock*; return what a call or refresh got.

    Returns None for an invalidation or a clock move.
    """
    match operation:
        case Call(key):
            return fn(key)
        case Refresh(key):
            return fn.refresh(key)
        case Invalidate(key):
            fn.invalidate(key)
            return None
        case Advance(seconds):
            clock.advance(seconds)
            return None
        case _:
            assert_never(operation)
