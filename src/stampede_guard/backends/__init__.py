"""Backends: where values and locks live. Any object satisfying `Backend` will do."""

from __future__ import annotations

from stampede_guard.backends._protocol import (
    RELEASED,
    AsyncBackend,
    AsyncNotifier,
    AsyncSubscription,
    Backend,
    Entry,
    Notice,
    Notifier,
    Released,
    Subscription,
)
from stampede_guard.backends.memory import MemoryBackend
from stampede_guard.backends.redis import RedisBackend
from stampede_guard.backends.redis_asyncio import AsyncRedisBackend

__all__ = [
    "RELEASED",
    "AsyncBackend",
    "AsyncNotifier",
    "AsyncRedisBackend",
    "AsyncSubscription",
    "Backend",
    "Entry",
    "MemoryBackend",
    "Notice",
    "Notifier",
    "RedisBackend",
    "Released",
    "Subscription",
]
