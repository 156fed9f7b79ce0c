"""The near cache (`NearCache`) against its anchors: hit speed and hit ratio.

Run from the repository root::

    uv run --group bench benchmarks/near.py            # full run, about 1 minute
    uv run --group bench benchmarks/near.py --quick    # smoke run, about 20 s
    uv run --group bench benchmarks/near.py --json /tmp/near.json

What it measures, each comparison beside its anchor in one spawned process (bounded
in time), the two sides alternating in short slices (ABBA...) so that they share the
machine's noise; each side's figure is the median of its per-slice times per call,
and the ratio the median of the per-slice-pair ratios:

1. **near hit vs raw GET**: ``@cached_stampede_safe(key="k:{x}", ttl=600,
   backend=RedisBackend.from_url(url, near_cache=NearCache()))`` on a key held in the
   near cache, against ``json.loads(client.get(k))`` of the same ~300-byte value on a
   default ``redis.Redis`` client. Then the same with `AsyncRedisBackend` against
   ``redis.asyncio``. Target: the raw GET takes at least 50 times as long.
2. **near hit vs cachetools**: the same near hit against ``@cached(LRUCache(10_000))``
   on the same function and argument. Target: at most 1.5 times cachetools' time.
3. **MemoryBackend hit vs cachetools**: ``backend=MemoryBackend()`` against
   ``@cached(TTLCache(10_000, 600))``. Target: cachetools takes at least as long.
4. **hit ratio on a Zipf(1.0) trace**: 1,000,000 requests over 100,000 keys drawn with
   ``random.Random(seed).choices`` (weights 1/k), through a 10,000-entry `BoundedStore`
   (the near cache's policy: LRU with its doorkeeper admission, deadlines far in the
   future; plain LRU in the notes) and cachetools' ``LRUCache`` of the same size;
   with, for context, the best any static choice of 10,000 keys can
   do (their probability mass). Then a shorter trace (100,000 requests) through a real
   near-cached `RedisBackend` (every key pre-stored in Redis, so every near miss is one
   read that fills the near cache), whose near hit ratio must match the simulation of
   the same trace.

Before a near hit is timed, the near cache must be live (its listener subscribed) and
hold the key: the process reads the key until ``_near.live`` and ``len(_near) > 0``
(at most 5 s), or fails the measurement. Under the table: the requests sent while the
near side ran (the listener's PING of its quiet connection, about one a second) and
the Redis commands per near hit (none expected).

Markdown goes to stdout, progress to stderr, JSON to
``benchmarks/results/near-<stamp>.json`` (and ``--json PATH``). It starts its own
redis-server on a free port (see redis_server.py) and never talks to any other.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import itertools
import json
import math
import os
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import redis
import redis.asyncio

from common import RoundTrips, make_value, report_header, run_in_child, source_summary
from redis_server import RedisServer, command_stats
from run import RESULTS, progress, source_state
from stampede_guard._near import Near

HOT = "oslo"  # the argument of every hot-path call
RAW_KEY = "raw:k:oslo"
LIVE_WAIT_S = 5.0  # longest wait for the near cache's listener to subscribe
CHILD_TIMEOUT_S = 180.0  # a measurement's process is killed after this
NEAR_HIT_CHECK_CALLS = 1000  # near hits counted between CONFIG RESETSTAT and INFO
MAXSIZE = 10_000
N_KEYS = 100_000
ZIPF_S = 1.0
SEED = 20261207


@dataclass(frozen=True, slots=True)
class Plan:
    """How long everything runs."""

    slices: int  # per side
    slice_s: float
    batch: int  # in-memory calls between two clock reads
    trace: int  # requests of the simulated Zipf trace
    real_trace: int  # requests through a real near-cached backend (0: skipped)


FULL = Plan(slices=41, slice_s=0.05, batch=100, trace=1_000_000, real_trace=100_000)
QUICK = Plan(slices=7, slice_s=0.01, batch=100, trace=100_000, real_trace=10_000)


@dataclass(frozen=True, slots=True)
class Job:
    """One measurement, run in a process of its own."""

    kind: str  # a key of MEASUREMENTS
    url: str
    plan: Plan


@dataclass(slots=True)
class Result:
    """One measurement: per-slice seconds per call of each side, or hit ratios."""

    kind: str
    sg_per_call: list[float] = field(default_factory=list)
    anchor_per_call: list[float] = field(default_factory=list)
    sg: float = math.nan  # median seconds per call, or a hit ratio
    anchor: float = math.nan
    ratio: float = math.nan  # in the orientation of the target (see ROWS)
    notes: dict[str, Any] = field(default_factory=dict)
    failure: str | None = None


# ---------------------------------------------------------------- slices


def _alternate(
    sides: Sequence[tuple[Callable[[str], object], int]], slices: int, slice_s: float
) -> tuple[list[float], list[float], list[int]]:
    """Run two sides alternately (ABBA...): per-slice seconds per call, calls each."""
    per: tuple[list[float], list[float]] = ([], [])
    calls = [0, 0]
    for i in range(slices):
        for side in (0, 1) if i % 2 == 0 else (1, 0):
            fn, batch = sides[side]
            reps = range(batch)
            n = 0
            t0 = time.perf_counter()
            end = t0 + slice_s
            while True:
                for _ in reps:
                    fn(HOT)
                n += batch
                t = time.perf_counter()
                if t >= end:
                    break
            per[side].append((t - t0) / n)
            calls[side] += n
    return per[0], per[1], calls


async def _aalternate(
    sides: Sequence[Callable[[str], Awaitable[object]]], slices: int, slice_s: float
) -> tuple[list[float], list[float], list[int]]:
    """`_alternate` for coroutine functions (one call between clock reads)."""
    per: tuple[list[float], list[float]] = ([], [])
    calls = [0, 0]
    for i in range(slices):
        for side in (0, 1) if i % 2 == 0 else (1, 0):
            fn = sides[side]
            n = 0
            t0 = time.perf_counter()
            end = t0 + slice_s
            while True:
                await fn(HOT)
                n += 1
                t = time.perf_counter()
                if t >= end:
                    break
            per[side].append((t - t0) / n)
            calls[side] += n
    return per[0], per[1], calls


def _fill(
    result: Result, sg: list[float], anchor: list[float], *, sg_over: bool
) -> None:
    """Medians of each side, and the median ratio: sg/anchor time if *sg_over*."""
    result.sg_per_call, result.anchor_per_call = sg, anchor
    result.sg = statistics.median(sg)
    result.anchor = statistics.median(anchor)
    pairs = zip(sg, anchor, strict=True)
    result.ratio = statistics.median(s / a if sg_over else a / s for s, a in pairs)


def _settle() -> None:
    """Collect and freeze the set-up's garbage (see common.GcPauses.settle)."""
    gc.collect()
    gc.freeze()


def _value(x: str) -> dict[str, object]:
    return make_value(f"k:{x}")


# ---------------------------------------------------------------- near hits


def _near_of(backend: Any) -> Near:
    """The backend's near cache, private: checked live and filled before timing."""
    near: Near | None = backend._near  # noqa: SLF001
    if near is None:
        msg = f"{backend!r} has no near cache"
        raise RuntimeError(msg)
    return near


def _near_ready(near: Near, read: Callable[[], object]) -> str | None:
    """Read until the near cache is live and holds the key; None, or what went wrong.

    Not one read after ``live``: the message of the warm-up's own store can reach the
    listener just after its SUBSCRIBE is confirmed, and then rightly refuses the read
    that was in flight meanwhile.
    """
    read()
    deadline = time.monotonic() + LIVE_WAIT_S
    while not (near.live and len(near)) and time.monotonic() < deadline:
        time.sleep(0.01)
        read()
    return _not_ready(near)


def _not_ready(near: Near) -> str | None:
    if not near.live:
        return f"the near cache's listener did not subscribe within {LIVE_WAIT_S:.0f} s"
    if len(near) == 0:
        return (
            f"the near cache is live but still empty after {LIVE_WAIT_S:.0f} s of reads"
        )
    return None


def _commands_per_near_hit(url: str, call: Callable[[], object]) -> dict[str, float]:
    admin = redis.Redis.from_url(url)
    admin.config_resetstat()
    for _ in range(NEAR_HIT_CHECK_CALLS):
        call()
    stats = command_stats(admin)
    admin.close()
    return {k: v / NEAR_HIT_CHECK_CALLS for k, v in stats.items()}


def _near_sync(job: Job, anchor: str) -> Result:
    from stampede_guard import (  # noqa: PLC0415
        NearCache,
        RedisBackend,
        cached_stampede_safe,
    )

    result = Result(job.kind)
    backend = RedisBackend.from_url(job.url, near_cache=NearCache())
    near = _near_of(backend)
    sg_fn = cast(
        "Callable[[str], object]",
        cached_stampede_safe(key="k:{x}", ttl=600, backend=backend)(_value),
    )
    expected = _value(HOT)
    result.failure = _near_ready(near, lambda: sg_fn(HOT))
    if result.failure is None and sg_fn(HOT) != expected:
        result.failure = "the near hit returned a wrong value"
    if result.failure is not None:
        return result
    client: redis.Redis | None = None
    anchor_fn: Callable[[str], object]
    if anchor == "raw":
        client = redis.Redis.from_url(job.url)
        client.set(RAW_KEY, json.dumps(expected))
        get = client.get

        def anchor_fn(x: str) -> object:
            return json.loads(cast("bytes", get(f"raw:k:{x}")))

        batches = (job.plan.batch, 1)
    else:
        from cachetools import LRUCache, cached  # noqa: PLC0415

        anchor_fn = cached(LRUCache(maxsize=MAXSIZE))(_value)
        batches = (job.plan.batch, job.plan.batch)
    if anchor_fn(HOT) != expected:
        result.failure = "the anchor returned a wrong value"
        return result
    sides = ((sg_fn, batches[0]), (anchor_fn, batches[1]))
    _settle()
    _alternate(sides, 2, job.plan.slice_s)  # warm-up
    rt0 = RoundTrips.read()
    sg, other, calls = _alternate(sides, job.plan.slices, job.plan.slice_s)
    rts = RoundTrips.read() - rt0 - (calls[1] if anchor == "raw" else 0)
    _fill(result, sg, other, sg_over=anchor != "raw")
    result.notes = {
        "calls": calls,
        "requests sent during the near slices (listener PINGs, 1 per quiet s)": rts,
        "near entries": len(near),
        "near live": near.live,
        "commands per near hit": _commands_per_near_hit(job.url, lambda: sg_fn(HOT)),
    }
    if client is not None:
        client.close()
    backend.close()
    return result


async def _near_async(job: Job) -> Result:
    from stampede_guard import (  # noqa: PLC0415
        AsyncRedisBackend,
        NearCache,
        cached_stampede_safe,
    )

    result = Result(job.kind)
    backend = AsyncRedisBackend.from_url(job.url, near_cache=NearCache())
    near = _near_of(backend)

    async def value(x: str) -> dict[str, object]:
        return _value(x)

    sg_fn = cast(
        "Callable[[str], Awaitable[object]]",
        cached_stampede_safe(key="k:{x}", ttl=600, backend=backend)(value),
    )
    expected = _value(HOT)
    await sg_fn(HOT)
    deadline = time.monotonic() + LIVE_WAIT_S
    while not (near.live and len(near)) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
        await sg_fn(HOT)
    result.failure = _not_ready(near)
    if result.failure is None and await sg_fn(HOT) != expected:
        result.failure = "the near hit returned a wrong value"
    if result.failure is not None:
        await backend.aclose()
        return result
    client = redis.asyncio.Redis.from_url(job.url)
    await client.set(RAW_KEY, json.dumps(expected))
    get = client.get

    async def raw(x: str) -> object:
        return json.loads(cast("bytes", await get(f"raw:k:{x}")))

    if await raw(HOT) != expected:
        result.failure = "the raw GET returned a wrong value"
        return result
    _settle()
    await _aalternate((sg_fn, raw), 2, job.plan.slice_s)  # warm-up
    rt0 = RoundTrips.read()
    sg, other, calls = await _aalternate(
        (sg_fn, raw), job.plan.slices, job.plan.slice_s
    )
    rts = RoundTrips.read() - rt0 - calls[1]
    _fill(result, sg, other, sg_over=False)
    admin = redis.Redis.from_url(job.url)
    admin.config_resetstat()
    for _ in range(NEAR_HIT_CHECK_CALLS):
        await sg_fn(HOT)
    stats = command_stats(admin)
    admin.close()
    result.notes = {
        "calls": calls,
        "requests sent during the near slices (listener PINGs, 1 per quiet s)": rts,
        "near entries": len(near),
        "near live": near.live,
        "commands per near hit": {
            k: v / NEAR_HIT_CHECK_CALLS for k, v in stats.items()
        },
    }
    await client.aclose()
    await backend.aclose()
    return result


def _memory(job: Job) -> Result:
    from cachetools import TTLCache, cached  # noqa: PLC0415

    from stampede_guard import MemoryBackend, cached_stampede_safe  # noqa: PLC0415

    result = Result(job.kind)
    sg_fn = cast(
        "Callable[[str], object]",
        cached_stampede_safe(key="k:{x}", ttl=600, backend=MemoryBackend())(_value),
    )
    ct_fn = cast(
        "Callable[[str], object]",
        cached(TTLCache(maxsize=MAXSIZE, ttl=600))(_value),
    )
    if sg_fn(HOT) != _value(HOT) or ct_fn(HOT) != _value(HOT):
        result.failure = "wrong value"
        return result
    sides = ((sg_fn, job.plan.batch), (ct_fn, job.plan.batch))
    _settle()
    _alternate(sides, 2, job.plan.slice_s)  # warm-up
    sg, other, calls = _alternate(sides, job.plan.slices, job.plan.slice_s)
    _fill(result, sg, other, sg_over=False)
    result.notes = {"calls": calls}
    return result


# ---------------------------------------------------------------- hit ratio


def zipf_trace(requests: int, keys: int, s: float, seed: int) -> list[int]:
    """Return *requests* draws of keys 0..keys-1, key k with weight 1/(k+1)^s."""
    cum = list(itertools.accumulate(1.0 / (k + 1) ** s for k in range(keys)))
    rng = random.Random(seed)  # noqa: S311 - a reproducible trace, not a secret
    return rng.choices(range(keys), cum_weights=cum, k=requests)


def static_bound(keys: int, size: int, s: float) -> float:
    """The probability mass of the *size* most likely keys: no static choice does better."""
    weights = [1.0 / (k + 1) ** s for k in range(keys)]
    return math.fsum(weights[:size]) / math.fsum(weights)


def simulate_bounded(
    trace: Sequence[Hashable], maxsize: int, *, admission: bool = False
) -> float:
    """Hit ratio of stampede_guard's `BoundedStore` on *trace*.

    LRU; with *admission*, as the near cache keeps it by default (a new key gets in
    on its second try once the store is full).
    """
    from stampede_guard._bounded import BoundedStore  # noqa: PLC0415

    store: Any = BoundedStore(maxsize, admission=admission)
    get, put = store.get, store.put
    far = time.monotonic() + 1e9  # deadlines never reached
    hits = 0
    for k in trace:
        if get(k) is None:
            put(k, k, far)
        else:
            hits += 1
    return hits / len(trace)


def simulate_cachetools(trace: Sequence[Hashable], maxsize: int) -> float:
    """Hit ratio of cachetools' ``LRUCache`` on *trace*."""
    from cachetools import LRUCache  # noqa: PLC0415

    cache: LRUCache[Hashable, bool] = LRUCache(maxsize=maxsize)
    get = cache.get
    hits = 0
    for k in trace:
        if get(k) is None:
            cache[k] = True
        else:
            hits += 1
    return hits / len(trace)


def _zipf(job: Job) -> Result:
    result = Result(job.kind)
    t0 = time.perf_counter()
    trace = zipf_trace(job.plan.trace, N_KEYS, ZIPF_S, SEED)
    t1 = time.perf_counter()
    result.sg = simulate_bounded(trace, MAXSIZE, admission=True)
    t2 = time.perf_counter()
    result.anchor = simulate_cachetools(trace, MAXSIZE)
    t3 = time.perf_counter()
    result.ratio = result.sg / result.anchor
    top = Counter(trace).most_common(MAXSIZE)
    result.notes = {
        "requests": len(trace),
        "keys": N_KEYS,
        "maxsize": MAXSIZE,
        "zipf s": ZIPF_S,
        "seed": SEED,
        "static bound (probability mass of the top keys)": static_bound(
            N_KEYS, MAXSIZE, ZIPF_S
        ),
        "static bound on this trace (requests to its most frequent keys)": sum(
            n for _, n in top
        )
        / len(trace),
        "distinct keys requested": len(set(trace)),
        "BoundedStore without admission (plain LRU)": simulate_bounded(trace, MAXSIZE),
        "trace generation s": t1 - t0,
        "BoundedStore us per request": (t2 - t1) / len(trace) * 1e6,
        "LRUCache us per request": (t3 - t2) / len(trace) * 1e6,
    }
    return result


def _zipf_real(job: Job) -> Result:
    from stampede_guard import (  # noqa: PLC0415
        Entry,
        NearCache,
        RedisBackend,
        cached_stampede_safe,
    )
    from stampede_guard.metrics import Hit, Miss  # noqa: PLC0415

    result = Result(job.kind)
    trace = [str(k) for k in zipf_trace(job.plan.real_trace, N_KEYS, ZIPF_S, SEED)]
    counts: Counter[str] = Counter()

    def hook(event: object) -> None:
        if type(event) is Hit:
            counts["near hit" if event.near else "remote hit"] += 1
        elif type(event) is Miss:
            counts["miss"] += 1

    # ttl=600: the near entries outlive the run, so only the LRU policy decides.
    backend = RedisBackend.from_url(
        job.url, near_cache=NearCache(maxsize=MAXSIZE, ttl=600)
    )
    near = _near_of(backend)
    sg_fn: Any = cached_stampede_safe(
        key="z:{x}", ttl=600, backend=backend, metrics=hook
    )(_value)
    # Every key of the trace stored beforehand, by a backend without a near cache, so
    # that every near miss is one read from Redis that fills the near cache.
    t0 = time.perf_counter()
    plain = RedisBackend.from_url(job.url)
    now = time.time()
    for x in set(trace):
        plain.set(sg_fn.cache_key(x), Entry(_value(x), now, 0.001), 600)
    plain.close()
    t1 = time.perf_counter()
    # Subscribe the listener with a key outside the trace, then forget that key.
    sg_fn("warm-up")
    deadline = time.monotonic() + LIVE_WAIT_S
    while not near.live and time.monotonic() < deadline:
        time.sleep(0.01)
        sg_fn("warm-up")
    sg_fn.invalidate("warm-up")
    if not near.live:
        result.failure = (
            f"the near cache's listener did not subscribe within {LIVE_WAIT_S:.0f} s"
        )
        return result
    if len(near):
        result.failure = "the near cache is not empty before the trace"
        return result
    counts.clear()
    t2 = time.perf_counter()
    for x in trace:
        sg_fn(x)
    t3 = time.perf_counter()
    result.sg = counts["near hit"] / len(trace)
    result.anchor = simulate_bounded(trace, MAXSIZE, admission=True)
    result.ratio = result.sg / result.anchor
    result.notes = {
        "requests": len(trace),
        "events": dict(counts),
        "pre-stored keys": len(set(trace)),
        "pre-store s": t1 - t0,
        "trace s": t3 - t2,
        "near entries at the end": len(near),
        "near evictions": near.evictions,
        "cachetools LRUCache on this trace": simulate_cachetools(trace, MAXSIZE),
    }
    backend.close()
    return result


# ---------------------------------------------------------------- processes


def _run_in_child(job: Job) -> Result:
    if job.kind == "near_raw_sync":
        return _near_sync(job, "raw")
    if job.kind == "near_raw_async":
        return asyncio.run(_near_async(job))
    if job.kind == "near_cachetools":
        return _near_sync(job, "cachetools")
    if job.kind == "memory_cachetools":
        return _memory(job)
    if job.kind == "zipf":
        return _zipf(job)
    return _zipf_real(job)


def run_job(job: Job) -> Result:
    """Run one measurement in a spawned process, killed after CHILD_TIMEOUT_S."""
    got = run_in_child(_run_in_child, job, timeout_s=CHILD_TIMEOUT_S)
    if isinstance(got, Result):
        return got
    text = str(got)
    if "\n" in text:
        progress(text)
    return Result(job.kind, failure=text.splitlines()[0])


# ---------------------------------------------------------------- report


@dataclass(frozen=True, slots=True)
class Row:
    """How a measurement is shown and judged."""

    measurement: str
    anchor: str
    ratio: str  # what the ratio is
    target: str
    check: Callable[[float], bool]
    unit: str  # "us" (time per call) or "%" (hit ratio)


ROWS: dict[str, Row] = {
    "near_raw_sync": Row(
        "near hit vs redis-py GET + json.loads (sync)",
        "GET + json.loads",
        "raw time / near time",
        ">= 50x",
        lambda r: r >= 50,  # noqa: PLR2004
        "us",
    ),
    "near_raw_async": Row(
        "near hit vs redis.asyncio GET + json.loads",
        "await GET + json.loads",
        "raw time / near time",
        ">= 50x",
        lambda r: r >= 50,  # noqa: PLR2004
        "us",
    ),
    "near_cachetools": Row(
        "near hit vs cachetools @cached(LRUCache(10_000))",
        "cachetools LRUCache",
        "near time / cachetools time",
        "<= 1.5x",
        lambda r: r <= 1.5,  # noqa: PLR2004
        "us",
    ),
    "memory_cachetools": Row(
        "MemoryBackend hit vs cachetools @cached(TTLCache(10_000, 600))",
        "cachetools TTLCache",
        "cachetools time / memory time",
        ">= 1.0x",
        lambda r: r >= 1.0,
        "us",
    ),
    "zipf": Row(
        "hit ratio, Zipf(1.0) trace: the near cache's store (10_000, LRU + admission) vs LRUCache(10_000)",
        "cachetools LRUCache",
        "sg / cachetools",
        ">= 1.0x (LRU at least)",
        lambda r: r >= 1.0,
        "%",
    ),
    "zipf_real": Row(
        "near hit ratio, real near-cached RedisBackend vs its simulation",
        "BoundedStore simulation",
        "real / simulated",
        ">= 0.99x",
        lambda r: r >= 0.99,  # noqa: PLR2004
        "%",
    ),
}


def _shown(value: float, unit: str) -> str:
    if math.isnan(value):
        return "-"
    if unit == "%":
        return f"{value * 100:.2f} %"
    return f"{value * 1e6:.3f} us ({1 / value:,.0f}/s)"


def markdown(meta: dict[str, str], plan: Plan, results: Sequence[Result]) -> str:
    """Return the header, the table and the notes, in Markdown."""
    lines = ["# Near cache benchmark", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in meta.items()]
    lines += [
        "",
        (
            f"Hot paths: {plan.slices} slices of {plan.slice_s * 1000:.0f} ms per "
            "side, alternating; medians of per-slice time per call, median of "
            "per-pair ratios."
        ),
        "",
        "| measurement | stampede_guard | anchor | ratio | target | pass |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        row = ROWS[r.kind]
        if r.failure is not None:
            lines.append(
                f"| {row.measurement} | FAILED: {r.failure} | - | - | {row.target} | FAIL |"
            )
            continue
        verdict = "pass" if row.check(r.ratio) else "FAIL"
        lines.append(
            f"| {row.measurement} | {_shown(r.sg, row.unit)} | "
            f"{row.anchor}: {_shown(r.anchor, row.unit)} | "
            f"{r.ratio:.2f}x ({row.ratio}) | {row.target} | {verdict} |"
        )
    lines += ["", "Notes:", ""]
    for r in results:
        if r.notes:
            shown = ", ".join(f"{k}: {_note(v)}" for k, v in r.notes.items())
            lines.append(f"- {r.kind}: {shown}")
    return "\n".join(lines) + "\n"


def _note(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_note(v)}" for k, v in value.items()) + "}"
    return str(value)


def main(argv: Sequence[str] | None = None) -> int:
    """Measure; print Markdown; write JSON. Exit 1 if a measurement failed."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    parser.add_argument("--json", type=Path, default=None, help="also write JSON here")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    src_start = source_state()
    load_start = os.getloadavg()[:1]
    results: list[Result] = []
    with RedisServer() as server:
        redis_version = server.version()
        progress(f"redis-server {redis_version} on {server.url} (private)")
        progress(f"stampede_guard: {src_start}")
        for kind, row in ROWS.items():
            if kind == "zipf_real" and plan.real_trace == 0:
                continue
            server.admin.flushall()
            progress(f"[{kind}] ...")
            r = run_job(Job(kind, server.url, plan))
            results.append(r)
            shown = (
                f"FAILED: {r.failure}"
                if r.failure
                else f"{_shown(r.sg, row.unit)} vs "
                f"{_shown(r.anchor, row.unit)}, ratio {r.ratio:.2f}"
            )
            progress(f"[{kind}] {shown}")
    elapsed = time.perf_counter() - t0
    src_end = source_state()
    if source_summary(src_start, src_end).startswith("CHANGED"):
        progress("warning: src/stampede_guard changed during the run")
    meta = report_header(
        "near.py",
        started=started,
        elapsed=elapsed,
        redis_version=redis_version,
        src=(src_start, src_end),
        load=(load_start, os.getloadavg()[:1]),
        load_note="other processes share these cores: compare ratios, not absolute times",
    )
    text = markdown(meta, plan, results)
    sys.stdout.write(text)
    sys.stdout.flush()
    payload = json.dumps(
        {
            "meta": meta,
            "plan": dataclasses.asdict(plan),
            "results": [dataclasses.asdict(r) for r in results],
            "pass": {
                r.kind: r.failure is None and ROWS[r.kind].check(r.ratio)
                for r in results
            },
            "markdown": text,
        },
        indent=1,
    )
    RESULTS.mkdir(exist_ok=True)
    paths = [RESULTS / f"near-{started.strftime('%Y%m%d-%H%M%S')}.json"]
    if args.json is not None:
        paths.append(args.json)
    for path in paths:
        path.write_text(payload)
    progress(f"done in {elapsed:.0f} s; JSON in {', '.join(map(str, paths))}")
    return 1 if any(r.failure is not None for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
