"""What every part of the harness shares: the cached value, records, statistics, clocks.

Nothing here talks to Redis except `RoundTrips`, which counts the requests redis-py
writes in this process. `GcPauses` times the garbage collector, whose pauses land in
whichever peer happens to be running when a burst of allocations triggers one.
`run_in_child` runs one measurement in a spawned process; `report_header` is the
table of when, where and what that opens every script's report.
"""

from __future__ import annotations

import gc
import itertools
import math
import multiprocessing as mp
import os
import platform
import queue
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from multiprocessing.queues import Queue as MpQueue
from typing import Any

import redis.asyncio.connection
import redis.connection

__all__ = [
    "CallRecord",
    "Clock",
    "Computation",
    "GcPauses",
    "Pct",
    "RoundTrips",
    "describe",
    "library_versions",
    "make_value",
    "median",
    "pct",
    "report_header",
    "run_in_child",
    "source_summary",
    "value_key",
]

TTL_S = 900
LOCK_TIMEOUT_S = 10
POOL_MAX = 2048
# Callers still waiting at compute_s + this are recorded as hung (the environment
# variable is for testing the harness itself).
HANG_AFTER_S = float(os.environ.get("SG_BENCH_HANG_AFTER_S", "30"))


def value_key(k: str) -> str:
    """Return the Redis key the hand-written peers store the value of *k* under."""
    return f"bench:{k}"


def make_value(k: str) -> dict[str, object]:
    """Return what the cached function computes for *k*: a dict of about 300 bytes JSON."""
    return {
        "key": k,
        "city": "Oslo",
        "temp_c": 21.5,
        "conditions": ["clear", "light wind"],
        "source": "stampede_guard benchmark",
        "payload": "x" * 180,
    }


@dataclass(frozen=True, slots=True)
class CallRecord:
    """One caller: when it started and returned (wall-aligned seconds), and how."""

    key: str
    start: float
    end: float
    outcome: str  # "ok", "wrong value", or "ExceptionType: message"


@dataclass(frozen=True, slots=True)
class Computation:
    """One run of the cached function (wall-aligned seconds)."""

    key: str
    start: float
    end: float


class Clock:
    """perf_counter precision, aligned to the wall clock at one moment.

    Within a process, intervals come from ``time.perf_counter``. To compare moments
    across processes of this machine, each process maps its perf_counter onto
    ``time.time`` read once, at the release of its callers.
    """

    def __init__(self) -> None:
        self.pc0 = time.perf_counter()
        self.wall0 = time.time()

    def wall(self, pc: float) -> float:
        """Return the wall-clock time of perf_counter reading *pc*."""
        return self.wall0 + (pc - self.pc0)


class RoundTrips:
    """Count the requests redis-py writes in this process (sync and asyncio clients).

    Each ``send_packed_command`` is one request on the wire: a command, a pipeline, or
    a health-check PING. Installed once per process; `read` is for the harness thread.
    """

    _counter = itertools.count()
    _reads = 0
    _installed = False

    @classmethod
    def install(cls) -> None:
        """Wrap redis-py's send_packed_command (sync and asyncio) to count requests."""
        if cls._installed:
            return
        cls._installed = True
        tick = cls._counter.__next__
        sync_cls: Any = redis.connection.AbstractConnection
        sync_send: Callable[..., Any] = sync_cls.send_packed_command

        def send(self: object, *args: Any, **kwargs: Any) -> Any:
            tick()
            return sync_send(self, *args, **kwargs)

        sync_cls.send_packed_command = send

        async_cls: Any = redis.asyncio.connection.AbstractConnection
        async_send: Callable[..., Any] = async_cls.send_packed_command

        async def asend(self: object, *args: Any, **kwargs: Any) -> Any:
            tick()
            return await async_send(self, *args, **kwargs)

        async_cls.send_packed_command = asend

    @classmethod
    def read(cls) -> int:
        """Return the requests counted so far (reading costs no request)."""
        # next() is atomic under the GIL; subtract our own reads.
        value = next(cls._counter) - cls._reads
        cls._reads += 1
        return value


class GcPauses:
    """The longest garbage-collector pause of this process since `reset`, in ms."""

    _started = 0.0
    _longest_s = 0.0
    _installed = False

    @classmethod
    def install(cls) -> None:
        """Time every collection from now on (once per process)."""
        if cls._installed:
            return
        cls._installed = True

        def timed(phase: str, _info: dict[str, int]) -> None:
            if phase == "start":
                cls._started = time.perf_counter()
            else:
                cls._longest_s = max(cls._longest_s, time.perf_counter() - cls._started)

        gc.callbacks.append(timed)

    @staticmethod
    def settle() -> None:
        """Collect, then freeze, what start-up left (before the callers are released).

        A freshly started process owes a full collection of everything its imports
        made; left alone, it falls at the same allocation count on every repetition,
        inside the measured burst of whichever peer is running. A server that has been
        up for a while paid it long ago. Frozen objects are no longer scanned, so
        what remains is the collector's work on what the burst itself allocates.
        """
        gc.collect()
        gc.freeze()

    @classmethod
    def reset(cls) -> None:
        """Forget the pauses so far (at the start of the measured part)."""
        cls._longest_s = 0.0

    @classmethod
    def longest_ms(cls) -> float:
        """Return the longest pause since `reset`."""
        return cls._longest_s * 1000


@dataclass(frozen=True, slots=True)
class Pct:
    """p50, p99 and max of a sample, in milliseconds."""

    p50: float
    p99: float
    max: float


def pct(values_s: Sequence[float]) -> Pct | None:
    """Return p50/p99/max (nearest rank) of *values_s* seconds, in ms; None if empty."""
    if not values_s:
        return None
    ordered = sorted(values_s)

    def rank(q: float) -> float:
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)] * 1000

    return Pct(p50=rank(0.5), p99=rank(0.99), max=ordered[-1] * 1000)


def median(values: Sequence[float]) -> float:
    """Return the median of *values* (NaN for none)."""
    return statistics.median(values) if values else math.nan


@dataclass(slots=True)
class WorkerReport:
    """What one worker process of a stampede reports back."""

    index: int
    starts: list[float] = field(default_factory=list)  # every released caller's
    calls: list[CallRecord] = field(default_factory=list)
    computations: list[Computation] = field(default_factory=list)
    hung: int = 0
    hung_where: dict[str, int] = field(default_factory=dict)
    round_trips: int = 0
    release_spread_s: float = 0.0
    gc_longest_ms: float = 0.0


def describe(exc: BaseException) -> str:
    """Return 'Type: message', with the cause's, if any (BackendError wraps redis')."""
    text = f"{type(exc).__name__}: {exc}"
    cause = exc.__cause__ or exc.__context__
    if cause is not None:
        text += f" (from {type(cause).__name__}: {cause})"
    return text[:300]


def _child(
    measure: Callable[..., object], args: tuple[object, ...], out: MpQueue[object]
) -> None:
    RoundTrips.install()
    try:
        out.put(measure(*args))
    except BaseException as exc:  # noqa: BLE001 - reported to the coordinator
        out.put(f"{describe(exc)}\n{traceback.format_exc()}")
    finally:
        out.close()
        out.join_thread()
        os._exit(0)


def run_in_child(
    measure: Callable[..., object], *args: object, timeout_s: float
) -> object:
    """Run ``measure(*args)`` in a spawned process that counts its round trips.

    Args:
        measure: a module-level function (the child imports it by name).
        *args: its arguments (pickled).
        timeout_s: how long to wait for its result; then the process is killed.

    Returns:
        What *measure* returned, or a text: the exception it raised (its first
        line 'Type: message', then the traceback), or that none came in time.
    """
    ctx = mp.get_context("spawn")
    out: MpQueue[object] = ctx.Queue()
    proc = ctx.Process(target=_child, args=(measure, args, out), daemon=True)
    proc.start()
    try:
        return out.get(timeout=timeout_s)
    except queue.Empty:
        return f"no result within {timeout_s:.0f} s"
    finally:
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5)
        out.close()


def library_versions() -> dict[str, str]:
    """Return the installed versions of redis-py, hiredis and every peer library."""
    found: dict[str, str] = {}
    for dist in (
        "stampede-guard",
        "redis",
        "hiredis",
        "dogpile.cache",
        "python-redis-lock",
        "cashews",
        "aiocache",
        "cachetools",
        "tenacity",
    ):
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            found[dist] = "not installed"
    return found


def source_summary(start: str, end: str) -> str:
    """Say what was measured: one source, or a source that changed during the run.

    *start* and *end* are ``run.source_state()`` at the start and at the end; the
    text starts with "CHANGED" only if src/stampede_guard itself changed.
    """
    if start == end:
        return start
    digest = "src digest "
    if digest in start and start.rsplit(digest, 1)[1] == end.rsplit(digest, 1)[1]:
        # Only HEAD moved (commits elsewhere): src/stampede_guard is byte-identical.
        return f"{start} (src/stampede_guard unchanged to the end; HEAD then: {end})"
    return f"CHANGED DURING THE RUN: {start} at the start, {end} at the end"


_LOAD_SPANS = {1: "1 min", 3: "1 / 5 / 15 min"}


def report_header(
    script: str,
    *,
    started: datetime,
    elapsed: float,
    redis_version: str,
    src: tuple[str, str],
    load: tuple[Sequence[float], Sequence[float]] | None = None,
    load_note: str = "",
    **extra: str,
) -> dict[str, str]:
    """Return a report's header: when, where, what, and how busy the machine was.

    Args:
        script: the script's file name in benchmarks/, for the command line.
        started: when the run started (UTC).
        elapsed: how long it took, in seconds.
        redis_version: the private redis-server's version.
        src: ``run.source_state()`` at the start and at the end.
        load: ``os.getloadavg()`` at the start and at the end, whole or its first
            (1 min) figure only; None leaves the load average out.
        load_note: said after the load average, in parentheses.
        **extra: further lines the script adds, in this order, after the rest.

    Returns:
        The header's lines, label to text, in the order they are shown.
    """
    uname = platform.uname()
    meta = {
        "date": started.strftime("%Y-%m-%d %H:%M:%S UTC"),
        "duration": f"{elapsed:.0f} s",
        "command": " ".join(
            [f"uv run --group bench benchmarks/{script}", *sys.argv[1:]]
        ),
        "machine": f"{uname.machine}, {os.cpu_count()} cores, {uname.system} {uname.release}",
    }
    if load is not None:
        at_start, at_end = (" / ".join(f"{v:.2f}" for v in figures) for figures in load)
        note = f" ({load_note})" if load_note else ""
        meta[f"load average ({_LOAD_SPANS[len(load[0])]})"] = (
            f"{at_start} at the start, {at_end} at the end{note}"
        )
    switch_ms = sys.getswitchinterval() * 1000
    meta |= {
        "Python": f"{platform.python_version()} (GIL switch interval {switch_ms:g} ms)",
        "redis-server": f"{redis_version} (private, 127.0.0.1, --save '' --appendonly no)",
        "libraries": ", ".join(f"{k} {v}" for k, v in library_versions().items()),
        "stampede_guard source": source_summary(*src),
    }
    return meta | extra
