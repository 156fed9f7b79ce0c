"""Backends: where values and locks live. Any object satisfying `Backend` will do."""

from __future__ import annotations

from stampede_guard.backends._protocol import (
    FENCE_SECONDS,
    RELEASED,
    AsyncBackend,
    AsyncNotifier,
    AsyncSubscription,
    Backend,
    Claim,
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
    "FENCE_SECONDS",
    "RELEASED",
    "AsyncBackend",
    "AsyncNotifier",
    "AsyncRedisBackend",
    "AsyncSubscription",
    "Backend",
    "Claim",
    "Entry",
    "MemoryBackend",
    "Notice",
    "Notifier",
    "RedisBackend",
    "Released",
    "Subscription",
]
