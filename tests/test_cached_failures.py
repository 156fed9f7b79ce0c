"""`cache_errors` and `refresh_backoff`: a failing origin is called once per period.

On the memory backend and a real redis-server (`make_backend`: two backends on one
store stand for two processes). Calls of the function are counted exactly.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import threading
from collections.abc import Callable
from typing import Any

import pytest

from stampede_guard import (
    CachedFailureError,
    LockTimeoutError,
    MemoryBackend,
    RedisBackend,
    SignedPickleSerializer,
    cached_stampede_safe,
)
from stampede_guard._coalesce import Refreshing
from stampede_guard.backends import Backend, CachedFailure, Entry

pytestmark = pytest.mark.timeout(60)


class Upstream:
    """A function's origin: raises *error* (while set), counting every call."""

    def __init__(self, error: Exception | None) -> None:
        self.error = error
        self.calls = 0
        self._mutex = threading.Lock()

    def __call__(self, x: object = 0) -> str:
        del x  # a parameter for the key template to name
        with self._mutex:
            self.calls += 1
            calls = self.calls
        if self.error is not None:
            raise self.error
        return f"value {calls}"


def test_a_cached_failure_is_raised_to_every_caller_and_the_origin_called_once(
    make_backend: Callable[[], Backend],
) -> None:
    """30 threads in two "processes": one call, 30 TimeoutErrors, then none until it expires."""
    origin = Upstream(TimeoutError("upstream took too long"))
    release = threading.Event()

    def slow(city: str) -> str:
        assert release.wait(10)
        return origin(city)

    functions = [
        cached_stampede_safe(
            key="w:{city}", cache_errors={TimeoutError: 60.0}, backend=make_backend()
        )(slow)
        for _ in range(2)
    ]
    errors: list[BaseException] = []

    def call(i: int) -> None:
        try:
            functions[i % 2]("Oslo")
        except Exception as exc:  # collected and checked below
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(30)]
    for thread in threads:
        thread.start()
    release.set()
    for thread in threads:
        thread.join(20)
    assert origin.calls == 1
    assert len(errors) == 30
    assert all(type(e) is TimeoutError for e in errors)
    assert all(str(e) == "upstream took too long" for e in errors)
    # Within the period, a new caller in either process gets it without a call.
    for function in functions:
        with pytest.raises(TimeoutError, match="upstream took too long") as raised:
            function("Oslo")
        assert any("served from the cache" in note for note in raised.value.__notes__)
    assert origin.calls == 1


def test_a_failure_expires_after_its_period() -> None:
    """On the backend's clock: one call per period, then the origin is asked again."""
    now = [1000.0]
    backend = MemoryBackend(clock=lambda: now[0])
    origin = Upstream(ConnectionError("refused"))
    fn = cached_stampede_safe(
        key="k:{x}", cache_errors={ConnectionError: 5.0}, backend=backend
    )(origin)
    for _ in range(3):
        with pytest.raises(ConnectionError):
            fn()
    assert origin.calls == 1
    now[0] += 5.1
    origin.error = None
    assert fn() == "value 2"
    assert fn() == "value 2"


def test_only_the_classes_named_are_cached_subclasses_included() -> None:
    """OSError covers ConnectionRefusedError (rebuilt as such); a ValueError is not kept."""
    origin = Upstream(ConnectionRefusedError("port 443"))
    fn = cached_stampede_safe(
        key="k:{x}", cache_errors={OSError: 60.0}, backend=MemoryBackend()
    )(origin)
    for _ in range(2):
        with pytest.raises(ConnectionRefusedError, match="port 443"):
            fn()
    assert origin.calls == 1
    other = Upstream(ValueError("bad"))
    fn = cached_stampede_safe(
        key="k:{x}", cache_errors={OSError: 60.0}, backend=MemoryBackend()
    )(other)
    for _ in range(2):
        with pytest.raises(ValueError, match="bad"):
            fn()
    assert other.calls == 2


class TwoArgumentsError(Exception):
    """An exception that cannot be built again from its message alone."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"{code}: {detail}")


def test_a_failure_that_cannot_be_rebuilt_is_a_clear_cached_failure_error(
    make_backend: Callable[[], Backend],
) -> None:
    """The leader gets the original; later callers a CachedFailureError naming it."""
    origin = Upstream(TwoArgumentsError(503, "busy"))
    fn = cached_stampede_safe(
        key="k:{x}", cache_errors={TwoArgumentsError: 60.0}, backend=make_backend()
    )(origin)
    with pytest.raises(TwoArgumentsError):
        fn()
    with pytest.raises(
        CachedFailureError, match=r"TwoArgumentsError: 503: busy"
    ) as raised:
        fn()
    assert raised.value.type_name.endswith("TwoArgumentsError")
    assert raised.value.key == "k:0"
    assert origin.calls == 1


def test_a_reader_that_does_not_cache_that_class_gets_a_cached_failure_error(
    make_backend: Callable[[], Backend],
) -> None:
    """A process deployed without cache_errors never runs a name read from the cache."""
    writer = cached_stampede_safe(
        key="k:{x}", cache_errors={TimeoutError: 60.0}, backend=make_backend()
    )(Upstream(TimeoutError("slow")))
    reader_origin = Upstream(None)
    reader = cached_stampede_safe(key="k:{x}", backend=make_backend())(reader_origin)
    with pytest.raises(TimeoutError):
        writer()
    with pytest.raises(CachedFailureError, match=r"builtins\.TimeoutError: slow"):
        reader()
    assert reader_origin.calls == 0


def test_a_stale_value_wins_over_a_failed_refresh_and_the_failure_is_not_stored(
    make_backend: Callable[[], Backend],
) -> None:
    """stale-if-error: the stale value is served; the failure never replaces it."""
    origin = Upstream(None)
    fn = cached_stampede_safe(
        key="k:{x}",
        ttl=10,
        stale_ttl=600,
        background_refresh=False,
        cache_errors={TimeoutError: 60.0},
        refresh_backoff=0,
        backend=make_backend(),
    )(origin)
    assert fn() == "value 1"
    origin.error = TimeoutError("down")
    # Make the value stale: stored again, made 20 s earlier (past its ttl of 10).
    entry = fn.get_cached()
    assert entry is not None
    backend: Any = fn._backend  # type: ignore[attr-defined]
    backend.set("k:0", type(entry)(entry.value, entry.created_at - 20, 0.0), 600)
    assert fn() == "value 1"  # the refresh failed: stale served
    assert origin.calls == 2
    stored = fn.get_cached()
    assert stored is not None
    assert stored.value == "value 1"  # not a CachedFailure


def test_refresh_backoff_keeps_a_failing_origin_from_a_call_per_request(
    make_backend: Callable[[], Backend],
) -> None:
    """After a failed refresh, this process serves stale without calling; 0: at once."""
    for backoff, expected_calls in ((60.0, 2), (0.0, 4)):
        origin = Upstream(None)
        fn = cached_stampede_safe(
            key=f"k{backoff}:{{x}}",
            ttl=10,
            stale_ttl=600,
            background_refresh=False,
            refresh_backoff=backoff,
            backend=make_backend(),
        )(origin)
        assert fn() == "value 1"
        entry = fn.get_cached()
        assert entry is not None
        backend: Any = fn._backend  # type: ignore[attr-defined]
        backend.set(
            f"k{backoff}:0", type(entry)(entry.value, entry.created_at - 20, 0.0), 600
        )
        origin.error = TimeoutError("down")
        for _ in range(3):
            assert fn() == "value 1"
        assert origin.calls == expected_calls


def test_refreshing_rests_a_key_until_its_backoff_is_over() -> None:
    """The per-process registry the backoff lives in, on explicit times."""
    refreshing = Refreshing()
    assert refreshing.claim("k", 0.0)
    refreshing.release("k")
    refreshing.rest("k", 10.0, 5.0)
    assert not refreshing.claim("k", 14.9)
    assert refreshing.claim("k", 15.0)
    refreshing.release("k")
    assert refreshing.claim("k", 15.1)


def test_a_ttl_function_is_never_asked_about_a_cached_failure() -> None:
    """Readers judging freshness skip a failure: ttl=lambda v: v["max_age"] would fail."""
    origin = Upstream(TimeoutError("slow"))
    fn = cached_stampede_safe(
        key="k:{x}",
        ttl=lambda v: v["max_age"],
        stale_ttl=30,
        cache_errors={TimeoutError: 60.0},
        backend=MemoryBackend(),
    )(origin)
    for _ in range(3):
        with pytest.raises(TimeoutError):
            fn()
    assert origin.calls == 1


@pytest.mark.parametrize(
    ("cache_errors", "error", "match"),
    [
        ([TimeoutError], TypeError, "must map exception classes to seconds"),
        ({KeyboardInterrupt: 5}, TypeError, "not an exception class"),
        ({"TimeoutError": 5}, TypeError, "not an exception class"),
        ({LockTimeoutError: 5}, TypeError, "stampede_guard's own error"),
        ({TimeoutError: -1}, ValueError, "from 0.001 to 86400"),
        ({TimeoutError: float("nan")}, ValueError, "from 0.001 to 86400"),
        ({TimeoutError: True}, ValueError, "from 0.001 to 86400"),
    ],
)
def test_bad_cache_errors_are_refused_at_decoration(
    cache_errors: object, error: type[Exception], match: str
) -> None:
    options: Any = {"cache_errors": cache_errors}
    with pytest.raises(error, match=match):
        cached_stampede_safe(backend=MemoryBackend(), **options)


def test_a_negative_refresh_backoff_is_refused() -> None:
    with pytest.raises(ValueError, match="refresh_backoff"):
        cached_stampede_safe(backend=MemoryBackend(), refresh_backoff=-1)


@pytest.mark.parametrize("signed", [False, True])
def test_a_failure_survives_the_redis_envelope(
    redis_url: str, redis_prefix: str, signed: bool
) -> None:
    """JSON and signed pickle both carry a failure's type and message across."""
    serializer = SignedPickleSerializer(secrets.token_bytes(32)) if signed else None
    made = [
        RedisBackend.from_url(redis_url, prefix=redis_prefix, serializer=serializer)
        for _ in range(2)
    ]
    try:
        origin = Upstream(TimeoutError("é " * 3000))  # long, and not ASCII
        first, second = (
            cached_stampede_safe(
                key="k:{x}", cache_errors={TimeoutError: 60.0}, backend=backend
            )(origin)
            for backend in made
        )
        with pytest.raises(TimeoutError):
            first()
        with pytest.raises(TimeoutError) as raised:
            second()
        assert str(raised.value).startswith("é é")
        assert str(raised.value).endswith("...")  # kept to 2,000 characters
        assert origin.calls == 1
    finally:
        for backend in made:
            backend.close()


def test_an_async_function_caches_its_failure_for_every_task() -> None:
    origin = Upstream(TimeoutError("slow"))

    @cached_stampede_safe(
        key="k", cache_errors={TimeoutError: 60.0}, backend=MemoryBackend()
    )
    async def fn() -> str:
        await asyncio.sleep(0.01)
        return origin()

    async def main() -> list[BaseException | str]:
        return await asyncio.gather(*(fn() for _ in range(20)), return_exceptions=True)

    results = asyncio.run(main())
    assert all(type(r) is TimeoutError for r in results)
    assert origin.calls == 1


@pytest.mark.parametrize(
    "name", ["builtins.SystemExit", "subprocess.Popen", "os.system", "no.such.Module"]
)
def test_a_failure_written_by_someone_else_never_imports_or_exits(
    make_backend: Callable[[], Backend], name: str
) -> None:
    """A name read from the cache is only looked up among cached classes' subclasses."""
    backend = make_backend()
    origin = Upstream(None)
    fn = cached_stampede_safe(
        key="k:{x}", cache_errors={Exception: 60.0}, backend=backend
    )(origin)
    backend.set("k:0", Entry(CachedFailure(name, "0"), 1.0, 0.0), 60)
    with pytest.raises(CachedFailureError, match=re.escape(name)):
        fn()
    assert origin.calls == 0
