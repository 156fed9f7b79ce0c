"""A Flask app whose view is stampede-safe: many concurrent misses, one upstream call.

    uv run flask --app examples/flask_app.py run                # in memory, one process
    REDIS_URL=redis://127.0.0.1:6379/0 uv run gunicorn examples.flask_app:app \\
        --workers 4 --threads 8
    curl http://127.0.0.1:8000/weather/oslo

Settings come from the environment, read once at import:

- ``REDIS_URL``: the Redis that every worker shares (`RedisBackend`). Unset, the cache
  is a `MemoryBackend` of each worker process, and a warning says so: then only the
  threads of one worker share a computation.
- ``CACHE_PREFIX``: the prefix of every key in Redis (default ``sg``).
- ``WEATHER_API_URL``: the upstream, asked ``GET {WEATHER_API_URL}/weather/<city>``.
  Unset, a stand-in that waits 0.2 s answers instead.

The backend is made once, at import, and closed at exit. Under gunicorn each worker
process has its own connections and pub/sub listener; the workers coordinate through
Redis (one computation per key across all of them). With ``--preload`` this module is
imported once in gunicorn's master and the workers are forked from it, backend
included: that works as it is. The library notices the fork (by process id) and the
worker drops the master's kept connections and listener unused and opens its own, as
redis-py's pool does. Keep the master from using the backend, though (no cache
warming at import): its connections would be opened only to be dropped in every worker.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import time
import urllib.request
from urllib.parse import quote

from flask import Flask, Response

from stampede_guard import MemoryBackend, RedisBackend, cached_stampede_safe

log = logging.getLogger("flask_app")

REDIS_URL = os.environ.get("REDIS_URL")
CACHE_PREFIX = os.environ.get("CACHE_PREFIX", "sg")
WEATHER_API_URL = os.environ.get("WEATHER_API_URL")
UPSTREAM_TIMEOUT = 10.0  # seconds; below lock_timeout, so a hung upstream fails first


def make_backend() -> RedisBackend | MemoryBackend:
    """Return the cache: Redis if ``REDIS_URL`` is set, else in memory (with a warning)."""
    if REDIS_URL:
        redis_backend = RedisBackend.from_url(REDIS_URL, prefix=CACHE_PREFIX)
        # At the process's exit: its pool, its kept connections and its listener.
        atexit.register(redis_backend.close)
        return redis_backend
    log.warning(
        "REDIS_URL is not set: caching in memory, per worker process "
        "(set REDIS_URL=redis://host:6379/0 to share one computation across workers)"
    )
    return MemoryBackend()


backend = make_backend()


def call_upstream(path: str) -> dict[str, object]:
    """Return the upstream's JSON answer for *path* (slow and metered)."""
    if WEATHER_API_URL is None:
        time.sleep(0.2)  # a stand-in for a slow API
        return {"path": path, "served": 1}
    url = f"{WEATHER_API_URL}{path}"
    if not url.startswith(("http://", "https://")):
        msg = f"WEATHER_API_URL must be an http(s) URL, not {WEATHER_API_URL!r}"
        raise ValueError(msg)
    with urllib.request.urlopen(url, timeout=UPSTREAM_TIMEOUT) as reply:  # noqa: S310 - checked above
        answer: dict[str, object] = json.load(reply)
        return answer


@cached_stampede_safe(key="weather:{city}", ttl=300, lock_timeout=15, backend=backend)
def get_weather(city: str) -> dict[str, object]:
    """Return the weather in *city*, from the upstream at most once per key and ttl."""
    return call_upstream(f"/weather/{quote(city, safe='')}")


app = Flask(__name__)


@app.after_request
def worker_pid(response: Response) -> Response:
    """Say which worker process answered (to see gunicorn's ``--workers`` at work)."""
    response.headers["X-Worker-Pid"] = str(os.getpid())
    return response


@app.get("/weather/<city>")
def weather(city: str) -> dict[str, object]:
    """Answer with the (cached) weather in *city*."""
    return get_weather(city)


@app.get("/healthz")
def healthz() -> dict[str, str]:
    """Answer at once, without the cache: for readiness checks."""
    return {"status": "ok"}
