"""Spread a run of the demo over several OS processes that share one Redis.

The parent keeps the weather API (so the count of API calls stays the server's own)
and starts one worker process per share of the requests. Each worker builds its own
`RedisBackend`, parks its threads and says it is ready; once all are, the parent
releases them together. Each worker sends back its records and its `StampedeStats`
counters as plain tuples and dicts (nothing else crosses the process boundary), and
the parent adds them up.

A helper of ``demo_stampede_prevention.py``; it has no command line of its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import queue
import time
import traceback
from collections.abc import Callable
from multiprocessing.queues import Queue
from typing import Any, Protocol, cast

from demo_load import (
    SPARE_FILES,
    START_TIMEOUT,
    Gate,
    Load,
    Record,
    RunResult,
    Share,
    by_index,
    close_redis,
    open_files_limit,
    redis_backend,
    run_share,
    tuned_for_many_threads,
)

from stampede_guard import RedisBackend, StatsSnapshot

__all__ = ["run_in_processes"]

# Messages from a worker process: ("ready", process, None), ("done", process, payload)
# or ("error", process, traceback). Only plain tuples, dicts and str cross processes.
_Message = tuple[str, int, Any]


class SharedInt(Protocol):
    """A ``multiprocessing.Value`` of an integer type."""

    value: int

    def get_lock(self) -> contextlib.AbstractContextManager[Any]: ...


def _shares(load: Load) -> list[Share]:
    """Give each process a run of consecutive requests (all cities) and its threads."""
    shares = []
    for process in range(load.processes):
        first = load.requests * process // load.processes
        last = load.requests * (process + 1) // load.processes
        threads = load.threads * (process + 1) // load.processes - (
            load.threads * process // load.processes
        )
        indexes = tuple(range(first, last))
        shares.append(Share(load, indexes, min(threads, len(indexes)), process + 1))
    return [share for share in shares if share.indexes and share.threads]


def _worker(
    share: Share,
    redis_url: str,
    messages: Queue[_Message],
    go: Gate,
    progress: SharedInt,
) -> None:
    """Run one share in a worker process against the Redis at *redis_url*."""
    backend: RedisBackend | None = None
    try:
        _check_open_files(share.threads + SPARE_FILES)  # an HTTP connection a thread
        with tuned_for_many_threads():
            backend = redis_backend(redis_url)

            def done_one() -> None:
                with progress.get_lock():
                    progress.value += 1

            def ready() -> None:
                messages.put(("ready", share.process, None))

            records, stats = run_share(
                share, backend, ready=ready, go=go, done_one=done_one
            )
        payload = {
            "stats": None if stats is None else dataclasses.asdict(stats),
            "records": [dataclasses.astuple(record) for record in records],
        }
        messages.put(("done", share.process, payload))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
        messages.put(("error", share.process, traceback.format_exc()))
    finally:
        if backend is not None:
            close_redis(backend)


def _check_open_files(needed: int) -> None:
    limit = open_files_limit(needed)
    if limit is not None and limit < needed:
        msg = f"this worker needs {needed} open files (ulimit -n), and may open {limit}"
        raise RuntimeError(msg)


def run_in_processes(
    load: Load, redis_url: str, on_progress: Callable[[int], None]
) -> RunResult:
    """Make the run's requests from ``load.processes`` worker processes sharing Redis.

    Each worker builds its own `RedisBackend`, parks its threads and reports ready;
    once every worker is ready, all are released at once. Each sends back its
    records and its `StampedeStats` counters as plain tuples and dicts, which are
    added up here. *on_progress* is called as in `run_in_process`.
    """
    ctx = multiprocessing.get_context("spawn")  # fork and threads do not mix
    messages: Queue[_Message] = ctx.Queue()
    go = ctx.Event()
    progress = cast("SharedInt", ctx.Value("q", 0))
    shares = _shares(load)
    workers = {
        share.process: ctx.Process(
            target=_worker,
            args=(share, redis_url, messages, go, progress),
            name=f"demo-worker-{share.process}",
            daemon=True,
        )
        for share in shares
    }
    try:
        for worker in workers.values():
            worker.start()
        _collect(messages, workers, "ready", deadline=time.monotonic() + START_TIMEOUT)
        go.set()
        payloads = _collect(
            messages, workers, "done", on_wait=lambda: on_progress(progress.value)
        )
        on_progress(progress.value)
    finally:
        go.set()  # never leave a worker parked
        for worker in workers.values():
            worker.join(5)
            if worker.is_alive():
                worker.terminate()
                worker.join()
    records: list[Record] = []
    snapshots: list[StatsSnapshot] = []
    for payload in payloads:
        records.extend(Record(*fields) for fields in payload["records"])
        if payload["stats"] is not None:
            snapshots.append(StatsSnapshot(**payload["stats"]))
    return RunResult(
        load, tuple(sorted(records, key=by_index)), _add_up(snapshots, load)
    )


def _collect(
    messages: Queue[_Message],
    workers: dict[int, Any],
    kind: str,
    *,
    deadline: float | None = None,
    on_wait: Callable[[], None] | None = None,
) -> list[Any]:
    """Return one *kind* message's payload per worker; raise if one fails or dies.

    *workers* maps each worker's process number to its `multiprocessing.Process`.
    """
    payloads: dict[int, Any] = {}
    while len(payloads) < len(workers):
        try:
            got, process, payload = messages.get(timeout=0.1)
        except queue.Empty:
            if on_wait is not None:
                on_wait()
            _check_alive(messages, workers, payloads, deadline)
            continue
        if got == "error":
            msg = f"worker process {process} failed:\n{payload}"
            raise RuntimeError(msg)
        if got == kind:
            payloads[process] = payload
    return [payloads[process] for process in sorted(payloads)]


def _check_alive(
    messages: Queue[_Message],
    workers: dict[int, Any],
    payloads: dict[int, Any],
    deadline: float | None,
) -> None:
    """Raise if a worker that has not reported has died, or if time is up."""
    dead = [
        f"worker {n} (exit code {w.exitcode})"
        for n, w in workers.items()
        if n not in payloads and w.exitcode is not None
    ]
    if dead and messages.empty():
        time.sleep(1.0)  # its last message may still be in the pipe
    if dead and messages.empty():
        msg = f"{', '.join(dead)} ended without reporting"
        raise RuntimeError(msg)
    if deadline is not None and time.monotonic() > deadline:
        msg = f"the worker processes were not ready within {START_TIMEOUT} s"
        raise RuntimeError(msg)


def _add_up(snapshots: list[StatsSnapshot], load: Load) -> StatsSnapshot | None:
    """Return the sum of the processes' counters (None for an unprotected run)."""
    if not load.protected:
        return None
    totals: dict[str, Any] = {
        f.name: sum(getattr(s, f.name) for s in snapshots)
        for f in dataclasses.fields(StatsSnapshot)
    }
    return StatsSnapshot(**totals)
