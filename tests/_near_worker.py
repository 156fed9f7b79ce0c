"""The spawned process of test_near_cache.py's cross-process coherence test.

A spawned child imports this module by name: pytest's ``pythonpath`` puts this
directory on ``sys.path``, and multiprocessing hands the parent's ``sys.path`` on.

The child never writes: it holds ``doc`` in its near cache and answers the parent's
commands over a pipe, so whatever changes ``doc`` comes from the parent. Its function
computes what the Redis key `source_key` says, as the parent's does, and counts its
own computations.
"""

from __future__ import annotations

from multiprocessing.connection import Connection
from typing import Any

import redis

from _waiting import until
from stampede_guard import NearCache, RedisBackend, StampedeStats, cached_stampede_safe

__all__ = ["KEY", "serve", "source_key"]

KEY = "doc"
BOUND = 10.0  # seconds any wait of the child may take before it reports a failure


def source_key(prefix: str) -> str:
    """Return the Redis key holding what ``doc`` computes to, in every process."""
    return f"{prefix}:source"


def serve(url: str, prefix: str, options: dict[str, Any], conn: Connection) -> None:
    """Answer the parent's commands until "stop"; each answer is ("ok"|"error", ...).

    "warm": read ``doc`` until the near cache holds it, then once more (a near hit):
    answers its value, the near hits and the computations so far. "watch": wait until
    the near cache no longer holds ``doc``: answers whether it went within `BOUND`.
    "read": answers ``doc()``, the near hits and the computations so far. "ping":
    answers None once the child is ready.
    """
    backend = RedisBackend.from_url(url, prefix=prefix, near_cache=NearCache(ttl=30))
    source = redis.Redis.from_url(url, socket_timeout=5)
    stats = StampedeStats()
    computations = [0]

    @cached_stampede_safe(key=KEY, backend=backend, metrics=stats, **options)
    def doc() -> int:
        computations[0] += 1
        return int(source.get(source_key(prefix)) or 0)

    near = backend._near
    assert near is not None

    def answer(value: object) -> tuple[str, object, int, int]:
        return ("ok", value, stats.snapshot().near_hits, computations[0])

    def filled() -> bool:
        doc()
        return near.lookup(KEY) is not None

    try:
        while (command := conn.recv()) != "stop":
            try:
                if command == "warm":
                    until("doc in the near cache", filled, BOUND)
                    conn.send(answer(doc()))
                elif command == "watch":
                    until("doc dropped", lambda: near._store.peek(KEY) is None, BOUND)
                    conn.send(answer(True))
                elif command == "ping":
                    conn.send(answer(None))
                elif command == "read":
                    conn.send(answer(doc()))
                else:
                    conn.send(("error", f"unknown command {command!r}", 0, 0))
            except Exception as exc:
                conn.send(("error", f"{type(exc).__name__}: {exc}", 0, 0))
    finally:
        backend.close()
        source.close()
        conn.close()
