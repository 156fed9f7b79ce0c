"""stampede_guard: N concurrent misses of one cache key, one computation.

Put `cached_stampede_safe` on an expensive function; see its docstring for the options.
`RedisBackend` and `AsyncRedisBackend` are imported on first use (PEP 562): importing
this package imports no Redis client package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from stampede_guard import backends
from stampede_guard._batch_decorator import (
    AsyncBatchFunction,
    BatchFunction,
    BatchOptions,
    cached_stampede_safe_batch,
)
from stampede_guard._cache_options import CacheOptions
from stampede_guard._decorator import cached_stampede_safe
from stampede_guard._errors import (
    BackendError,
    CachedFailureError,
    InterruptedComputationError,
    LockTimeoutError,
    ReentrantCallError,
    SerializationError,
    StampedeGuardError,
)
from stampede_guard._types import AsyncCachedFunction, CachedFunction
from stampede_guard.backends import (
    AsyncBackend,
    Backend,
    Entry,
    MemoryBackend,
    NearCache,
)
from stampede_guard.metrics import MetricsHook, StampedeStats, StatsSnapshot
from stampede_guard.serializers import (
    BoundSerializer,
    JsonSerializer,
    Serializer,
    SignedPickleSerializer,
)

if TYPE_CHECKING:
    from stampede_guard.backends.redis import AsyncRedisBackend, RedisBackend

    __version__: str

__all__ = [
    "AsyncBackend",
    "AsyncBatchFunction",
    "AsyncCachedFunction",
    "AsyncRedisBackend",
    "Backend",
    "BackendError",
    "BatchFunction",
    "BatchOptions",
    "BoundSerializer",
    "CacheOptions",
    "CachedFailureError",
    "CachedFunction",
    "Entry",
    "InterruptedComputationError",
    "JsonSerializer",
    "LockTimeoutError",
    "MemoryBackend",
    "MetricsHook",
    "NearCache",
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
    "cached_stampede_safe_batch",
]


def __getattr__(name: str) -> object:
    """Import the Redis backends when one of them is first asked for (see `backends`).

    ``__version__`` too: ``importlib.metadata`` takes longer to import (~70 ms here)
    than the rest of the package.
    """
    if name in {"AsyncRedisBackend", "RedisBackend"}:
        return getattr(backends, name)
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

        try:
            found = version("stampede-guard")
        except PackageNotFoundError:  # pragma: no cover - running from a source tree
            found = "0+unknown"
        globals()["__version__"] = found
        return found
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
