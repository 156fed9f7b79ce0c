"""The project's stampede_guard backends: made once per process, at first use, from settings.

Sync views use `sync_backend()` (`RedisBackend`), async views `async_backend()`
(`AsyncRedisBackend`); without ``STAMPEDE_GUARD_REDIS_URL`` both are one `MemoryBackend`.
They are made lazily, not at import, so that a forking server (gunicorn) makes them in
each worker, after the fork, and an async backend meets its event loop at first use.

Django has no shutdown signal. `close_sync_backend` is for gunicorn's ``worker_exit``
hook (gunicorn_conf.py); `aclose_async_backend` for the ASGI lifespan shutdown that
asgi.py adds around Django's handler, in the event loop the async views ran in.
"""

from __future__ import annotations

import threading

from django.conf import settings  # type: ignore[import-untyped]

from stampede_guard import (
    AsyncBackend,
    AsyncRedisBackend,
    Backend,
    MemoryBackend,
    RedisBackend,
)

_lock = threading.Lock()  # gunicorn's threads may ask for the first backend at once
_memory: MemoryBackend | None = None
_sync: RedisBackend | None = None
_async: AsyncRedisBackend | None = None


def _memory_backend() -> MemoryBackend:
    global _memory  # noqa: PLW0603 - one per process, made at first use
    if _memory is None:
        _memory = MemoryBackend()
    return _memory


def sync_backend() -> Backend:
    """Return this process's backend for sync code, making it at the first call."""
    global _sync  # noqa: PLW0603 - one per process, made at first use
    with _lock:
        url: str | None = settings.STAMPEDE_GUARD_REDIS_URL
        if url is None:
            return _memory_backend()
        if _sync is None:
            _sync = RedisBackend.from_url(url, prefix=settings.STAMPEDE_GUARD_PREFIX)
        return _sync


def async_backend() -> AsyncBackend:
    """Return this process's backend for async code, making it at the first call."""
    global _async  # noqa: PLW0603 - one per process, made at first use
    with _lock:
        url: str | None = settings.STAMPEDE_GUARD_REDIS_URL
        if url is None:
            return _memory_backend()
        if _async is None:
            _async = AsyncRedisBackend.from_url(
                url, prefix=settings.STAMPEDE_GUARD_PREFIX
            )
        return _async


def close_sync_backend() -> None:
    """Close the sync backend's connections, if it was made."""
    global _sync
    with _lock:
        backend, _sync = _sync, None
    if backend is not None:
        backend.close()


async def aclose_async_backend() -> None:
    """Close the async backend's connections, if it was made; in its event loop."""
    global _async
    with _lock:
        backend, _async = _async, None
    if backend is not None:
        await backend.aclose()
