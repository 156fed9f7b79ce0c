"""Hot hit path: one caller, key already cached, calls per second.

* **D (Redis)**: a peer's decorated call vs a bare redis-py ``GET`` + ``json.loads``
  of the same value (``redis.asyncio`` for async peers), measured alternately in
  short slices in one process, so both sides share the same noise. Then a fixed
  number of decorated calls between CONFIG RESETSTAT and INFO commandstats gives
  the Redis commands per hit.
* **M (memory)**: stampede_guard with `MemoryBackend` vs cachetools
  ``@cached(TTLCache(...))`` on the same function, alternately in slices.

Each measurement runs in its own spawned process, bounded in time.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import redis
import redis.asyncio

from common import RoundTrips, make_value, run_in_child
from peers import PEERS, make_async_peer, make_sync_peer
from redis_server import command_stats

__all__ = ["HotJob", "HotResult", "MemJob", "MemResult", "run_hot", "run_memory"]

HOT_KEY = "hot"
RAW_KEY = "raw:hot"
WARMUP_CALLS = 200
TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class HotJob:
    """One D measurement: *slices* slices of *slice_s* per side."""

    peer: str
    url: str
    rep: int
    slices: int
    slice_s: float
    count_calls: int = 200


@dataclass(slots=True)
class HotResult:
    """Calls per second of a peer and of the raw GET in the same process."""

    peer: str
    rep: int
    peer_ops: float = 0.0
    raw_ops: float = 0.0
    ratio: float = 0.0
    cmds_per_call: float = 0.0
    cmds_by_name: dict[str, float] = field(default_factory=dict)
    round_trips_per_call: float = 0.0
    computations: int = 0
    failure: str | None = None


@dataclass(frozen=True, slots=True)
class MemJob:
    """One M measurement."""

    rep: int
    slices: int
    slice_s: float
    batch: int = 200


@dataclass(slots=True)
class MemResult:
    """Calls per second: stampede_guard on MemoryBackend vs cachetools."""

    rep: int
    sg_ops: float = 0.0
    cachetools_ops: float = 0.0
    ratio: float = 0.0
    failure: str | None = None


def _slices_sync(
    sides: tuple[Callable[[], object], Callable[[], object]],
    slices: int,
    slice_s: float,
    batch: int = 1,
) -> tuple[float, float]:
    """Run the two sides alternately (ABBA...); return ops/s of each."""
    calls = [0, 0]
    spent = [0.0, 0.0]
    for i in range(slices):
        order = (0, 1) if i % 2 == 0 else (1, 0)
        for side in order:
            fn = sides[side]
            n = 0
            t0 = time.perf_counter()
            end = t0 + slice_s
            while True:
                for _ in range(batch):
                    fn()
                n += batch
                t = time.perf_counter()
                if t >= end:
                    break
            calls[side] += n
            spent[side] += t - t0
    return calls[0] / spent[0], calls[1] / spent[1]


async def _slices_async(
    sides: tuple[Callable[[], Awaitable[object]], Callable[[], Awaitable[object]]],
    slices: int,
    slice_s: float,
) -> tuple[float, float]:
    calls = [0, 0]
    spent = [0.0, 0.0]
    for i in range(slices):
        order = (0, 1) if i % 2 == 0 else (1, 0)
        for side in order:
            fn = sides[side]
            n = 0
            t0 = time.perf_counter()
            end = t0 + slice_s
            while True:
                await fn()
                n += 1
                t = time.perf_counter()
                if t >= end:
                    break
            calls[side] += n
            spent[side] += t - t0
    return calls[0] / spent[0], calls[1] / spent[1]


def _per_call(
    admin: redis.Redis, result: HotResult, before_rt: int, calls: int
) -> None:
    stats = command_stats(admin)
    result.round_trips_per_call = (RoundTrips.read() - before_rt) / calls
    result.cmds_per_call = sum(stats.values()) / calls
    result.cmds_by_name = {
        k: v / calls for k, v in sorted(stats.items(), key=lambda kv: -kv[1])
    }


def _hot_sync(job: HotJob) -> HotResult:
    result = HotResult(job.peer, job.rep)
    computed = [0]

    def compute(k: str) -> dict[str, object]:
        computed[0] += 1
        return make_value(k)

    redis.Redis.from_url(job.url).flushall()  # no other peer's entry under our keys
    peer = make_sync_peer(job.peer, job.url, compute)
    raw_client = redis.Redis.from_url(job.url)
    raw_client.set(RAW_KEY, json.dumps(make_value(HOT_KEY)))
    expected = make_value(HOT_KEY)
    if peer.call(HOT_KEY) != expected or peer.call(HOT_KEY) != expected:
        result.failure = "wrong value"
        return result

    def raw() -> object:
        return json.loads(cast("bytes", raw_client.get(RAW_KEY)))

    def decorated() -> object:
        return peer.call(HOT_KEY)

    if raw() != expected:
        result.failure = "raw GET returned a wrong value"
        return result
    for _ in range(WARMUP_CALLS):
        decorated()
        raw()
    result.peer_ops, result.raw_ops = _slices_sync(
        (decorated, raw), job.slices, job.slice_s
    )
    admin = redis.Redis.from_url(job.url)
    admin.config_resetstat()
    rt = RoundTrips.read()
    for _ in range(job.count_calls):
        decorated()
    _per_call(admin, result, rt, job.count_calls)
    result.ratio = result.peer_ops / result.raw_ops
    result.computations = computed[0]
    peer.close()
    return result


async def _hot_async(job: HotJob) -> HotResult:
    result = HotResult(job.peer, job.rep)
    computed = [0]

    async def compute(k: str) -> dict[str, object]:
        computed[0] += 1
        return make_value(k)

    redis.Redis.from_url(job.url).flushall()  # no other peer's entry under our keys
    peer = make_async_peer(job.peer, job.url, compute)
    await peer.prewarm(1)
    raw_client = redis.asyncio.Redis.from_url(job.url)
    await raw_client.set(RAW_KEY, json.dumps(make_value(HOT_KEY)))
    expected = make_value(HOT_KEY)
    if await peer.call(HOT_KEY) != expected or await peer.call(HOT_KEY) != expected:
        result.failure = "wrong value"
        return result

    async def raw() -> object:
        return json.loads(cast("bytes", await raw_client.get(RAW_KEY)))

    async def decorated() -> object:
        return await peer.call(HOT_KEY)

    if await raw() != expected:
        result.failure = "raw GET returned a wrong value"
        return result
    for _ in range(WARMUP_CALLS):
        await decorated()
        await raw()
    result.peer_ops, result.raw_ops = await _slices_async(
        (decorated, raw), job.slices, job.slice_s
    )
    admin = redis.Redis.from_url(job.url)
    admin.config_resetstat()
    rt = RoundTrips.read()
    for _ in range(job.count_calls):
        await decorated()
    _per_call(admin, result, rt, job.count_calls)
    result.ratio = result.peer_ops / result.raw_ops
    result.computations = computed[0]
    await peer.aclose()
    await raw_client.aclose()
    return result


def _memory(job: MemJob) -> MemResult:
    from cachetools import TTLCache, cached  # noqa: PLC0415

    from stampede_guard import MemoryBackend, cached_stampede_safe  # noqa: PLC0415

    result = MemResult(job.rep)

    def fn(k: str) -> dict[str, object]:
        return make_value(k)

    sg_fn: Callable[[str], object] = cached_stampede_safe(
        key="m:{k}", ttl=900, lock_timeout=10, backend=MemoryBackend()
    )(fn)
    ct_deco: Any = cached(TTLCache(maxsize=1024, ttl=900))
    ct_fn: Callable[[str], object] = ct_deco(fn)
    expected = make_value(HOT_KEY)
    if sg_fn(HOT_KEY) != expected or ct_fn(HOT_KEY) != expected:
        result.failure = "wrong value"
        return result

    def sg_call() -> object:
        return sg_fn(HOT_KEY)

    def ct_call() -> object:
        return ct_fn(HOT_KEY)

    _slices_sync((sg_call, ct_call), 2, job.slice_s, job.batch)  # warm-up
    result.sg_ops, result.cachetools_ops = _slices_sync(
        (sg_call, ct_call), job.slices, job.slice_s, job.batch
    )
    result.ratio = result.sg_ops / result.cachetools_ops
    return result


def _measure(job: HotJob | MemJob) -> HotResult | MemResult:
    if isinstance(job, MemJob):
        return _memory(job)
    if PEERS[job.peer].kind == "sync":
        return _hot_sync(job)
    return asyncio.run(_hot_async(job))


def run_hot(job: HotJob) -> HotResult:
    """Run one D measurement in a spawned process."""
    got = run_in_child(_measure, job, timeout_s=TIMEOUT_S)
    if isinstance(got, HotResult):
        return got
    return HotResult(job.peer, job.rep, failure=str(got).splitlines()[0])


def run_memory(job: MemJob) -> MemResult:
    """Run one M measurement in a spawned process."""
    got = run_in_child(_measure, job, timeout_s=TIMEOUT_S)
    if isinstance(got, MemResult):
        return got
    return MemResult(job.rep, failure=str(got).splitlines()[0])
