"""Several OS processes, many threads each, one cold key on a real Redis: one computation."""

from __future__ import annotations

import multiprocessing
import queue
import time
from collections.abc import Iterator
from multiprocessing.context import SpawnProcess
from multiprocessing.queues import Queue
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pytest
import redis

if TYPE_CHECKING:
    from _workers import Report

PROCESSES = 4
THREADS = 50
DEADLINE = 45.0  # seconds for the whole stampede, spawning included

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(60)]


@pytest.fixture
def workers(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Return the `_workers` module, importable by spawned children too."""
    # Spawned children start with the parent's sys.path, so they find it as well.
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    import _workers

    return _workers


def _drain(
    channel: Queue[Any],
    processes: list[SpawnProcess],
    deadline: float,
) -> Iterator[Any]:
    """Yield one message per process, stopping early if they all died or time ran out."""
    for _ in processes:
        while True:
            try:
                yield channel.get(timeout=0.2)
                break
            except queue.Empty:
                if time.monotonic() > deadline or not any(
                    p.is_alive() for p in processes
                ):
                    return


def run_stampede(
    workers: ModuleType, url: str, prefix: str, *, fail_first: bool, tasks: bool = False
) -> list[Report]:
    """Start the worker processes, release all their threads at once, return reports."""
    ctx = multiprocessing.get_context("spawn")
    ready: Queue[int] = ctx.Queue()
    reports: Queue[Report] = ctx.Queue()
    go = ctx.Event()
    processes = [
        ctx.Process(
            target=workers.stampede,
            args=(
                workers.Job(url, prefix, THREADS, fail_first, tasks, PROCESSES),
                ready,
                go,
                reports,
            ),
        )
        for _ in range(PROCESSES)
    ]
    deadline = time.monotonic() + DEADLINE
    try:
        for process in processes:
            process.start()
        started = list(_drain(ready, processes, deadline))
        assert len(started) == PROCESSES, "not every worker got its threads waiting"
        go.set()  # 200 threads in 4 processes call at once
        collected: list[Report] = list(_drain(reports, processes, deadline))
    finally:
        go.set()  # never leave a worker waiting
        for process in processes:
            process.join(max(0.1, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(5)
    assert [p.exitcode for p in processes] == [0] * PROCESSES
    return collected


def _split(reports: list[Report]) -> tuple[list[object], list[tuple[int, str]]]:
    values = [
        value for _, outcomes in reports for kind, value in outcomes if kind == "ok"
    ]
    errors = [
        (pid, str(value))
        for pid, outcomes in reports
        for kind, value in outcomes
        if kind == "error"
    ]
    return values, errors


def test_four_processes_of_fifty_threads_compute_a_cold_key_once(
    workers: ModuleType, redis_url: str, redis_client: redis.Redis, redis_prefix: str
) -> None:
    """200 callers in 4 processes miss one cold key together: 1 computation, 200 equal values."""
    reports = run_stampede(workers, redis_url, redis_prefix, fail_first=False)
    values, errors = _split(reports)
    assert errors == []
    assert values == [{"computation": 1}] * (PROCESSES * THREADS)
    assert redis_client.get(workers.calls_key(redis_prefix)) == b"1"
    assert list(redis_client.scan_iter(match=f"{redis_prefix}:*:l:*")) == []


def test_failing_leader_process_leaves_the_key_to_a_later_leader(
    workers: ModuleType, redis_url: str, redis_client: redis.Redis, redis_prefix: str
) -> None:
    """The leader's error reaches its own process's callers; the others get the next value."""
    reports = run_stampede(workers, redis_url, redis_prefix, fail_first=True)
    values, errors = _split(reports)
    assert len(errors) == THREADS, "shared with the leader's in-process joiners"
    assert {pid for pid, _ in errors} == {errors[0][0]}
    assert {message for _, message in errors} == {
        "FirstCallFailsError: computation 1 fails"
    }
    assert values == [{"computation": 2}] * ((PROCESSES - 1) * THREADS)
    assert redis_client.get(workers.calls_key(redis_prefix)) == b"2"
    assert list(redis_client.scan_iter(match=f"{redis_prefix}:*:l:*")) == []


def test_four_processes_of_fifty_tasks_compute_a_cold_key_once(
    workers: ModuleType, redis_url: str, redis_client: redis.Redis, redis_prefix: str
) -> None:
    """The same stampede with asyncio tasks on AsyncRedisBackend: 1 computation, 200 values."""
    reports = run_stampede(
        workers, redis_url, redis_prefix, fail_first=False, tasks=True
    )
    values, errors = _split(reports)
    assert errors == []
    assert values == [{"computation": 1}] * (PROCESSES * THREADS)
    assert redis_client.get(workers.calls_key(redis_prefix)) == b"1"
    assert list(redis_client.scan_iter(match=f"{redis_prefix}:*:l:*")) == []


def test_failing_async_leader_leaves_the_key_to_a_later_leader(
    workers: ModuleType, redis_url: str, redis_client: redis.Redis, redis_prefix: str
) -> None:
    """Async: the leader's error reaches its own process's tasks; the rest get the next value."""
    reports = run_stampede(
        workers, redis_url, redis_prefix, fail_first=True, tasks=True
    )
    values, errors = _split(reports)
    assert len(errors) == THREADS
    assert {pid for pid, _ in errors} == {errors[0][0]}
    assert values == [{"computation": 2}] * ((PROCESSES - 1) * THREADS)
    assert list(redis_client.scan_iter(match=f"{redis_prefix}:*:l:*")) == []
