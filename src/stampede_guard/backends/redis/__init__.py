"""The Redis backends: every process and host sharing one Redis (or Valkey) coordinates.

`RedisBackend` for plain code, `AsyncRedisBackend` for asyncio; the same keys, scripts
and stored format, so both kinds of code on one Redis coordinate with each other.

The modules, one job each:

* ``_sync`` and ``_async``: the two backends, which only send what the codec prepares;
* ``_backend``: what both are, once: construction, codec, scripts, breakers;
* ``_codec``: key names, script calls and value encoding (no I/O);
* ``_scripts``: the Lua scripts;
* ``_clients``: which client packages and clients are accepted;
* ``_connect``: how ``from_url`` and ``from_sentinel`` build a client and its pool;
* ``_kept``: commands on kept connections, skipping the pool on a hit;
* ``_listener`` and ``_hub``: the pub/sub listener and its decisions;
* ``_faults``: which server failed, why, and its circuit breaker.
"""

from __future__ import annotations

from stampede_guard.backends.redis._async import AsyncRedisBackend
from stampede_guard.backends.redis._sync import RedisBackend

__all__ = ["AsyncRedisBackend", "RedisBackend"]
