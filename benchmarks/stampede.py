"""Stampede scenarios: many callers, cold keys, spawned worker processes.

One measurement ("run") = one peer, one shape, one repetition:

1. The coordinator flushes Redis and spawns ``processes`` workers (multiprocessing
   spawn). Each builds the peer, makes one warm-up call on a key of its own (so Lua
   scripts are loaded and lazy set-up is done, as in a process that has served
   traffic before), opens as many pooled connections as it has callers, starts its
   callers (threads for sync peers, asyncio tasks for async ones), and waits until
   every caller is parked at a gate. Then it reports "ready".
2. With every worker ready, the coordinator runs CONFIG RESETSTAT, reads the server's
   CPU time, and sets one multiprocessing Event. Each worker opens its gate and every
   caller calls the peer once: caller *i* asks for key ``k<i mod keys>``.
3. Each worker reports every call (start, end, outcome) and every computation (key,
   start, end), on a clock aligned to ``time.time`` (see `common.Clock`). Callers
   still waiting at ``compute_s + 30 s`` are recorded as hung, with where they wait.
4. The coordinator reads INFO commandstats and CPU, joins the workers (killing any
   that do not exit), and turns the reports into one `RunResult`.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import queue
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.context import SpawnProcess
from multiprocessing.queues import Queue as MpQueue
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Literal, NoReturn

import redis

from common import (
    HANG_AFTER_S,
    CallRecord,
    Clock,
    Computation,
    GcPauses,
    Pct,
    RoundTrips,
    WorkerReport,
    describe,
    make_value,
    pct,
)
from peers import PEERS, SyncPeer, make_async_peer, make_sync_peer
from redis_server import command_stats, cpu_seconds

__all__ = ["RunResult", "Shape", "StampedeJob", "run_stampede"]

READY_TIMEOUT_S = 90.0  # spawning and parking 1,000 threads on 2 cores
REPORT_GRACE_S = 20.0  # after a worker's own deadline
JOIN_TIMEOUT_S = 5.0

Message = tuple[Literal["ready", "report", "error"], int, object]


@dataclass(frozen=True, slots=True)
class Shape:
    """Who calls: *processes* x *callers* (threads or tasks) over *keys* cold keys."""

    scenario: str
    processes: int
    callers: int  # per process
    keys: int
    compute_s: float

    @property
    def total(self) -> int:
        """Return the number of callers over all processes."""
        return self.processes * self.callers

    def label(self) -> str:
        """Return e.g. ``4x50`` or ``1000``."""
        who = (
            f"{self.processes}x{self.callers}"
            if self.processes > 1
            else f"{self.callers}"
        )
        return who if self.keys == 1 else f"{who} ({self.keys} keys)"


@dataclass(frozen=True, slots=True)
class StampedeJob:
    """What one worker process does (pickled to the spawned child)."""

    peer: str
    url: str
    index: int
    callers: int
    keys: int
    compute_s: float


@dataclass(slots=True)
class RunResult:
    """One peer, one shape, one repetition."""

    scenario: str
    peer: str
    rep: int
    compute_s: float
    processes: int
    callers: int
    keys: int
    computations: int = 0
    computations_max_per_key: int = 0
    excess_ms: Pct | None = None
    lat_cs_ms: Pct | None = None
    start_spread_ms: float = 0.0
    gc_longest_ms: float = 0.0  # the longest collector pause in any of its processes
    errors: int = 0
    hung: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    hung_where: dict[str, int] = field(default_factory=dict)
    redis_cmds: int = 0
    cmds_by_name: dict[str, int] = field(default_factory=dict)
    round_trips: int = 0
    round_trips_max_per_process: int = 0
    redis_cpu_ms: float = 0.0
    wall_s: float = 0.0
    failure: str | None = None  # the run itself failed (a worker crashed or hung)


# --- worker side ----------------------------------------------------------------


def _outcome(k: str, result: object) -> str:
    return "ok" if result == make_value(k) else "wrong value"


def _where(frames: list[traceback.FrameSummary]) -> str:
    """Summarize where a hung caller waits: its innermost frames outside this file."""
    harness = {"stampede.py", "common.py"}
    inner = [f for f in frames if Path(f.filename).name not in harness][-3:]
    return " < ".join(
        f"{Path(f.filename).parent.name}/{Path(f.filename).name}:{f.lineno} {f.name}"
        for f in reversed(inner)
    )


def worker_main(job: StampedeJob, results: MpQueue[Message], go: MpEvent) -> None:
    """Entry point of a spawned worker: run the job, report, exit hard.

    The report is sent from inside the job, which then ends the process at once
    (`_exit`): neither hung threads nor hung tasks (which ``asyncio.run`` would wait
    for while cancelling them) can keep a worker alive.
    """
    RoundTrips.install()
    GcPauses.install()
    try:
        if PEERS[job.peer].kind == "sync":
            _exit(results, _threads(job, results, go))
        else:
            asyncio.run(_tasks(job, results, go))
    except BaseException as exc:  # noqa: BLE001 - reported to the coordinator
        results.put(("error", job.index, f"{describe(exc)}\n{traceback.format_exc()}"))
    _exit(results, None)


def _exit(results: MpQueue[Message], report: WorkerReport | None) -> NoReturn:
    """Send *report* (if any), flush the queue and end this process now."""
    if report is not None:
        results.put(("report", report.index, report))
    results.close()
    results.join_thread()
    os._exit(0)


def _threads(job: StampedeJob, results: MpQueue[Message], go: MpEvent) -> WorkerReport:
    comps: list[tuple[str, float, float]] = []
    warming = True

    def compute(k: str) -> dict[str, object]:
        if warming:
            return make_value(k)
        t0 = time.perf_counter()
        time.sleep(job.compute_s)
        comps.append((k, t0, time.perf_counter()))
        return make_value(k)

    peer = make_sync_peer(job.peer, job.url, compute)
    warm_key = f"warmup-{job.index}"
    if _outcome(warm_key, peer.call(warm_key)) != "ok":
        msg = "warm-up call returned a wrong value"
        raise RuntimeError(msg)
    warming = False
    peer.prewarm(job.callers)

    callers = _ThreadCallers(job, peer)
    callers.parked.wait(timeout=READY_TIMEOUT_S)
    GcPauses.settle()
    results.put(("ready", job.index, None))
    if not go.wait(timeout=READY_TIMEOUT_S):
        msg = "never released"
        raise RuntimeError(msg)
    clock = Clock()
    rt0 = RoundTrips.read()
    GcPauses.reset()
    callers.gate.set()
    callers.all_done.wait(timeout=job.compute_s + HANG_AFTER_S)
    rt1 = RoundTrips.read()
    calls, hung, where = callers.collect()
    return WorkerReport(
        index=job.index,
        starts=[clock.wall(t) for t in callers.starts if t is not None],
        calls=[CallRecord(k, clock.wall(s), clock.wall(e), o) for k, s, e, o in calls],
        computations=[
            Computation(k, clock.wall(s), clock.wall(e)) for k, s, e in comps
        ],
        hung=hung,
        hung_where=where,
        round_trips=rt1 - rt0,
        gc_longest_ms=GcPauses.longest_ms(),
    )


class _ThreadCallers:
    """*job.callers* threads parked at a gate, each calling the peer once."""

    def __init__(self, job: StampedeJob, peer: SyncPeer) -> None:
        self.job, self.peer = job, peer
        self.parked = threading.Barrier(job.callers + 1)
        self.gate = threading.Event()
        self.all_done = threading.Event()
        self.records: list[tuple[str, float, float, str]] = []
        self.lock = threading.Lock()
        self.done = [False] * job.callers
        self.starts: list[float | None] = [None] * job.callers
        self.remaining = job.callers
        self.threads = [
            threading.Thread(target=self.call, args=(i,), daemon=True)
            for i in range(job.callers)
        ]
        for t in self.threads:
            t.start()

    def call(self, i: int) -> None:
        k = f"k{i % self.job.keys}"
        self.parked.wait()
        self.gate.wait()
        start = self.starts[i] = time.perf_counter()
        try:
            outcome = _outcome(k, self.peer.call(k))
        except Exception as exc:  # noqa: BLE001 - recorded as the caller's outcome
            outcome = describe(exc)
        end = time.perf_counter()
        with self.lock:
            self.records.append((k, start, end, outcome))
            self.done[i] = True
            self.remaining -= 1
            if self.remaining == 0:
                self.all_done.set()

    def collect(
        self,
    ) -> tuple[list[tuple[str, float, float, str]], int, dict[str, int]]:
        """Return the finished calls, the number of hung callers and where they wait."""
        frames = sys._current_frames()  # noqa: SLF001 - where hung callers are stuck
        with self.lock:
            hung = [t for i, t in enumerate(self.threads) if not self.done[i]]
            calls = list(self.records)
        where: Counter[str] = Counter()
        for t in hung:
            frame = frames.get(t.ident) if t.ident is not None else None
            if frame is not None:
                where[_where(traceback.extract_stack(frame))] += 1
        return calls, len(hung), dict(where.most_common(3))


async def _tasks(job: StampedeJob, results: MpQueue[Message], go: MpEvent) -> None:
    comps: list[tuple[str, float, float]] = []
    warming = True

    async def compute(k: str) -> dict[str, object]:
        if warming:
            return make_value(k)
        t0 = time.perf_counter()
        await asyncio.sleep(job.compute_s)
        comps.append((k, t0, time.perf_counter()))
        return make_value(k)

    peer = make_async_peer(job.peer, job.url, compute)
    await peer.prewarm(job.callers)
    warm_key = f"warmup-{job.index}"
    if _outcome(warm_key, await peer.call(warm_key)) != "ok":
        msg = "warm-up call returned a wrong value"
        raise RuntimeError(msg)
    warming = False

    gate = asyncio.Event()
    all_parked = asyncio.Event()
    parked = [0]
    records: list[tuple[str, float, float, str]] = []
    starts: list[float] = []

    async def caller(i: int) -> None:
        k = f"k{i % job.keys}"
        parked[0] += 1
        if parked[0] == job.callers:
            all_parked.set()
        await gate.wait()
        start = time.perf_counter()
        starts.append(start)
        try:
            outcome = _outcome(k, await peer.call(k))
        except Exception as exc:  # noqa: BLE001 - recorded as the caller's outcome
            outcome = describe(exc)
        records.append((k, start, time.perf_counter(), outcome))

    tasks = [asyncio.create_task(caller(i)) for i in range(job.callers)]
    await asyncio.wait_for(all_parked.wait(), READY_TIMEOUT_S)
    GcPauses.settle()
    results.put(("ready", job.index, None))
    loop = asyncio.get_running_loop()
    if not await loop.run_in_executor(None, go.wait, READY_TIMEOUT_S):
        msg = "never released"
        raise RuntimeError(msg)
    clock = Clock()
    rt0 = RoundTrips.read()
    GcPauses.reset()
    gate.set()
    _done, pending = await asyncio.wait(tasks, timeout=job.compute_s + HANG_AFTER_S)
    rt1 = RoundTrips.read()
    where: Counter[str] = Counter()
    for task in pending:
        where[_where(_awaiting(task))] += 1
    _exit(
        results,
        WorkerReport(
            index=job.index,
            starts=[clock.wall(t) for t in starts],
            calls=[
                CallRecord(k, clock.wall(s), clock.wall(e), o) for k, s, e, o in records
            ],
            computations=[
                Computation(k, clock.wall(s), clock.wall(e)) for k, s, e in comps
            ],
            hung=len(pending),
            hung_where=dict(where.most_common(3)),
            round_trips=rt1 - rt0,
            gc_longest_ms=GcPauses.longest_ms(),
        ),
    )


def _awaiting(task: asyncio.Task[None]) -> list[traceback.FrameSummary]:
    """Return the frames of *task*'s chain of awaiting coroutines, outermost first."""
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


# --- coordinator side -------------------------------------------------------------


def _kill(procs: list[SpawnProcess]) -> None:
    for p in procs:
        p.join(timeout=JOIN_TIMEOUT_S if p.is_alive() else 0.1)
        if p.is_alive():
            p.kill()
            p.join(timeout=JOIN_TIMEOUT_S)


def summarize(
    result: RunResult, reports: list[WorkerReport], compute_s: float
) -> RunResult:
    """Fill *result*'s caller metrics from the workers' reports."""
    first_end: dict[str, float] = {}
    per_key: Counter[str] = Counter()
    for rep in reports:
        for comp in rep.computations:
            per_key[comp.key] += 1
            first_end[comp.key] = min(first_end.get(comp.key, comp.end), comp.end)
    calls = [c for rep in reports for c in rep.calls]
    ok = [c for c in calls if c.outcome == "ok"]
    excess: list[float] = []
    lat_cs: list[float] = []
    for c in ok:
        ideal_ready = max(c.start, first_end.get(c.key, c.start + compute_s))
        ideal = min(c.start + compute_s, ideal_ready)
        excess.append(c.end - ideal)
        lat_cs.append(c.end - c.start - compute_s)
    starts = [t for rep in reports for t in rep.starts]
    kinds = Counter(c.outcome for c in calls if c.outcome != "ok")
    hung = sum(r.hung for r in reports)
    where: Counter[str] = Counter()
    for r in reports:
        where.update(r.hung_where)
    result.computations = sum(per_key.values())
    result.computations_max_per_key = max(per_key.values(), default=0)
    result.excess_ms = pct(excess)
    result.lat_cs_ms = pct(lat_cs)
    result.start_spread_ms = (max(starts) - min(starts)) * 1000 if starts else 0.0
    result.gc_longest_ms = max((r.gc_longest_ms for r in reports), default=0.0)
    result.hung = hung
    result.errors = len(calls) - len(ok) + hung
    result.error_kinds = dict(kinds.most_common(3))
    result.hung_where = dict(where.most_common(3))
    result.round_trips = sum(r.round_trips for r in reports)
    result.round_trips_max_per_process = max(
        (r.round_trips for r in reports), default=0
    )
    return result


def run_stampede(
    peer: str, shape: Shape, rep: int, url: str, admin: redis.Redis
) -> RunResult:
    """Run one stampede of *peer* in *shape* and return what it measured."""
    started = time.perf_counter()
    result = RunResult(
        scenario=shape.scenario,
        peer=peer,
        rep=rep,
        compute_s=shape.compute_s,
        processes=shape.processes,
        callers=shape.total,
        keys=shape.keys,
    )
    ctx = mp.get_context("spawn")
    results: MpQueue[Message] = ctx.Queue()
    go = ctx.Event()
    admin.flushall()
    procs = [
        ctx.Process(
            target=worker_main,
            args=(
                StampedeJob(peer, url, i, shape.callers, shape.keys, shape.compute_s),
                results,
                go,
            ),
            daemon=True,
            name=f"bench-{peer}-{i}",
        )
        for i in range(shape.processes)
    ]
    for p in procs:
        p.start()
    reports: list[WorkerReport] = []
    try:
        failure = _await(results, procs, "ready", READY_TIMEOUT_S, [])
        if failure is None:
            admin.config_resetstat()
            cpu0 = cpu_seconds(admin)
            go.set()
            deadline = shape.compute_s + HANG_AFTER_S + REPORT_GRACE_S
            failure = _await(results, procs, "report", deadline, reports)
            _kill(procs)  # hung callers die with their process before we count
            stats = command_stats(admin)
            result.redis_cpu_ms = (cpu_seconds(admin) - cpu0) * 1000
            result.cmds_by_name = dict(sorted(stats.items(), key=lambda kv: -kv[1]))
            result.redis_cmds = sum(stats.values())
        result.failure = failure
        summarize(result, reports, shape.compute_s)
        if failure is not None:
            missing = shape.processes - len(reports)
            result.errors += missing * shape.callers
    finally:
        _kill(procs)
        results.close()
    result.wall_s = time.perf_counter() - started
    return result


def _await(
    results: MpQueue[Message],
    procs: list[SpawnProcess],
    what: Literal["ready", "report"],
    timeout_s: float,
    reports: list[WorkerReport],
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
            return f"worker {index}: {str(payload).splitlines()[0]}"
        if kind == what:
            pending.discard(index)
            if isinstance(payload, WorkerReport):
                reports.append(payload)
    return None


ProgressFn = Callable[[RunResult], None]
