"""One worker process of the Prometheus multiprocess test (spawned: a fresh interpreter).

prometheus-client reads ``PROMETHEUS_MULTIPROC_DIR`` when it is imported, so the parent
sets it before spawning; every counter this process increments goes to a file there.
"""

from __future__ import annotations

import threading


def serve(url: str, prefix: str, cities: list[str], threads: int) -> None:
    """Call each city from *threads* threads at once, through one backend per process."""
    from stampede_guard import RedisBackend, cached_stampede_safe
    from stampede_guard.contrib.prometheus import PrometheusMetrics

    backend = RedisBackend.from_url(url, prefix=prefix)

    @cached_stampede_safe(
        key="weather:{city}",
        backend=backend,
        ttl=600,
        metrics=PrometheusMetrics(name="weather"),
    )
    def weather(city: str) -> str:
        return f"sunny in {city}"

    barrier = threading.Barrier(threads * len(cities))
    errors: list[BaseException] = []

    def call(city: str) -> None:
        barrier.wait(30)
        try:
            assert weather(city) == f"sunny in {city}"
        except BaseException as exc:
            errors.append(exc)

    pool = [
        threading.Thread(target=call, args=(city,))
        for city in cities
        for _ in range(threads)
    ]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(30)
    backend.close()
    if errors:
        raise errors[0]
