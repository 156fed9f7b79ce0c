"""The testing helpers users get (`stampede_guard.testing`): they count and time truly."""

from __future__ import annotations

import asyncio
import importlib
import linecache
import re
import sys
import threading
import zlib
from pathlib import Path
from typing import Any

import pytest

from _waiting import until_async
from stampede_guard import MemoryBackend, cached_stampede_safe
from stampede_guard.testing import (
    Advance,
    Call,
    VirtualClock,
    astampede,
    counted,
    counter_of,
    joiners,
    perform,
    stampede,
    wait_for_joiners,
)

DOCS = Path(__file__).parent.parent / "docs" / "testing.md"


def test_stampede_of_threads_counts_one_computation_and_every_answer() -> None:
    """100 threads on a cold key: one run, 100 equal results, no errors."""
    release = threading.Event()

    @cached_stampede_safe(key="cold", backend=MemoryBackend(), ttl=60)
    @counted
    def cold() -> str:
        assert release.wait(10)
        return "v"

    threading.Timer(0.2, release.set).start()  # the callers pile up meanwhile
    result = stampede(cold, callers=100)
    assert result.errors == []
    assert result.results == ["v"] * 100
    assert result.computations == 1


def test_stampede_counts_every_computation_when_nothing_is_cached() -> None:
    """A function whose every call fails is run by each caller: the count shows it."""

    @cached_stampede_safe(key="boom", backend=MemoryBackend(), ttl=60)
    @counted
    def boom() -> str:
        raise ValueError("no")

    result = stampede(boom, callers=5)
    assert result.results == []
    assert [type(e) for e in result.errors] == [ValueError] * 5
    assert 1 <= result.computations <= 5
    assert counter_of(boom).calls == result.computations


def test_stampede_of_tasks_counts_one_computation() -> None:
    """200 asyncio tasks on a cold key: one run."""

    @cached_stampede_safe(key="cold", backend=MemoryBackend(), ttl=60)
    @counted
    async def cold() -> str:
        await until_async("199 joiners", lambda: joiners(cold) == 199)
        return "v"

    result = stampede(cold, callers=200, using="tasks")
    assert (result.results, result.errors, result.computations) == (["v"] * 200, [], 1)

    async def again() -> Any:
        return await astampede(cold, callers=10)

    assert asyncio.run(again()).computations == 0, "the value is cached now"


def test_stampede_refuses_a_function_it_cannot_count() -> None:
    """Without `counted` under the decorator, stampede says how to fix it."""

    @cached_stampede_safe(key="x", backend=MemoryBackend(), ttl=60)
    def plain() -> int:
        return 1

    with pytest.raises(TypeError, match="counted"):
        stampede(plain, callers=2)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_stampede_of_processes_computes_once_across_them(
    redis_url: str, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four spawned processes, 40 threads in all, one Redis: one computation."""
    monkeypatch.setenv("STAMPEDE_GUARD_WORKER_URL", redis_url)
    monkeypatch.setenv("STAMPEDE_GUARD_WORKER_PREFIX", redis_prefix)
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    sys.modules.pop("_stampede_worker", None)  # its backend is made from the env above
    worker = importlib.import_module("_stampede_worker")
    result = stampede(
        worker.cold_report,
        callers=worker.CALLERS,
        using="processes",
        processes=worker.PROCESSES,
    )
    assert result.errors == []
    assert result.results == ["the report"] * worker.CALLERS
    assert result.computations == 1


def test_virtual_clock_drives_expiry_and_freshness() -> None:
    """A value lives until the virtual clock passes its ttl, not a moment longer."""
    clock = VirtualClock()
    runs: list[float] = []

    @cached_stampede_safe(key="v:{key}", backend=clock.memory_backend(), ttl=60)
    def value(key: int) -> float:
        runs.append(clock())
        return clock()

    first = value(0)
    perform(Advance(59), value, clock)
    assert perform(Call(0), value, clock) == first
    entry = value.get_cached(0)
    assert entry is not None
    assert entry.created_at == first, "stamped by the virtual clock"
    clock.advance(2)
    assert value(0) == first + 61
    assert len(runs) == 2
    with pytest.raises(ValueError, match="forward"):
        clock.advance(-1)


def _examples() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.DOTALL)
    return [b for b in blocks if "def test_" in b and "MyBackend" not in b]


@pytest.mark.parametrize("example", _examples())
def test_the_example_tests_of_the_testing_page_pass(example: str) -> None:
    """Each example test on docs/testing.md runs and passes as written."""
    namespace: dict[str, Any] = {}
    # The example is its own source file, in linecache: inspect.getsource (hypothesis
    # digests each test's source) would otherwise tokenize the Markdown of the page,
    # which 3.12's tokenizer refuses (an unterminated string literal).
    filename = f"<{DOCS.name}, example {zlib.crc32(example.encode()):08x}>"
    linecache.cache[filename] = (
        len(example),
        None,  # no mtime: linecache.checkcache keeps the entry
        example.splitlines(keepends=True),
        filename,
    )
    exec(compile(example, filename, "exec"), namespace)  # noqa: S102 - our own docs
    tests = [f for name, f in namespace.items() if name.startswith("test_")]
    assert tests
    for test in tests:
        test()


@pytest.mark.timeout(30)
def test_joiners_counts_the_callers_sharing_a_call_in_progress() -> None:
    """wait_for_joiners returns once every other caller joined the leader's call."""
    release = threading.Event()

    class Weather:
        @cached_stampede_safe(key="w:{city}", backend=MemoryBackend())
        def get(self, city: str) -> str:
            assert release.wait(10)
            return city

    weather = Weather()
    assert joiners(weather.get, "oslo") == 0
    threads = [threading.Thread(target=weather.get, args=("oslo",)) for _ in range(8)]
    for thread in threads:
        thread.start()
    wait_for_joiners(weather.get, 7, "oslo")
    assert joiners(weather.get, "oslo") == 7
    assert joiners(weather.get, "bergen") == 0
    with pytest.raises(TimeoutError, match="7 of 8"):
        wait_for_joiners(weather.get, 8, "oslo", timeout=0.05)
    release.set()
    for thread in threads:
        thread.join(10)
    assert joiners(weather.get, "oslo") == 0, "the call ended"


def test_joiners_refuses_a_plain_function() -> None:
    def plain(x: int) -> int:
        return x

    with pytest.raises(TypeError, match="not a function decorated"):
        joiners(plain, 1)
