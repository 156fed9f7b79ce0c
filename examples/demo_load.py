"""The demo's load: many threads, in one process or several, asking for the weather.

A run is *requests* calls of ``get_weather(city)``, spread over *threads* threads (and
over several OS processes with ``demo_processes.run_in_processes``). Every thread is started and parked
first; then all are released at once, so the first call of each thread is part of one
stampede. Each call is timed from the caller's side, and a metrics hook notes, in the
calling thread, what the library did for it (hit, computed, waited, took over, timed
out). A protected run calls the API through ``@cached_stampede_safe``; an unprotected
run is the plain cache-aside code people write first (get; on a miss, call the API
and set), on the same backend.

A helper of ``demo_stampede_prevention.py``; it has no command line of its own.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal, Protocol, cast

import redis
from demo_weather_api import Weather, WeatherClient

from stampede_guard import (
    Backend,
    Entry,
    RedisBackend,
    StampedeStats,
    StatsSnapshot,
    cached_stampede_safe,
)
from stampede_guard.metrics import Event, LockWait, Timeout

__all__ = [
    "CITIES",
    "PREFIX",
    "SPARE_FILES",
    "START_TIMEOUT",
    "WAITING_ROLES",
    "Gate",
    "Load",
    "Options",
    "Record",
    "Role",
    "RunResult",
    "Share",
    "by_index",
    "close_redis",
    "demo_keys",
    "flush",
    "lock_keys",
    "open_files_limit",
    "redis_backend",
    "run_in_process",
    "run_share",
    "tuned_for_many_threads",
    "value_keys",
]

CITIES = ("paris", "tokyo", "lima", "oslo", "nairobi")
# The RedisBackend prefix: every key the demo writes starts with "sg-demo:", so that
# --flush can delete exactly the demo's keys and nothing else.
PREFIX = "sg-demo"
PROTECTED_NAMESPACE = "protected"
UNPROTECTED_NAMESPACE = "unprotected"

# Thousands of threads need little stack each. When they all wake at once, the
# default 5 ms GIL switch interval makes them thrash (minutes on two cores); every
# thread here blocks again within microseconds, so a long interval costs nothing.
THREAD_STACK_BYTES = 512 * 1024
SWITCH_INTERVAL = 0.5
# RedisBackend.from_url's pool (100 connections) and the other files a process opens.
SPARE_FILES = 200
# How long a worker waits to be released, and the parent for its workers to be ready.
START_TIMEOUT = 120.0

Role = Literal["hit", "computed", "waited", "took over", "timed out", "failed"]
#: The roles of requests that waited for another caller's lock.
WAITING_ROLES: frozenset[Role] = frozenset({"waited", "took over", "timed out"})


@dataclass(frozen=True, slots=True)
class Options:
    """The decorator options of the protected run: the library's defaults unless set."""

    ttl: float = 900.0
    lock_timeout: float = 10.0
    base_delay: float = 0.1
    max_delay: float = 1.6


@dataclass(frozen=True, slots=True)
class Load:
    """One run: *requests* calls over *threads* threads, spread over *processes*."""

    api_url: str
    protected: bool
    requests: int
    cities: tuple[str, ...]
    threads: int
    processes: int
    options: Options

    def city(self, index: int) -> str:
        """Return the city that request *index* asks for (round robin)."""
        return self.cities[index % len(self.cities)]


@dataclass(frozen=True, slots=True)
class Record:
    """What one request went through, timed by the caller's own clock.

    Attributes:
        index: The request's number in the run.
        city: What it asked for.
        worker: Which process and thread made it (``p1/t0007``, or ``t0007``).
        role: What it did: served at once (``hit``), called the API (``computed``),
            was served another caller's value after waiting (``waited``), took over a
            free lock after waiting (``took over``), gave up waiting and called the
            API itself (``timed out``), or raised (``failed``).
        started: When the call began (``time.monotonic``, the same clock in every
            process of one machine).
        seconds: How long the call took, end to end.
        compute: How long this call spent calling the API itself (0 if it did not).
        lock_wait: Seconds waited for another caller's lock, as the library measured
            them (`LockWait` events), or None if it did not wait.
        served_by: The API call that produced the value (the server numbers them).
        error: The exception, for a failed request.
    """

    index: int
    city: str
    worker: str
    role: Role
    started: float
    seconds: float
    compute: float
    lock_wait: float | None
    served_by: int | None
    error: str | None

    @property
    def waited(self) -> float:
        """Return the call's time minus its own API call: time spent on the cache."""
        return max(0.0, self.seconds - self.compute)


@dataclass(frozen=True, slots=True)
class RunResult:
    """A finished run: every request's record and the library's own counters."""

    load: Load
    records: tuple[Record, ...]
    stats: StatsSnapshot | None  # None for an unprotected run: no decorator, no stats

    @property
    def wall_seconds(self) -> float:
        """Return the time from the first request's start to the last one's end."""
        if not self.records:
            return 0.0
        start = min(r.started for r in self.records)
        return max(r.started + r.seconds for r in self.records) - start


# --- one process's share of a run ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Share:
    """The requests one process makes, on how many threads.

    *process* numbers the worker processes from 1; it is 0 when the whole run is in
    this process.
    """

    load: Load
    indexes: tuple[int, ...]
    threads: int
    process: int


@dataclass(slots=True)
class _Trace:
    """What happened during the calling thread's current request."""

    events: list[Event] = field(default_factory=list)
    computed: bool = False
    compute: float = 0.0


class _Probe:
    """A metrics hook: counts events in `StampedeStats` and notes them per request.

    The library calls hooks synchronously in the calling thread, so a thread-local
    trace sees exactly the events of the request that thread is making.
    """

    def __init__(self, stats: StampedeStats | None) -> None:
        self._stats = stats
        self._local = threading.local()

    def __call__(self, event: Event, /) -> None:
        if self._stats is not None:
            self._stats(event)
        trace = self.current()
        if trace is not None:
            trace.events.append(event)

    def current(self) -> _Trace | None:
        return cast("_Trace | None", getattr(self._local, "trace", None))

    @contextlib.contextmanager
    def tracing(self) -> Iterator[_Trace]:
        trace = _Trace()
        self._local.trace = trace
        try:
            yield trace
        finally:
            self._local.trace = None


def _weather_function(
    load: Load, backend: Backend, probe: _Probe
) -> Callable[[str], Weather]:
    """Return ``get_weather(city)``, protected by the decorator or plain cache-aside."""
    client = WeatherClient(load.api_url)

    def call_api(city: str) -> Weather:
        trace = probe.current()
        started = time.monotonic()
        try:
            return client.get(city)
        finally:
            if trace is not None:
                trace.computed = True
                trace.compute += time.monotonic() - started

    options = load.options
    if load.protected:
        return cached_stampede_safe(
            key="weather:{city}",
            namespace=PROTECTED_NAMESPACE,
            ttl=options.ttl,
            lock_timeout=options.lock_timeout,
            base_delay=options.base_delay,
            max_delay=options.max_delay,
            backend=backend,
            metrics=probe,
        )(call_api)

    def cache_aside(city: str) -> Weather:
        # Plain cache-aside, without stampede prevention: every caller that misses calls
        # the API, so N concurrent misses make N calls.
        key = f"{UNPROTECTED_NAMESPACE}:weather:{city}"
        found = backend.get(key)
        if found is not None:
            return cast("Weather", found.value)
        started = time.monotonic()
        value = call_api(city)
        entry = Entry(value, time.time(), time.monotonic() - started)
        backend.set(key, entry, options.ttl)  # no ticket: nothing fences it
        return value

    return cache_aside


def _role(trace: _Trace, error: str | None) -> Role:
    if error is not None:
        return "failed"
    if any(isinstance(e, Timeout) for e in trace.events):
        return "timed out"
    outcomes = {e.outcome for e in trace.events if isinstance(e, LockWait)}
    if "lock" in outcomes:
        return "took over"
    if "value" in outcomes:
        return "waited"
    return "computed" if trace.computed else "hit"


def _request(
    get_weather: Callable[[str], Weather],
    probe: _Probe,
    index: int,
    city: str,
    worker: str,
) -> Record:
    """Make one request and time it."""
    served_by: int | None = None
    error: str | None = None
    with probe.tracing() as trace:
        started = time.monotonic()
        try:
            weather = get_weather(city)
        except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
            error = f"{type(exc).__name__}: {exc}"
        else:
            call = weather.get("call")
            served_by = call if isinstance(call, int) else None
            if weather.get("city") != city:
                error = f"asked for {city}, got {weather!r}"
        seconds = time.monotonic() - started
    waits = [e.seconds for e in trace.events if isinstance(e, LockWait)]
    return Record(
        index=index,
        city=city,
        worker=worker,
        role=_role(trace, error),
        started=started,
        seconds=seconds,
        compute=trace.compute,
        lock_wait=sum(waits) if waits else None,
        served_by=served_by,
        error=error,
    )


class Gate(Protocol):
    """A `threading.Event` or a `multiprocessing.Event`: what releases the threads."""

    def wait(self, timeout: float | None = None) -> bool: ...


def run_share(
    share: Share,
    backend: Backend,
    *,
    ready: Callable[[], None],
    go: Gate,
    done_one: Callable[[], None],
) -> tuple[list[Record], StatsSnapshot | None]:
    """Park the share's threads, call *ready*, wait for *go*, then make the requests.

    *done_one* is called after each request (progress). Returns the records and, for
    a protected run, the counters of this process's `StampedeStats`.
    """
    load = share.load
    stats = StampedeStats() if load.protected else None
    probe = _Probe(stats)
    get_weather = _weather_function(load, backend, probe)
    todo = iter(share.indexes)
    todo_lock = threading.Lock()
    records: list[Record] = []
    records_lock = threading.Lock()
    parked = threading.Barrier(share.threads + 1, timeout=START_TIMEOUT)
    released = threading.Event()
    aborted = threading.Event()

    def work(number: int) -> None:
        where = f"p{share.process}/" if share.process else ""
        worker = f"{where}t{number:04d}"
        try:
            warm_up(backend)
            parked.wait()
        except threading.BrokenBarrierError:
            return
        released.wait()
        while not aborted.is_set():
            with todo_lock:
                index = next(todo, None)
            if index is None:
                return
            record = _request(get_weather, probe, index, load.city(index), worker)
            with records_lock:
                records.append(record)
            done_one()

    threads = [
        threading.Thread(target=work, args=(n,), name=f"demo-{n}", daemon=True)
        for n in range(share.threads)
    ]
    try:
        for thread in threads:
            thread.start()
    except RuntimeError as exc:  # "can't start new thread": out of memory or a limit
        parked.abort()
        started = sum(t.ident is not None for t in threads)
        msg = f"could not start thread {started + 1} of {share.threads} ({exc}); use fewer --threads"
        raise RuntimeError(msg) from exc
    try:
        parked.wait()  # every thread is started and parked
        ready()
        if not go.wait(START_TIMEOUT):
            aborted.set()
    finally:
        released.set()  # never leave a thread parked
    for thread in threads:
        thread.join()
    if aborted.is_set():
        msg = f"not released within {START_TIMEOUT} s"
        raise RuntimeError(msg)
    return records, None if stats is None else stats.snapshot()


def warm_up(backend: Backend) -> None:
    """Open this thread's share of a Redis pool before the run, as a live service has."""
    if isinstance(backend, RedisBackend):
        # A failure here shows up in the requests themselves, counted and reported.
        with contextlib.suppress(redis.RedisError):
            backend.client.ping()


# --- a run in this process ---------------------------------------------------------------


class _Counter:
    """A thread-safe count of finished requests."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0

    def add(self) -> None:
        with self._lock:
            self.value += 1


def run_in_process(
    load: Load, backend: Backend, on_progress: Callable[[int], None]
) -> RunResult:
    """Make the run's requests from threads of this process, all released at once.

    *on_progress* is called from this thread with the number of finished requests,
    about ten times a second.
    """
    share = Share(load, tuple(range(load.requests)), load.threads, process=0)
    counter = _Counter()
    ready, go = threading.Event(), threading.Event()
    outcome: list[tuple[list[Record], StatsSnapshot | None] | BaseException] = []

    def drive() -> None:
        try:
            outcome.append(
                run_share(share, backend, ready=ready.set, go=go, done_one=counter.add)
            )
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            outcome.append(exc)
            ready.set()

    driver = threading.Thread(target=drive, name="demo-load", daemon=True)
    driver.start()
    ready.wait()
    go.set()
    while driver.is_alive():
        on_progress(counter.value)
        driver.join(0.1)
    on_progress(counter.value)
    result = outcome[0]
    if isinstance(result, BaseException):
        raise result
    records, stats = result
    return RunResult(load, tuple(sorted(records, key=by_index)), stats)


def by_index(record: Record) -> int:
    """Return *record*'s request number (a sort key)."""
    return record.index


# --- the process's limits ------------------------------------------------------------------


@contextlib.contextmanager
def tuned_for_many_threads() -> Iterator[None]:
    """Use small thread stacks and a long GIL switch interval; restore both after."""
    old_stack = threading.stack_size(THREAD_STACK_BYTES)
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL)
    try:
        yield
    finally:
        threading.stack_size(old_stack)
        sys.setswitchinterval(old_interval)


def open_files_limit(needed: int) -> int | None:
    """Raise this process's open-files limit towards *needed*; return it (None: no cap).

    Each concurrent HTTP request holds a socket, on the client side and on the
    server's. Raising the soft limit up to the hard limit needs no privilege.
    """
    if sys.platform == "win32":
        return None
    import resource  # noqa: PLC0415 - POSIX only

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    if soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return soft


def redis_backend(url: str) -> RedisBackend:
    """Return the demo's `RedisBackend`: the library's defaults, the demo's prefix."""
    return RedisBackend.from_url(url, prefix=PREFIX)


def close_redis(backend: RedisBackend) -> None:
    """Close *backend*'s connections (and stop its notice listener)."""
    backend.close()


# --- the demo's keys on Redis ----------------------------------------------------------------


def demo_keys(client: redis.Redis) -> list[bytes]:
    """Return every key under the demo's prefix (``sg-demo:*``), found with SCAN."""
    return [
        cast("bytes", key) for key in client.scan_iter(match=f"{PREFIX}:*", count=1000)
    ]


def flush(client: redis.Redis) -> int:
    """Delete the demo's own keys (values and locks), and nothing else; return how many.

    Never FLUSHDB: the database may hold anything else.
    """
    keys = demo_keys(client)
    for start in range(0, len(keys), 1000):
        client.delete(*keys[start : start + 1000])
    return len(keys)


def lock_keys(keys: list[bytes]) -> list[bytes]:
    """Return the lock keys among *keys* (``<prefix>:{<tag>}:l:<key>``)."""
    return _of_kind(keys, b"l")


def value_keys(keys: list[bytes]) -> list[bytes]:
    """Return the value keys among *keys* (``<prefix>:{<tag>}:v:<key>``)."""
    return _of_kind(keys, b"v")


def _of_kind(keys: list[bytes], kind: bytes) -> list[bytes]:
    return [key for key in keys if key.split(b":", 3)[2:3] == [kind]]
