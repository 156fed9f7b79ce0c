"""stampede_guard: N concurrent misses of one cache key, one computation.

Put `cached_stampede_safe` on an expensive function; see its docstring for the options.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from stampede_guard._decorator import cached_stampede_safe
from stampede_guard._errors import (
    BackendError,
    InterruptedComputationError,
    LockTimeoutError,
    ReentrantCallError,
    SerializationError,
    StampedeGuardError,
)
from stampede_guard._types import AsyncCachedFunction, CachedFunction
from stampede_guard.backends import (
    AsyncBackend,
    AsyncRedisBackend,
    Backend,
    Entry,
    MemoryBackend,
    RedisBackend,
)
from stampede_guard.metrics import MetricsHook, StampedeStats, StatsSnapshot
from stampede_guard.serializers import (
    BoundSerializer,
    JsonSerializer,
    Serializer,
    SignedPickleSerializer,
)

try:
    __version__ = version("stampede-guard")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

__all__ = [
    "AsyncBackend",
    "AsyncCachedFunction",
    "AsyncRedisBackend",
    "Backend",
    "BackendError",
    "BoundSerializer",
    "CachedFunction",
    "Entry",
    "InterruptedComputationError",
    "JsonSerializer",
    "LockTimeoutError",
    "MemoryBackend",
    "MetricsHook",
    "RedisBackend",
    "ReentrantCallError",
    "SerializationError",
    "Serializer",
    "SignedPickleSerializer",
    "StampedeGuardError",
    "StampedeStats",
    "StatsSnapshot",
    "__version__",
    "cached_stampede_safe",
]
