"""Where `AsyncRedisBackend` used to live; it is now in `stampede_guard.backends.redis`."""

from __future__ import annotations

from stampede_guard.backends.redis import AsyncRedisBackend

__all__ = ["AsyncRedisBackend"]
