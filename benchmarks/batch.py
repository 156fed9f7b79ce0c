"""Batch calls (many ids per call) under a stampede: stampede_guard against its peers.

Run from the repository root::

    uv run --group bench benchmarks/batch.py            # full run, 2.5-5 minutes
    uv run --group bench benchmarks/batch.py --quick    # smoke run, about 1 minute
    uv run --group bench benchmarks/batch.py --processes 4 --callers 25 --ids 200 --subset 20

**Workload.** ``P`` spawned processes (``--processes``, default 4) x ``T`` callers
each (``--callers``, default 25: threads for sync contenders, asyncio tasks for async
ones). Caller ``g`` (over all processes) asks for a seeded random subset of ``S`` ids
(``--subset``, default 20) out of ``N`` (``--ids``, default 200): ids ``u0..u<N-1>``,
``random.Random(seed, g).sample``; the subsets overlap (each id is asked by about
``P*T*S/N`` callers). Every caller is parked at a gate; all are released at once, on
a cold cache (FLUSHALL before every repetition). The same subsets are asked of every
contender in a repetition; each repetition has its own seed.

The upstream function is the contender's batch function: it is called with a list of
ids, sleeps ``50 ms + 1 ms per id`` (``time.sleep``, or ``asyncio.sleep``), records
the call (ids, start, end) in its process, and returns ``{id: value}`` (a ~300-byte
JSON-able dict per id). A caller's answer must be exactly its ids with their values,
or it counts as an error.

**Contenders** (value TTL 900 s, lock timeout 10 s, pools capped at 2,048 connections
and pre-warmed, one warm-up call per process before the stampede, as in run.py):

- ``stampede_guard``: ``@cached_stampede_safe_batch(key="user:{}", ttl=900,
  lock_timeout=10, backend=RedisBackend.from_url(url, prefix="bench",
  max_connections=2048))`` on ``def users(ids)``;
- ``stampede_guard_async``: the same on ``async def users(ids)`` with
  ``AsyncRedisBackend.from_url``;
- ``dogpile``: ``region.get_or_create_multi(keys, creator)`` on a region configured as
  dogpile.cache's Redis backend documents it for several processes:
  ``"dogpile.cache.redis"``, ``expiration_time=900``, arguments
  ``distributed_lock=True``, ``thread_local_lock=False`` (its docs: must be False with
  a distributed lock), ``lock_timeout=10``, ``redis_expiration_time=1800`` ("should be
  larger than dogpile's cache expiration"), ``lock_sleep`` left at its 0.1 s default;
- ``aiocache``: ``@multi_cached(keys_from_attr="ids", namespace="user", ttl=900,
  cache=Cache.REDIS, serializer=JsonSerializer(), pool_max_size=2048)`` on
  ``async def users(ids)``. It takes no lock: measured anyway.

**Per contender** (medians over repetitions; counts as ``median [min-max]`` when they
differ):

- *upstream calls*, *ids computed* (the sum of the lengths of the id lists the upstream
  function was called with), *needed* (the distinct ids asked by anyone: the ideal
  number of computations), *excess computations* (ids computed minus distinct ids
  computed: every computation of an id after its first), *max per id* (the most times
  one id was computed);
- *latency*: each caller's return minus its release (p50 / p99 / max, nearest rank);
- *excess wait*: how long after the moment all of its ids had first been computed
  (by anyone, anywhere) a caller returned:
  ``end - max(start, max over its ids of the end of that id's first computation)``.
  It is what the caller waited beyond the computations it could not avoid: storing,
  noticing, fetching, decoding, in-turn waiting, and for a contender that recomputes
  ids already computed elsewhere, that recomputation. It does not charge a contender
  for when its computations were scheduled (that shows in the latency);
- *Redis commands*: INFO commandstats between CONFIG RESETSTAT (with every caller
  parked) and the end, summed (the harness's own CONFIG/INFO left out). Commands run
  inside Lua scripts count, each ``redis.call`` once, plus the EVALSHA;
- *requests* (round trips): counted client-side by wrapping redis-py's
  ``send_packed_command`` (sync and asyncio) in every worker, from the release to the
  end; one request is one command or one pipeline. *Client commands* are the commands
  inside those requests (a pipeline of 20 SETs is 1 request, 20 commands; a script is
  1 EVALSHA whatever it does inside). Both are shown per call (per caller call);
  the requests are also broken down by command (``pipeline`` for a pipeline);
- *Redis CPU*: the change of the server's user + system CPU time.

**Sweep** (stampede_guard only): the same figures per call at ``S`` = 5, 20 and 50:
first for a lone caller (one process, one caller, 10 calls in turn, each asking ``S``
ids no one has asked: no contention, every id computed by this call), then under the
stampede above. The target: a lone call's requests do not grow with ``S``
(requests per call at S=50 at most 1.5 times those at S=5, for 10 times the ids).
Under the stampede, ids locked by another caller are waited for id by id (the single
decorator's plan), so those figures also count the waits.

**Bounds**: callers still waiting ``--hang-after`` seconds (default 60; 30 with
``--quick``) after the release are recorded as hung (errors, with where they wait);
the worker then reports and exits at once, and any worker still alive 20 s later is
killed. A worker that crashes fails that measurement only.

Markdown goes to stdout, progress to stderr, JSON to
``benchmarks/results/batch-<stamp>.json`` (and ``--json PATH``). It starts its own
redis-server on a free 127.0.0.1 port (see redis_server.py) and never talks to any
other.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import multiprocessing as mp
import os
import queue
import random
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing.context import SpawnProcess
from multiprocessing.queues import Queue as MpQueue
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Any, ClassVar, Literal, NoReturn, Protocol
from urllib.parse import urlparse

import redis
import redis.asyncio.connection
import redis.connection

from common import (
    LOCK_TIMEOUT_S,
    POOL_MAX,
    TTL_S,
    Clock,
    GcPauses,
    Pct,
    describe,
    make_value,
    median,
    pct,
    report_header,
    source_summary,
)
from peers import prewarm_async_pool, prewarm_sync_pool, sync_pool
from redis_server import RedisServer, command_stats, cpu_seconds
from run import RESULTS, progress, source_state

Value = dict[str, object]
Upstream = Callable[[Sequence[str]], dict[str, Value]]
AsyncUpstream = Callable[[Sequence[str]], Awaitable[dict[str, Value]]]
Kind = Literal["sync", "async"]
Message = tuple[Literal["ready", "report", "error"], int, object]

BASE_S = 0.050  # upstream time per call
PER_ID_S = 0.001  # ... plus this per id
SWEEP = (5, 20, 50)
LONE_ROUNDS = 10  # calls in turn of the lone caller, per repetition
READY_TIMEOUT_S = 90.0
REPORT_GRACE_S = 20.0
JOIN_TIMEOUT_S = 5.0
SEED = 20261218


@dataclass(frozen=True, slots=True)
class Contender:
    """A library's batch call, as its docs recommend it."""

    name: str
    kind: Kind
    module: str
    summary: str


CONTENDERS: dict[str, Contender] = {
    c.name: c
    for c in (
        Contender(
            "stampede_guard",
            "sync",
            "stampede_guard",
            "@cached_stampede_safe_batch(key='user:{}', ttl=900, lock_timeout=10, "
            "backend=RedisBackend.from_url(url, prefix='bench', max_connections=2048))",
        ),
        Contender(
            "stampede_guard_async",
            "async",
            "stampede_guard",
            "the same on async def, AsyncRedisBackend.from_url(...)",
        ),
        Contender(
            "dogpile",
            "sync",
            "dogpile.cache",
            "region.get_or_create_multi(keys, creator); dogpile.cache.redis, "
            "expiration_time=900, distributed_lock=True, thread_local_lock=False, "
            "lock_timeout=10, redis_expiration_time=1800",
        ),
        Contender(
            "aiocache",
            "async",
            "aiocache",
            "@multi_cached(keys_from_attr='ids', namespace='user', ttl=900, "
            "cache=Cache.REDIS, serializer=JsonSerializer(), pool_max_size=2048); no lock",
        ),
    )
}
SG = ("stampede_guard", "stampede_guard_async")


# ---------------------------------------------------------------- requests


def command_names(packed: bytes) -> list[str]:
    """Return the name of every command in *packed* (RESP arrays of bulk strings)."""
    names: list[str] = []
    pos, size = 0, len(packed)
    while pos < size and packed[pos : pos + 1] == b"*":
        end = packed.index(b"\r\n", pos)
        count = int(packed[pos + 1 : end])
        pos = end + 2
        for j in range(count):
            end = packed.index(b"\r\n", pos)
            length = int(packed[pos + 1 : end])
            pos = end + 2
            if j == 0:
                names.append(
                    packed[pos : pos + length].decode(errors="replace").upper()
                )
            pos += length + 2
    return names


def _packed_bytes(command: object) -> bytes:
    if isinstance(command, bytes):
        return command
    if isinstance(command, str):
        return command.encode()
    if isinstance(command, Iterable):
        return b"".join(bytes(chunk) for chunk in command)
    return b""


class Requests:
    """The requests redis-py writes in this process, by command (sync and asyncio).

    One request is one ``send_packed_command``: a command, or a pipeline (labelled
    ``pipeline``). Every command inside the requests is counted too.
    """

    _lock: ClassVar[threading.Lock] = threading.Lock()
    by_label: ClassVar[Counter[str]] = Counter()
    by_command: ClassVar[Counter[str]] = Counter()
    _installed: ClassVar[bool] = False

    @classmethod
    def note(cls, command: object) -> None:
        """Count one request."""
        try:
            names = command_names(_packed_bytes(command))
        except ValueError:
            names = []
        label = names[0] if len(names) == 1 else "pipeline" if names else "?"
        with cls._lock:
            cls.by_label[label] += 1
            cls.by_command.update(names)

    @classmethod
    def install(cls) -> None:
        """Wrap redis-py's send_packed_command, sync and asyncio (once per process)."""
        if cls._installed:
            return
        cls._installed = True
        note = cls.note
        sync_cls: Any = redis.connection.AbstractConnection
        sync_send: Callable[..., Any] = sync_cls.send_packed_command

        def send(self: object, command: object, *args: Any, **kwargs: Any) -> Any:
            note(command)
            return sync_send(self, command, *args, **kwargs)

        sync_cls.send_packed_command = send
        async_cls: Any = redis.asyncio.connection.AbstractConnection
        async_send: Callable[..., Any] = async_cls.send_packed_command

        async def asend(
            self: object, command: object, *args: Any, **kwargs: Any
        ) -> Any:
            note(command)
            return await async_send(self, command, *args, **kwargs)

        async_cls.send_packed_command = asend

    @classmethod
    def snapshot(cls) -> tuple[Counter[str], Counter[str]]:
        """Return copies of the counts so far."""
        with cls._lock:
            return Counter(cls.by_label), Counter(cls.by_command)


# ---------------------------------------------------------------- contenders


class Events:
    """stampede_guard's metrics events in this process, by kind (``--events`` only).

    A diagnostic: with it, stampede_guard's contenders get ``metrics=Events.hook``,
    which counts each event by class name, and `LockWait` by outcome, `Timeout` by
    action and `BackendFailed` by error.
    """

    _lock: ClassVar[threading.Lock] = threading.Lock()
    counts: ClassVar[Counter[str]] = Counter()

    @classmethod
    def hook(cls, event: object) -> None:
        """Count *event* (a stampede_guard metrics hook)."""
        name = type(event).__name__
        if name == "LockWait":
            name += f"({getattr(event, 'outcome', '?')})"
        elif name == "Timeout":
            name += f"({getattr(event, 'action', '?')})"
        elif name in {"BackendFailed", "ComputeError", "RefreshFailed"}:
            error = getattr(event, "error", None)
            cause = getattr(error, "__cause__", None)
            why = f"{type(error).__name__} from {type(cause).__name__}: {cause}"
            name += f"({why[:120]})"
        with cls._lock:
            cls.counts[name] += 1

    @classmethod
    def snapshot(cls) -> Counter[str]:
        """Return a copy of the counts so far."""
        with cls._lock:
            return Counter(cls.counts)


def _sg_options(events: bool) -> dict[str, Any]:  # noqa: FBT001 - one flag
    options: dict[str, Any] = {"ttl": TTL_S, "lock_timeout": LOCK_TIMEOUT_S}
    if events:
        options["metrics"] = Events.hook
    return options


class SyncBatch(Protocol):
    """A sync contender."""

    def call(self, ids: list[str]) -> object:
        """Return ``{id: value}`` for *ids*, through the contender."""

    def prewarm(self, n: int) -> None:
        """Open *n* pooled connections now."""


class AsyncBatch(Protocol):
    """An async contender (built inside the event loop it runs in)."""

    async def call(self, ids: list[str]) -> object:
        """Return ``{id: value}`` for *ids*, through the contender."""

    async def prewarm(self, n: int) -> None:
        """Open *n* pooled connections now."""


class SgSync:
    """stampede_guard's batch decorator on ``def users(ids)``."""

    def __init__(self, url: str, upstream: Upstream, *, events: bool) -> None:
        import stampede_guard as sg  # noqa: PLC0415

        self.backend = sg.RedisBackend.from_url(
            url, prefix="bench", max_connections=POOL_MAX
        )

        def users(ids: Sequence[str]) -> dict[str, Value]:
            return upstream(ids)

        self._cached: Callable[[list[str]], object] = sg.cached_stampede_safe_batch(
            key="user:{}", backend=self.backend, **_sg_options(events)
        )(users)

    def call(self, ids: list[str]) -> object:
        """See `SyncBatch.call`."""
        return self._cached(ids)

    def prewarm(self, n: int) -> None:
        """See `SyncBatch.prewarm`."""
        client = getattr(self.backend, "client", None)
        if client is not None:
            prewarm_sync_pool(client.connection_pool, n)


class SgAsync:
    """stampede_guard's batch decorator on ``async def users(ids)``."""

    def __init__(self, url: str, upstream: AsyncUpstream, *, events: bool) -> None:
        import stampede_guard as sg  # noqa: PLC0415

        self.backend = sg.AsyncRedisBackend.from_url(
            url, prefix="bench", max_connections=POOL_MAX
        )

        async def users(ids: Sequence[str]) -> dict[str, Value]:
            return await upstream(ids)

        self._cached: Callable[[list[str]], Awaitable[object]] = (
            sg.cached_stampede_safe_batch(
                key="user:{}", backend=self.backend, **_sg_options(events)
            )(users)
        )

    async def call(self, ids: list[str]) -> object:
        """See `AsyncBatch.call`."""
        return await self._cached(ids)

    async def prewarm(self, n: int) -> None:
        """See `AsyncBatch.prewarm`."""
        client = getattr(self.backend, "client", None)
        if client is not None:
            await prewarm_async_pool(client.connection_pool, n)


class DogpileMulti:
    """dogpile.cache ``get_or_create_multi`` with its distributed Redis lock."""

    def __init__(self, url: str, upstream: Upstream) -> None:
        from dogpile.cache import make_region  # noqa: PLC0415

        self.pool = sync_pool(url)
        self.region: Any = make_region().configure(
            "dogpile.cache.redis",
            expiration_time=TTL_S,
            arguments={
                "connection_pool": self.pool,
                "distributed_lock": True,
                "thread_local_lock": False,
                "lock_timeout": LOCK_TIMEOUT_S,
                "redis_expiration_time": 2 * TTL_S,
            },
        )
        self.upstream = upstream

    def _create(self, *keys: str) -> list[Value]:
        ids = [k.removeprefix("user:") for k in keys]
        got = self.upstream(ids)
        return [got[i] for i in ids]

    def call(self, ids: list[str]) -> object:
        """See `SyncBatch.call`."""
        values = self.region.get_or_create_multi(
            [f"user:{i}" for i in ids], self._create
        )
        return dict(zip(ids, values, strict=True))

    def prewarm(self, n: int) -> None:
        """See `SyncBatch.prewarm`."""
        prewarm_sync_pool(self.pool, n)


class AioCacheMulti:
    """aiocache ``@multi_cached`` on its Redis cache (no lock)."""

    def __init__(self, url: str, upstream: AsyncUpstream) -> None:
        from aiocache import Cache, multi_cached  # noqa: PLC0415
        from aiocache.serializers import JsonSerializer  # noqa: PLC0415

        where = urlparse(url)

        async def users(ids: list[str]) -> dict[str, Value]:
            return await upstream(ids)

        decorator: Any = multi_cached(
            keys_from_attr="ids",
            namespace="user",
            ttl=TTL_S,
            cache=Cache.REDIS,
            serializer=JsonSerializer(),
            endpoint=where.hostname,
            port=where.port,
            pool_max_size=POOL_MAX,
        )
        self._cached: Any = decorator(users)

    async def call(self, ids: list[str]) -> object:
        """See `AsyncBatch.call`."""
        return await self._cached(ids)

    async def prewarm(self, n: int) -> None:
        """See `AsyncBatch.prewarm`."""
        await prewarm_async_pool(self._cached.cache.client.connection_pool, n)


def make_sync(name: str, url: str, upstream: Upstream, *, events: bool) -> SyncBatch:
    """Build sync contender *name* (*events*: count stampede_guard's events)."""
    if name == "stampede_guard":
        return SgSync(url, upstream, events=events)
    if name == "dogpile":
        return DogpileMulti(url, upstream)
    msg = f"no sync contender {name!r}"
    raise ValueError(msg)


def make_async(
    name: str, url: str, upstream: AsyncUpstream, *, events: bool
) -> AsyncBatch:
    """Build async contender *name* (inside its event loop)."""
    if name == "stampede_guard_async":
        return SgAsync(url, upstream, events=events)
    if name == "aiocache":
        return AioCacheMulti(url, upstream)
    msg = f"no async contender {name!r}"
    raise ValueError(msg)


def skip_reason(name: str) -> str | None:
    """Return why contender *name* cannot run here, or None."""
    import importlib  # noqa: PLC0415

    try:
        importlib.import_module(CONTENDERS[name].module)
    except Exception as exc:  # noqa: BLE001 - any import failure skips it
        return f"{CONTENDERS[name].module} not importable ({type(exc).__name__}: {exc})"
    return None


# ---------------------------------------------------------------- worker side


@dataclass(frozen=True, slots=True)
class Job:
    """What one worker process does (pickled to the spawned child)."""

    contender: str
    url: str
    index: int
    callers: int  # in this process
    rounds: int  # calls per caller, in turn
    n_ids: int  # 0: every call asks ids no one else asks (the lone sweep)
    subset: int
    seed: int
    hang_s: float
    events: bool


def asked(job: Job, caller: int, rnd: int) -> list[str]:
    """Return the ids caller *caller* of this process asks in its call *rnd*."""
    g = job.index * job.callers + caller
    if job.n_ids == 0:
        return [f"f{g}-{rnd}-{j}" for j in range(job.subset)]
    rng = random.Random(  # noqa: S311 - a workload, not cryptography
        (job.seed * 1_000_003 + g) * 1_009 + rnd
    )
    return [f"u{i}" for i in rng.sample(range(job.n_ids), job.subset)]


def check(ids: Sequence[str], got: object) -> str:
    """Return "ok" if *got* maps exactly *ids* to their values, else what is wrong."""
    if not isinstance(got, Mapping):
        return f"not a mapping: {type(got).__name__}"
    if set(got) != set(ids):
        return "wrong ids"
    if any(got[i] != make_value(i) for i in ids):
        return "wrong value"
    return "ok"


@dataclass(slots=True)
class Report:
    """What one worker reports (wall-aligned seconds)."""

    index: int
    calls: list[tuple[tuple[str, ...], float, float, str]] = field(
        default_factory=list
    )  # asked ids, start, end, outcome
    upstream: list[tuple[tuple[str, ...], float, float]] = field(default_factory=list)
    starts: list[float] = field(default_factory=list)
    hung: int = 0
    hung_where: dict[str, int] = field(default_factory=dict)
    requests: dict[str, int] = field(default_factory=dict)
    commands: dict[str, int] = field(default_factory=dict)
    events: dict[str, int] = field(default_factory=dict)
    gc_longest_ms: float = 0.0


def _value_of(i: str) -> Value:
    return make_value(i)


def worker_main(job: Job, results: MpQueue[Message], go: MpEvent) -> None:
    """Entry point of a spawned worker: run the job, report, exit hard."""
    Requests.install()
    GcPauses.install()
    try:
        if CONTENDERS[job.contender].kind == "sync":
            _exit(results, _threads(job, results, go))
        else:
            asyncio.run(_tasks(job, results, go))
    except BaseException as exc:  # noqa: BLE001 - reported to the coordinator
        results.put(("error", job.index, f"{describe(exc)}\n{traceback.format_exc()}"))
    _exit(results, None)


def _exit(results: MpQueue[Message], report: Report | None) -> NoReturn:
    if report is not None:
        results.put(("report", report.index, report))
    results.close()
    results.join_thread()
    os._exit(0)


def _diff(after: Counter[str], before: Counter[str]) -> dict[str, int]:
    return dict((after - before).most_common())


def _where(frames: Sequence[traceback.FrameSummary]) -> str:
    inner = [f for f in frames if Path(f.filename).name != "batch.py"][-3:]
    return " < ".join(
        f"{Path(f.filename).parent.name}/{Path(f.filename).name}:{f.lineno} {f.name}"
        for f in reversed(inner)
    )


def _threads(  # noqa: C901, PLR0915 - one worker's life, in order
    job: Job, results: MpQueue[Message], go: MpEvent
) -> Report:
    ups: list[tuple[tuple[str, ...], float, float]] = []
    warming = [True]

    def upstream(ids: Sequence[str]) -> dict[str, Value]:
        ids = tuple(ids)
        if warming[0]:
            return {i: _value_of(i) for i in ids}
        t0 = time.perf_counter()
        time.sleep(BASE_S + PER_ID_S * len(ids))
        ups.append((ids, t0, time.perf_counter()))
        return {i: _value_of(i) for i in ids}

    peer = make_sync(job.contender, job.url, upstream, events=job.events)
    warm = [f"warm-{job.index}-a", f"warm-{job.index}-b"]
    if check(warm, peer.call(warm)) != "ok":
        msg = "warm-up call returned a wrong answer"
        raise RuntimeError(msg)
    warming[0] = False
    peer.prewarm(job.callers)

    plans = [[asked(job, c, r) for r in range(job.rounds)] for c in range(job.callers)]
    parked = threading.Barrier(job.callers + 1)
    gate = threading.Event()
    all_done = threading.Event()
    lock = threading.Lock()
    records: list[tuple[tuple[str, ...], float, float, str]] = []
    starts: list[float] = []
    done = [False] * job.callers
    remaining = [job.callers]

    def caller(c: int) -> None:
        parked.wait()
        gate.wait()
        for ids in plans[c]:
            start = time.perf_counter()
            starts.append(start)
            try:
                outcome = check(ids, peer.call(ids))
            except Exception as exc:  # noqa: BLE001 - the caller's outcome
                outcome = describe(exc)
            records.append((tuple(ids), start, time.perf_counter(), outcome))
        with lock:
            done[c] = True
            remaining[0] -= 1
            if remaining[0] == 0:
                all_done.set()

    threads = [
        threading.Thread(target=caller, args=(c,), daemon=True)
        for c in range(job.callers)
    ]
    for t in threads:
        t.start()
    parked.wait(timeout=READY_TIMEOUT_S)
    GcPauses.settle()
    results.put(("ready", job.index, None))
    if not go.wait(timeout=READY_TIMEOUT_S):
        msg = "never released"
        raise RuntimeError(msg)
    clock = Clock()
    before = Requests.snapshot()
    events_before = Events.snapshot()
    GcPauses.reset()
    gate.set()
    all_done.wait(timeout=job.hang_s)
    after = Requests.snapshot()
    events = _diff(Events.snapshot(), events_before)
    frames = sys._current_frames()  # noqa: SLF001 - where hung callers wait
    with lock:
        hung = [t for c, t in enumerate(threads) if not done[c]]
        finished = list(records)
    where: Counter[str] = Counter()
    for t in hung:
        frame = frames.get(t.ident) if t.ident is not None else None
        if frame is not None:
            where[_where(traceback.extract_stack(frame))] += 1
    return Report(
        index=job.index,
        calls=[(i, clock.wall(s), clock.wall(e), o) for i, s, e, o in finished],
        upstream=[(i, clock.wall(s), clock.wall(e)) for i, s, e in ups],
        starts=[clock.wall(s) for s in starts],
        hung=len(hung),
        hung_where=dict(where.most_common(3)),
        requests=_diff(after[0], before[0]),
        commands=_diff(after[1], before[1]),
        events=events,
        gc_longest_ms=GcPauses.longest_ms(),
    )


async def _tasks(  # noqa: PLR0915 - one worker's life, in order
    job: Job, results: MpQueue[Message], go: MpEvent
) -> None:
    ups: list[tuple[tuple[str, ...], float, float]] = []
    warming = [True]

    async def upstream(ids: Sequence[str]) -> dict[str, Value]:
        ids = tuple(ids)
        if warming[0]:
            return {i: _value_of(i) for i in ids}
        t0 = time.perf_counter()
        await asyncio.sleep(BASE_S + PER_ID_S * len(ids))
        ups.append((ids, t0, time.perf_counter()))
        return {i: _value_of(i) for i in ids}

    peer = make_async(job.contender, job.url, upstream, events=job.events)
    await peer.prewarm(job.callers)
    warm = [f"warm-{job.index}-a", f"warm-{job.index}-b"]
    if check(warm, await peer.call(warm)) != "ok":
        msg = "warm-up call returned a wrong answer"
        raise RuntimeError(msg)
    warming[0] = False

    plans = [[asked(job, c, r) for r in range(job.rounds)] for c in range(job.callers)]
    gate = asyncio.Event()
    all_parked = asyncio.Event()
    parked = [0]
    records: list[tuple[tuple[str, ...], float, float, str]] = []
    starts: list[float] = []

    async def caller(c: int) -> None:
        parked[0] += 1
        if parked[0] == job.callers:
            all_parked.set()
        await gate.wait()
        for ids in plans[c]:
            start = time.perf_counter()
            starts.append(start)
            try:
                outcome = check(ids, await peer.call(ids))
            except Exception as exc:  # noqa: BLE001 - the caller's outcome
                outcome = describe(exc)
            records.append((tuple(ids), start, time.perf_counter(), outcome))

    tasks = [asyncio.create_task(caller(c)) for c in range(job.callers)]
    await asyncio.wait_for(all_parked.wait(), READY_TIMEOUT_S)
    GcPauses.settle()
    results.put(("ready", job.index, None))
    loop = asyncio.get_running_loop()
    if not await loop.run_in_executor(None, go.wait, READY_TIMEOUT_S):
        msg = "never released"
        raise RuntimeError(msg)
    clock = Clock()
    before = Requests.snapshot()
    events_before = Events.snapshot()
    GcPauses.reset()
    gate.set()
    _done, pending = await asyncio.wait(tasks, timeout=job.hang_s)
    after = Requests.snapshot()
    events = _diff(Events.snapshot(), events_before)
    where: Counter[str] = Counter()
    for task in pending:
        where[_where(_awaiting(task))] += 1
    _exit(
        results,
        Report(
            index=job.index,
            calls=[(i, clock.wall(s), clock.wall(e), o) for i, s, e, o in records],
            upstream=[(i, clock.wall(s), clock.wall(e)) for i, s, e in ups],
            starts=[clock.wall(s) for s in starts],
            hung=len(pending),
            hung_where=dict(where.most_common(3)),
            requests=_diff(after[0], before[0]),
            commands=_diff(after[1], before[1]),
            events=events,
            gc_longest_ms=GcPauses.longest_ms(),
        ),
    )


def _awaiting(task: asyncio.Task[None]) -> list[traceback.FrameSummary]:
    frames: list[traceback.FrameSummary] = []
    coro: object = task.get_coro()
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            code = frame.f_code
            frames.append(
                traceback.FrameSummary(code.co_filename, frame.f_lineno, code.co_name)
            )
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return frames


# ---------------------------------------------------------------- coordinator side


@dataclass(frozen=True, slots=True)
class Shape:
    """Who calls, and what they ask."""

    label: str  # "stampede" or "lone"
    processes: int
    callers: int  # per process
    rounds: int
    n_ids: int  # 0: fresh ids for every call
    subset: int
    hang_s: float
    events: bool


@dataclass(slots=True)
class RunResult:
    """One contender, one shape, one repetition."""

    contender: str
    shape: str
    rep: int
    processes: int
    callers: int  # over all processes
    subset: int
    n_ids: int
    calls: int = 0  # caller calls made (callers x rounds, when none hung)
    ok: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    hung: int = 0
    hung_where: dict[str, int] = field(default_factory=dict)
    upstream_calls: int = 0
    ids_computed: int = 0
    distinct_computed: int = 0
    ids_needed: int = 0
    excess_computations: int = 0
    max_per_id: int = 0
    uncovered: int = 0  # ok calls with an id no one computed in this run
    latency_ms: Pct | None = None
    excess_wait_ms: Pct | None = None
    redis_cmds: int = 0
    cmds_by_name: dict[str, int] = field(default_factory=dict)
    requests: int = 0
    requests_by_label: dict[str, int] = field(default_factory=dict)
    client_commands: int = 0
    client_commands_by_name: dict[str, int] = field(default_factory=dict)
    events: dict[str, int] = field(default_factory=dict)  # with --events only
    redis_cpu_ms: float = 0.0
    start_spread_ms: float = 0.0
    gc_longest_ms: float = 0.0
    wall_s: float = 0.0
    failure: str | None = None

    def per_call(self, total: float) -> float:
        """Return *total* divided by the calls made (NaN for none)."""
        return total / self.calls if self.calls else math.nan


def summarize(result: RunResult, reports: Sequence[Report]) -> RunResult:
    """Fill *result* from the workers' reports."""
    first_end: dict[str, float] = {}
    per_id: Counter[str] = Counter()
    for rep in reports:
        for ids, _start, end in rep.upstream:
            result.upstream_calls += 1
            for i in ids:
                per_id[i] += 1
                first_end[i] = min(first_end.get(i, end), end)
    calls = [c for rep in reports for c in rep.calls]
    ok = [c for c in calls if c[3] == "ok"]
    latency: list[float] = []
    excess: list[float] = []
    for ids, start, end, _ in ok:
        latency.append(end - start)
        ends = [first_end.get(i) for i in ids]
        known = [e for e in ends if e is not None]
        if len(known) < len(ends):
            result.uncovered += 1
            continue
        excess.append(end - max(start, *known))
    result.calls = len(calls)
    result.ok = len(ok)
    result.hung = sum(r.hung for r in reports)
    result.errors = len(calls) - len(ok) + result.hung
    result.error_kinds = dict(
        Counter(c[3] for c in calls if c[3] != "ok").most_common(3)
    )
    where: Counter[str] = Counter()
    for r in reports:
        where.update(r.hung_where)
    result.hung_where = dict(where.most_common(3))
    result.ids_computed = sum(per_id.values())
    result.distinct_computed = len(per_id)
    result.ids_needed = len({i for c in calls for i in c[0]})
    result.excess_computations = result.ids_computed - result.distinct_computed
    result.max_per_id = max(per_id.values(), default=0)
    result.latency_ms = pct(latency)
    result.excess_wait_ms = pct(excess)
    labels: Counter[str] = Counter()
    names: Counter[str] = Counter()
    for r in reports:
        labels.update(r.requests)
        names.update(r.commands)
    result.requests = sum(labels.values())
    result.requests_by_label = dict(labels.most_common())
    result.client_commands = sum(names.values())
    result.client_commands_by_name = dict(names.most_common())
    events: Counter[str] = Counter()
    for r in reports:
        events.update(r.events)
    result.events = dict(events.most_common())
    starts = [t for r in reports for t in r.starts]
    result.start_spread_ms = (max(starts) - min(starts)) * 1000 if starts else 0.0
    result.gc_longest_ms = max((r.gc_longest_ms for r in reports), default=0.0)
    return result


def _kill(procs: Sequence[SpawnProcess]) -> None:
    for p in procs:
        p.join(timeout=JOIN_TIMEOUT_S if p.is_alive() else 0.1)
        if p.is_alive():
            p.kill()
            p.join(timeout=JOIN_TIMEOUT_S)


def _await(
    results: MpQueue[Message],
    procs: Sequence[SpawnProcess],
    what: Literal["ready", "report"],
    timeout_s: float,
    reports: list[Report],
) -> str | None:
    """Wait for one *what* message per process; return a failure, or None."""
    deadline = time.monotonic() + timeout_s
    pending = set(range(len(procs)))
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            return f"timed out waiting for {what} from worker(s) {sorted(pending)}"
        try:
            kind, index, payload = results.get(timeout=min(left, 1.0))
        except queue.Empty:
            dead = [i for i in pending if not procs[i].is_alive()]
            if dead:
                return f"worker(s) {dead} died (exit codes {[procs[i].exitcode for i in dead]})"
            continue
        if kind == "error":
            progress(str(payload))
            return f"worker {index}: {str(payload).splitlines()[0]}"
        if kind == what:
            pending.discard(index)
            if isinstance(payload, Report):
                reports.append(payload)
    return None


def run_once(
    contender: str, shape: Shape, rep: int, seed: int, server: RedisServer
) -> RunResult:
    """Run *contender* once in *shape*, on a flushed server, and return its figures."""
    started = time.perf_counter()
    admin = server.admin
    result = RunResult(
        contender=contender,
        shape=shape.label,
        rep=rep,
        processes=shape.processes,
        callers=shape.processes * shape.callers,
        subset=shape.subset,
        n_ids=shape.n_ids,
    )
    ctx = mp.get_context("spawn")
    results: MpQueue[Message] = ctx.Queue()
    go = ctx.Event()
    admin.flushall()
    procs = [
        ctx.Process(
            target=worker_main,
            args=(
                Job(
                    contender,
                    server.url,
                    i,
                    shape.callers,
                    shape.rounds,
                    shape.n_ids,
                    shape.subset,
                    seed,
                    shape.hang_s,
                    shape.events,
                ),
                results,
                go,
            ),
            daemon=True,
            name=f"batch-{contender}-{i}",
        )
        for i in range(shape.processes)
    ]
    for p in procs:
        p.start()
    reports: list[Report] = []
    try:
        failure = _await(results, procs, "ready", READY_TIMEOUT_S, [])
        if failure is None:
            admin.config_resetstat()
            cpu0 = cpu_seconds(admin)
            go.set()
            failure = _await(
                results, procs, "report", shape.hang_s + REPORT_GRACE_S, reports
            )
            _kill(procs)
            stats = command_stats(admin)
            result.redis_cpu_ms = (cpu_seconds(admin) - cpu0) * 1000
            result.cmds_by_name = dict(sorted(stats.items(), key=lambda kv: -kv[1]))
            result.redis_cmds = sum(stats.values())
        result.failure = failure
        summarize(result, reports)
        if failure is not None:
            missing = shape.processes - len(reports)
            result.errors += missing * shape.callers * shape.rounds
    finally:
        _kill(procs)
        results.close()
    result.wall_s = time.perf_counter() - started
    return result


# ---------------------------------------------------------------- plan and report


@dataclass(frozen=True, slots=True)
class Plan:
    """What one run measures."""

    reps: int
    processes: int
    callers: int
    n_ids: int
    subset: int
    hang_s: float
    lone_rounds: int
    sweep: tuple[int, ...]
    events: bool

    def stampede(self, subset: int) -> Shape:
        """Return the stampede shape asking *subset* ids per call."""
        return Shape(
            "stampede",
            self.processes,
            self.callers,
            1,
            self.n_ids,
            min(subset, self.n_ids),
            self.hang_s,
            self.events,
        )

    def lone(self, subset: int) -> Shape:
        """Return the lone caller's shape asking *subset* fresh ids per call."""
        return Shape(
            "lone", 1, 1, self.lone_rounds, 0, subset, self.hang_s, self.events
        )


def _progress_line(r: RunResult, done: int, total: int) -> str:
    lat = r.latency_ms
    ex = r.excess_wait_ms
    text = (
        f"[{done}/{total}] {r.shape} S={r.subset} rep {r.rep} {r.contender}: "
        f"upstream calls {r.upstream_calls}, ids computed {r.ids_computed} "
        f"(needed {r.ids_needed}, excess {r.excess_computations}, max/id "
        f"{r.max_per_id}), errors {r.errors}"
    )
    if lat is not None and ex is not None:
        text += (
            f", latency p50 {lat.p50:.0f} max {lat.max:.0f} ms, excess wait p50 "
            f"{ex.p50:.1f} max {ex.max:.1f} ms"
        )
    text += (
        f", requests/call {r.per_call(r.requests):.1f}, redis cmds/call "
        f"{r.per_call(r.redis_cmds):.1f}, {r.wall_s:.1f} s"
    )
    if r.events:
        text += f"; events {r.events}"
    if r.failure:
        text += f"; FAILED: {r.failure}"
    if r.error_kinds:
        text += f"; errors: {r.error_kinds}"
    if r.hung_where:
        text += f"; hung at: {r.hung_where}"
    return text


def _ints(values: Sequence[float]) -> str:
    """Median, with [min-max] when the repetitions differ."""
    if not values:
        return "-"
    mid = median(values)
    shown = f"{mid:g}"
    if min(values) != max(values):
        shown += f" [{min(values):g}-{max(values):g}]"
    return shown


def _pcts(values: Sequence[Pct | None], digits: int = 0) -> str:
    got = [v for v in values if v is not None]
    if not got:
        return "-"
    return " / ".join(
        f"{median([getattr(v, q) for v in got]):.{digits}f}"
        for q in ("p50", "p99", "max")
    )


def _per_call(runs: Sequence[RunResult], total: Callable[[RunResult], float]) -> float:
    return median([r.per_call(total(r)) for r in runs])


def _top(runs: Sequence[RunResult], which: str, n: int = 4) -> str:
    """The *n* biggest entries of a per-name count, as a median per call."""
    names: Counter[str] = Counter()
    for r in runs:
        names.update(getattr(r, which))
    shown = []
    for name, _ in names.most_common(n):
        per = median([r.per_call(getattr(r, which).get(name, 0)) for r in runs])
        shown.append(f"{name} {per:.2f}")
    return ", ".join(shown) or "-"


def _group(
    runs: Iterable[RunResult],
) -> dict[tuple[str, str, int], list[RunResult]]:
    groups: dict[tuple[str, str, int], list[RunResult]] = {}
    for r in runs:
        groups.setdefault((r.shape, r.contender, r.subset), []).append(r)
    return groups


def targets(plan: Plan, runs: Sequence[RunResult]) -> list[tuple[str, str, str, bool]]:
    """Return (target, stampede_guard, stampede_guard_async, pass) rows."""
    groups = _group(runs)
    rows: list[tuple[str, str, str, bool]] = []
    main = [groups.get(("stampede", sg, plan.subset), []) for sg in SG]
    shown = [
        f"{max((r.excess_computations for r in g), default=-1)} excess, "
        f"{max((r.errors for r in g), default=-1)} errors"
        if g
        else "not run"
        for g in main
    ]
    ok = all(
        g and all(r.excess_computations == 0 and r.errors == 0 for r in g) for g in main
    )
    rows.append(
        (
            (
                f"stampede ({plan.processes}x{plan.callers}, S={plan.subset} of "
                f"{plan.n_ids}): every id computed once, no error, every repetition"
            ),
            shown[0],
            shown[1],
            bool(ok),
        )
    )
    if not plan.sweep:
        return rows
    lo, hi = min(plan.sweep), max(plan.sweep)
    cells: list[str] = []
    verdict = True
    for sg in SG:
        small = groups.get(("lone", sg, lo), [])
        big = groups.get(("lone", sg, hi), [])
        if not small or not big:
            cells.append("not run")
            verdict = False
            continue
        a = _per_call(small, lambda r: r.requests)
        b = _per_call(big, lambda r: r.requests)
        cells.append(f"{a:.1f} -> {b:.1f} ({b / a:.2f}x)")
        verdict = verdict and b <= 1.5 * a
    rows.append(
        (
            f"lone caller, cold: requests per call at S={hi} <= 1.5x those at S={lo}",
            cells[0],
            cells[1],
            verdict,
        )
    )
    return rows


def _named(name: str) -> Callable[[RunResult], float]:
    return lambda r: r.client_commands_by_name.get(name, 0)


def _main_tables(plan: Plan, runs: Sequence[RunResult]) -> list[str]:
    groups = _group(runs)
    main = [
        (c, groups[("stampede", c, plan.subset)])
        for c in CONTENDERS
        if ("stampede", c, plan.subset) in groups
    ]
    lines = [
        "",
        "## Work: computations",
        "",
        (
            "| contender | upstream calls | ids computed | needed (distinct ids asked) "
            "| excess computations | max computations of one id | errors |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {c} | {_ints([r.upstream_calls for r in g])} "
        f"| {_ints([r.ids_computed for r in g])} "
        f"| {_ints([r.ids_needed for r in g])} "
        f"| {_ints([r.excess_computations for r in g])} "
        f"| {_ints([r.max_per_id for r in g])} "
        f"| {_ints([r.errors for r in g])} |"
        for c, g in main
    ]
    lines += [
        "",
        "## Time (ms)",
        "",
        (
            "| contender | latency p50 / p99 / max | excess wait p50 / p99 / max "
            "| start spread | longest GC pause | run wall (s) |"
        ),
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {c} | {_pcts([r.latency_ms for r in g])} "
        f"| {_pcts([r.excess_wait_ms for r in g], 1)} "
        f"| {median([r.start_spread_ms for r in g]):.1f} "
        f"| {median([r.gc_longest_ms for r in g]):.1f} "
        f"| {median([r.wall_s for r in g]):.1f} |"
        for c, g in main
    ]
    lines += [
        "",
        "## Redis, per call",
        "",
        (
            "| contender | Redis commands (server) | requests (round trips) "
            "| client commands | top server commands | top requests "
            "| Redis CPU ms (total) |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {c} | {_per_call(g, lambda r: r.redis_cmds):.1f} "
        f"| {_per_call(g, lambda r: r.requests):.1f} "
        f"| {_per_call(g, lambda r: r.client_commands):.1f} "
        f"| {_top(g, 'cmds_by_name')} | {_top(g, 'requests_by_label')} "
        f"| {median([r.redis_cpu_ms for r in g]):.0f} |"
        for c, g in main
    ]
    return lines


def _sweep_table(plan: Plan, runs: Sequence[RunResult]) -> list[str]:
    groups = _group(runs)
    lines = [
        "",
        "## stampede_guard per call as S grows",
        "",
        (
            f"lone: 1 process, 1 caller, {plan.lone_rounds} calls in turn, each asking "
            f"S ids nobody asked (no contention). stampede: {plan.processes}x"
            f"{plan.callers} callers, S of {plan.n_ids} ids, as above. Requests and "
            "client commands are counted client-side (a script is one EVALSHA); server "
            "commands include those run inside scripts."
        ),
        "",
        (
            "| contender | shape | S | requests | client commands | EVALSHA | GET "
            "| MGET | server commands | upstream calls | excess computations | errors |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for shape in ("lone", "stampede"):
        for c in SG:
            for s in plan.sweep:
                subset = min(s, plan.n_ids) if shape == "stampede" else s
                g = groups.get((shape, c, subset), [])
                if not g:
                    continue
                lines.append(
                    f"| {c} | {shape} | {subset} "
                    f"| {_per_call(g, lambda r: r.requests):.2f} "
                    f"| {_per_call(g, lambda r: r.client_commands):.2f} "
                    f"| {_per_call(g, _named('EVALSHA')):.2f} "
                    f"| {_per_call(g, _named('GET')):.2f} "
                    f"| {_per_call(g, _named('MGET')):.2f} "
                    f"| {_per_call(g, lambda r: r.redis_cmds):.2f} "
                    f"| {_ints([r.upstream_calls for r in g])} "
                    f"| {_ints([r.excess_computations for r in g])} "
                    f"| {_ints([r.errors for r in g])} |"
                )
    return lines


def _note(r: RunResult) -> str | None:
    parts = [
        f"FAILED: {r.failure}" if r.failure else "",
        f"errors {r.error_kinds}" if r.error_kinds else "",
        f"hung {r.hung} at {r.hung_where}" if r.hung_where else "",
        f"{r.uncovered} ok calls with an id nobody computed" if r.uncovered else "",
        f"events {r.events}" if r.events and r.excess_computations else "",
    ]
    shown = "; ".join(p for p in parts if p)
    if not shown:
        return None
    return f"- {r.shape} S={r.subset} rep {r.rep} {r.contender}: {shown}"


def markdown(
    meta: Mapping[str, str],
    plan: Plan,
    runs: Sequence[RunResult],
    skipped: Mapping[str, str],
) -> str:
    """Return the header, the target checks and the tables, in Markdown."""
    lines = ["# Batch stampede benchmark", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in meta.items()]
    lines += [
        "",
        (
            f"Workload: {plan.processes} processes x {plan.callers} callers (threads "
            f"or tasks) = {plan.processes * plan.callers} callers released at once, "
            f"each asking a seeded random {plan.subset} of {plan.n_ids} ids; cold "
            f"cache; the upstream batch function sleeps {BASE_S * 1000:.0f} ms + "
            f"{PER_ID_S * 1000:.0f} ms per id. {plan.reps} repetition(s) per row, "
            "medians (counts: median [min-max] when they differ)."
        ),
        "",
        "## Targets (stampede_guard)",
        "",
        "| target | stampede_guard | stampede_guard_async | pass |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {a} | {b} | {'pass' if ok else 'FAIL'} |"
        for name, a, b, ok in targets(plan, runs)
    ]
    lines += _main_tables(plan, runs)
    lines += _sweep_table(plan, runs)
    lines += ["", "## Contenders", ""]
    lines += [f"- `{c.name}` ({c.kind}): {c.summary}" for c in CONTENDERS.values()]
    notes = [n for r in runs if (n := _note(r)) is not None]
    notes += [f"- {name}: skipped ({why})" for name, why in skipped.items()]
    if notes:
        lines += ["", "## Notes", "", *notes]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:  # noqa: C901, PLR0915 - one straight script
    """Measure; print Markdown; write JSON. Exit 1 if a stampede_guard target failed."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    parser.add_argument("--json", type=Path, default=None, help="also write JSON here")
    parser.add_argument("--processes", type=int, default=4, help="worker processes")
    parser.add_argument("--callers", type=int, default=25, help="callers per process")
    parser.add_argument("--ids", type=int, default=200, help="ids to choose from (N)")
    parser.add_argument("--subset", type=int, default=20, help="ids per call (S)")
    parser.add_argument(
        "--reps", type=int, default=None, help="repetitions (3; 1 quick)"
    )
    parser.add_argument(
        "--contenders",
        default=",".join(CONTENDERS),
        help="comma-separated subset of " + ",".join(CONTENDERS),
    )
    parser.add_argument(
        "--hang-after", type=float, default=None, help="hang bound, s (60; 30 quick)"
    )
    parser.add_argument("--no-sweep", action="store_true", help="skip the S sweep")
    parser.add_argument(
        "--events",
        action="store_true",
        help="diagnostic: count stampede_guard's metrics events (a metrics hook)",
    )
    args = parser.parse_args(argv)
    chosen = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in CONTENDERS]
    if unknown or args.subset < 1 or args.ids < args.subset or args.processes < 1:
        parser.error(f"bad arguments (unknown contenders: {unknown})")
    plan = Plan(
        reps=args.reps or (1 if args.quick else 3),
        processes=args.processes,
        callers=args.callers,
        n_ids=args.ids,
        subset=args.subset,
        hang_s=args.hang_after or (30.0 if args.quick else 60.0),
        lone_rounds=3 if args.quick else LONE_ROUNDS,
        sweep=() if args.no_sweep else SWEEP,
        events=args.events,
    )
    skipped = {c: why for c in chosen if (why := skip_reason(c)) is not None}
    chosen = [c for c in chosen if c not in skipped]
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    src_start = source_state()
    load_start = os.getloadavg()
    runs: list[RunResult] = []
    with RedisServer() as server:
        redis_version = server.version()
        progress(f"redis-server {redis_version} on {server.url} (private)")
        progress(f"stampede_guard: {src_start}")
        sg = [c for c in chosen if c in SG]
        jobs: list[list[tuple[str, Shape]]] = []
        for rep in range(plan.reps):
            shift = rep % max(1, len(chosen))
            order = chosen[shift:] + chosen[:shift]
            batch = [(c, plan.stampede(plan.subset)) for c in order]
            for s in plan.sweep:
                batch += [(c, plan.lone(s)) for c in sg]
                if s != plan.subset and s <= plan.n_ids:
                    batch += [(c, plan.stampede(s)) for c in sg]
            jobs.append(batch)
        total = sum(len(b) for b in jobs)
        done = 0
        for rep, batch in enumerate(jobs, start=1):
            for contender, shape in batch:
                r = run_once(contender, shape, rep, SEED + rep, server)
                runs.append(r)
                done += 1
                progress(_progress_line(r, done, total))
    elapsed = time.perf_counter() - t0
    src_end = source_state()
    if source_summary(src_start, src_end).startswith("CHANGED"):
        progress("warning: src/stampede_guard changed during the run")
    meta = report_header(
        "batch.py",
        started=started,
        elapsed=elapsed,
        redis_version=redis_version,
        src=(src_start, src_end),
        load=(load_start, os.getloadavg()),
        load_note="other processes share these cores",
    )
    RESULTS.mkdir(exist_ok=True)
    paths = [RESULTS / f"batch-{started.strftime('%Y%m%d-%H%M%S')}.json"]
    if args.json is not None:
        paths.append(args.json)
    data: dict[str, object] = {
        "meta": meta,
        "plan": dataclasses.asdict(plan),
        "upstream": {"base_s": BASE_S, "per_id_s": PER_ID_S},
        "runs": [dataclasses.asdict(r) for r in runs],
    }
    for path in paths:  # the raw figures first, whatever happens to the report
        path.write_text(json.dumps(data, indent=1))
    text = markdown(meta, plan, runs, skipped)
    sys.stdout.write(text)
    sys.stdout.flush()
    checks = targets(plan, runs)
    data["targets"] = [
        {"target": t, "stampede_guard": a, "stampede_guard_async": b, "pass": ok}
        for t, a, b, ok in checks
    ]
    data["markdown"] = text
    for path in paths:
        path.write_text(json.dumps(data, indent=1))
    progress(f"done in {elapsed:.0f} s; JSON in {', '.join(map(str, paths))}")
    return 0 if all(ok for *_, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
