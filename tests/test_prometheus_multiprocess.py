"""Prometheus multiprocess mode: the totals of several worker processes, on a real Redis."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from _prom_worker import serve

pytestmark = [pytest.mark.redis, pytest.mark.timeout(120)]

PROCESSES = 4
THREADS = 10
CITIES = ["oslo", "lima", "pune"]


def total(registry: CollectorRegistry, metric: str, **labels: str) -> float:
    value = registry.get_sample_value(metric, labels)
    return 0.0 if value is None else float(value)


def test_four_worker_processes_report_one_set_of_totals(
    redis_url: str,
    redis_prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As under ``uvicorn --workers 4`` or gunicorn: each process counts in its own
    files, and a ``MultiProcessCollector`` adds them up: one computation per city in
    all, and every request counted once (hits plus misses)."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=serve, args=(redis_url, redis_prefix, CITIES, THREADS))
        for _ in range(PROCESSES)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(90)
    assert [w.exitcode for w in workers] == [0] * PROCESSES

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))  # type: ignore[no-untyped-call]
    requests = PROCESSES * THREADS * len(CITIES)
    hits = total(registry, "stampede_guard_hits_total", name="weather")
    misses = total(registry, "stampede_guard_misses_total", name="weather")
    computed = total(
        registry, "stampede_guard_computations_total", name="weather", outcome="success"
    )
    assert hits + misses == requests
    assert computed == len(CITIES), "one computation per city across the processes"
    assert len(list(tmp_path.glob("*.db"))) >= PROCESSES, "each process wrote its own"
