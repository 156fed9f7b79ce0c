"""A near cache's process hears of a change: its callers stop joining older reads.

Found by the mixed workload of ``benchmarks/near_coherence.py``: a caller that arrived
after its process had heard another process's write joined an in-process read sent
before that write, and was served the old value ms later.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from stampede_guard import NearCache, RedisBackend, cached_stampede_safe
from stampede_guard.backends import Entry

WAIT = 10.0  # seconds any wait below may take before the test fails


def _until(what: str, done: Callable[[], bool], seconds: float = WAIT) -> None:
    deadline = time.monotonic() + seconds
    while not done():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def prefix(redis_client: object) -> Iterator[str]:
    made = f"t{uuid.uuid4().hex[:8]}"
    yield made
    keys = list(redis_client.scan_iter(match=f"{made}:*"))  # type: ignore[attr-defined]
    if keys:
        redis_client.delete(*keys)  # type: ignore[attr-defined]


def test_a_caller_after_a_heard_change_does_not_join_a_read_sent_before_it(
    redis_url: str, prefix: str
) -> None:
    """One read of the old value is in flight when another process writes: a caller
    arriving once this process has heard of the write reads the new value."""
    here = RedisBackend.from_url(redis_url, prefix=prefix, near_cache=NearCache())
    there = RedisBackend.from_url(redis_url, prefix=prefix)  # another process
    version = {"n": 1}

    def make(backend: RedisBackend) -> object:
        @cached_stampede_safe(key="k:{x}", ttl=60, backend=backend)
        def f(x: int) -> int:
            return version["n"]

        return f

    f_here, f_there = make(here), make(there)
    key = f_here.cache_key(1)  # type: ignore[attr-defined]
    there.set(key, Entry(1, time.time(), 0.0), 60)
    near = here._near
    assert near is not None

    def subscribed() -> bool:
        here.get("probe")  # the first read asks the listener to subscribe
        return near.live

    _until("the near cache to subscribe", subscribed)

    # The first caller's read gets the old value, then stalls before returning it.
    read, release = threading.Event(), threading.Event()
    real_get = here.get

    def stalled_get(k: str) -> Entry | None:
        found = real_get(k)
        if k == key and not read.is_set():
            read.set()
            release.wait(WAIT)
        return found

    here.get = stalled_get  # type: ignore[method-assign,assignment]
    results: dict[str, int] = {}
    first = threading.Thread(target=lambda: results.update(first=f_here(1)))  # type: ignore[operator]
    first.start()
    try:
        assert read.wait(WAIT), "the first read never ran"
        heard = near._seq
        version["n"] = 2
        f_there.refresh(1)  # type: ignore[attr-defined]
        _until("this process to hear of the write", lambda: near._seq > heard)
        results["second"] = f_here(1)  # type: ignore[operator]
    finally:
        release.set()
        first.join(WAIT)
        here.close()
        there.close()
    assert results == {"first": 1, "second": 2}
