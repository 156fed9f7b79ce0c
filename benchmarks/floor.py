"""The round-trip floor: sequential latency of single commands on one connection.

Every cache hit costs at least one of these, and a waiter learns of the value at best
about one round trip after the leader's SET, so these numbers bound the rest.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import redis
import redis.asyncio

from common import make_value

__all__ = ["FloorRow", "measure_floor"]


@dataclass(frozen=True, slots=True)
class FloorRow:
    """Latency of one kind of request, in microseconds."""

    name: str
    p50_us: float
    p99_us: float
    min_us: float


def _row(name: str, samples: list[float]) -> FloorRow:
    ordered = sorted(samples)
    n = len(ordered)
    return FloorRow(
        name,
        ordered[n // 2] * 1e6,
        ordered[min(n - 1, int(n * 0.99))] * 1e6,
        ordered[0] * 1e6,
    )


def _time_sync(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


async def _time_async(fn: Callable[[], Awaitable[object]], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - t0)
    return out


def measure_floor(url: str, samples: int) -> list[FloorRow]:
    """Measure PING, GET, GET + json.loads, SET NX PX, asyncio GET and a 0.1 s sleep."""
    r = redis.Redis.from_url(url)
    r.set("floor:v", json.dumps(make_value("floor")))
    r.ping()
    rows = [
        _row("redis-py PING", _time_sync(r.ping, samples)),
        _row("redis-py GET (value)", _time_sync(lambda: r.get("floor:v"), samples)),
        _row(
            "GET + json.loads",
            _time_sync(lambda: json.loads(r.get("floor:v") or b"null"), samples),
        ),
        _row(
            "SET NX PX",
            _time_sync(lambda: r.set("floor:l", "t", nx=True, px=10_000), samples),
        ),
    ]

    async def run_async() -> list[float]:
        ar = redis.asyncio.Redis.from_url(url)
        await ar.ping()

        async def get() -> object:
            return await ar.get("floor:v")

        try:
            return await _time_async(get, samples)
        finally:
            await ar.aclose()

    rows.append(_row("redis.asyncio GET", asyncio.run(run_async())))
    oversleep = []
    for _ in range(min(samples, 10)):
        t0 = time.perf_counter()
        time.sleep(0.1)
        oversleep.append(time.perf_counter() - t0 - 0.1)
    rows.append(_row("time.sleep(0.1) oversleep", oversleep))
    r.delete("floor:v", "floor:l")
    r.close()
    return rows
