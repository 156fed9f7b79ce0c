"""A FastAPI app whose endpoints are stampede-safe: many concurrent misses, one upstream call.

    uv run uvicorn examples.fastapi_app:app                  # in memory, one process
    REDIS_URL=redis://127.0.0.1:6379/0 uv run uvicorn examples.fastapi_app:app --workers 4
    curl http://127.0.0.1:8000/weather/oslo

Settings come from the environment, read once at import:

- ``REDIS_URL``: the Redis that every worker shares (`AsyncRedisBackend`). Unset, the
  cache is a `MemoryBackend` of each worker process, and a warning says so: then only
  the requests that one worker serves share a computation.
- ``CACHE_PREFIX``: the prefix of every key in Redis (default ``sg``).
- ``WEATHER_API_URL``: the upstream, asked ``GET {WEATHER_API_URL}/weather/<city>``
  and ``.../forecast/<city>``. Unset, a stand-in that waits 0.2 s answers instead.

With ``uvicorn --workers N``, each worker is a process of its own that imports this
module: it has its own backend, connection pool and pub/sub listener, and closes them
in its lifespan. The workers coordinate through Redis (one computation per key across
all of them); with the in-memory backend, each worker computes each key once. For
metrics across workers, see Prometheus's multiprocess mode in docs/metrics.md.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from urllib.parse import quote

import httpx
from fastapi import FastAPI, Request, Response

from stampede_guard import AsyncRedisBackend, MemoryBackend, cached_stampede_safe

log = logging.getLogger("fastapi_app")

REDIS_URL = os.environ.get("REDIS_URL")
CACHE_PREFIX = os.environ.get("CACHE_PREFIX", "sg")
WEATHER_API_URL = os.environ.get("WEATHER_API_URL")
UPSTREAM_TIMEOUT = 10.0  # seconds; below lock_timeout, so a hung upstream fails first


def make_backend() -> AsyncRedisBackend | MemoryBackend:
    """Return the cache: Redis if ``REDIS_URL`` is set, else in memory (with a warning)."""
    if REDIS_URL:
        # No I/O yet: the client connects on first use, in the worker's event loop.
        return AsyncRedisBackend.from_url(REDIS_URL, prefix=CACHE_PREFIX)
    log.warning(
        "REDIS_URL is not set: caching in memory, per worker process "
        "(set REDIS_URL=redis://host:6379/0 to share one computation across workers)"
    )
    return MemoryBackend()


backend = make_backend()


async def call_upstream(path: str) -> dict[str, object]:
    """Return the upstream's JSON answer for *path* (slow and metered)."""
    if WEATHER_API_URL is None:
        await asyncio.sleep(0.2)  # a stand-in for a slow API
        return {"path": path, "served": 1}
    async with httpx.AsyncClient(timeout=UPSTREAM_TIMEOUT) as client:
        reply = await client.get(f"{WEATHER_API_URL}{path}")
        reply.raise_for_status()
        answer: dict[str, object] = reply.json()
        return answer


@asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    """Close the backend when the worker shuts down (its pool and its listener)."""
    yield
    if isinstance(backend, AsyncRedisBackend):
        await backend.aclose()


app = FastAPI(lifespan=lifespan)


@app.middleware("http")
async def worker_pid(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    """Say which worker process answered (to see ``--workers`` at work)."""
    response = await call_next(request)
    response.headers["X-Worker-Pid"] = str(os.getpid())
    return response


# The usual shape: the endpoint awaits a decorated function, one cache key per city.
@cached_stampede_safe(key="weather:{city}", ttl=300, lock_timeout=15, backend=backend)
async def get_weather(city: str) -> dict[str, object]:
    """Return the weather in *city*, from the upstream at most once per key and ttl."""
    return await call_upstream(f"/weather/{quote(city, safe='')}")


@app.get("/weather/{city}")
async def weather(city: str) -> dict[str, object]:
    """Answer with the (cached) weather in *city*."""
    return await get_weather(city)


# The decorated function can be the endpoint itself: it is a coroutine function to
# inspect and asyncio, and keeps the signature FastAPI reads its parameters from. The
# route decorator goes on top, so that FastAPI registers the cached function.
@app.get("/forecast/{city}")
@cached_stampede_safe(key="forecast:{city}", ttl=300, lock_timeout=15, backend=backend)
async def forecast(city: str) -> dict[str, object]:
    """Answer with the (cached) forecast for *city*."""
    return await call_upstream(f"/forecast/{quote(city, safe='')}")


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    """Answer at once, without the cache: for readiness checks."""
    return {"status": "ok"}
