"""Backends: where values and locks live. Any object satisfying `Backend` will do.

The Redis backends are imported on first use (PEP 562), so that code using only the
memory backend never pays for importing a Redis client package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from stampede_guard._near import NearCache
from stampede_guard.backends._protocol import (
    FENCE_SECONDS,
    RELEASED,
    AsyncBackend,
    AsyncBatchBackend,
    AsyncNotifier,
    AsyncSubscription,
    AsyncTagBackend,
    Backend,
    BatchBackend,
    CachedFailure,
    Claim,
    Entry,
    Notice,
    Notifier,
    Released,
    Subscription,
    TagBackend,
)
from stampede_guard.backends.memory import MemoryBackend

if TYPE_CHECKING:
    from stampede_guard.backends.redis import AsyncRedisBackend, RedisBackend

__all__ = [
    "FENCE_SECONDS",
    "RELEASED",
    "AsyncBackend",
    "AsyncBatchBackend",
    "AsyncNotifier",
    "AsyncRedisBackend",
    "AsyncSubscription",
    "AsyncTagBackend",
    "Backend",
    "BatchBackend",
    "CachedFailure",
    "Claim",
    "Entry",
    "MemoryBackend",
    "NearCache",
    "Notice",
    "Notifier",
    "RedisBackend",
    "Released",
    "Subscription",
    "TagBackend",
]

_REDIS = frozenset({"AsyncRedisBackend", "RedisBackend"})


def __getattr__(name: str) -> object:
    """Import the Redis backends when one of them is first asked for."""
    if name in _REDIS:
        from stampede_guard.backends import redis  # noqa: PLC0415 - on first use

        value = getattr(redis, name)
        globals()[name] = value  # later lookups find it without this function
        return value
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
