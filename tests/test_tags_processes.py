"""Tags and cached failures across OS processes, on a real Redis, counted exactly.

Every process is a spawned `_tags_worker` that answers commands over a pipe; the
decorated functions count their calls with INCR in Redis, so the counts below are
those of every process together, and ``user`` returns its count, so that a value
computed after an invalidation is told from the one before.
"""

from __future__ import annotations

import contextlib
import multiprocessing
from collections.abc import Iterator
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnProcess
from multiprocessing.synchronize import Event

import pytest
import redis

import _tags_worker  # on sys.path (pytest's pythonpath), so in a spawned child too
from _tags_worker import (
    USER_ID,
    Setup,
    calls_key,
    hold_key,
    misses_key,
    release_key,
)
from _waiting import until

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(120)]

BOUND = 60.0  # seconds the parent waits for any one answer (a worker bounds its own)
ROUNDS = 2  # stampede rounds a test may run (one go event each)
TIMEOUT = "builtins.TimeoutError"


# The go events live as long as the module: a multiprocessing Event collected during a
# test may run its semaphore's finalizer inside the resource tracker's own call, and
# Python 3.12 then raises ReentrantCallError as an unraisable exception, which fails
# whichever test is running (seen in CI).
_GOS: list[Event] = []


def go_events() -> list[Event]:
    """The `ROUNDS` go events, cleared: made once, reused by every fleet."""
    if not _GOS:
        ctx = multiprocessing.get_context("spawn")
        _GOS.extend(ctx.Event() for _ in range(ROUNDS))
    for event in _GOS:
        event.clear()
    return _GOS


class Fleet:
    """Spawned workers, each answering commands (see `_tags_worker.serve`)."""

    def __init__(self, setup: Setup) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.gos: list[Event] = go_events()
        self.conns: list[Connection] = []
        self.processes: list[SpawnProcess] = []
        for _ in range(setup.processes):
            ours, theirs = ctx.Pipe()
            process = ctx.Process(
                target=_tags_worker.serve, args=(setup, theirs, self.gos)
            )
            process.start()
            theirs.close()
            self.conns.append(ours)
            self.processes.append(process)

    def _receive(self, i: int, what: object) -> tuple[str, object]:
        conn = self.conns[i]
        assert conn.poll(BOUND), f"worker {i} did not answer {what!r} in {BOUND} s"
        answer: tuple[str, object] = conn.recv()
        return answer

    def ask(self, i: int, *command: object) -> object:
        """Send *command* to worker *i*; return its answer's value."""
        self.conns[i].send(command)
        status, value = self._receive(i, command)
        assert status == "ok", f"worker {i}: {value}"
        return value

    def call(self, i: int, fn: str) -> tuple[str, object]:
        """Call *fn* once in worker *i*: ("ok", value) or ("error", "Type: message")."""
        outcome = self.ask(i, "call", fn)
        assert isinstance(outcome, tuple)
        return outcome

    def stampede(self, round_: int, fn: str) -> list[tuple[str, object]]:
        """Park every worker's callers of *fn*, release them all at once: outcomes."""
        command = ("stampede", round_, fn)
        for conn in self.conns:
            conn.send(command)
        for i in range(len(self.conns)):
            assert self._receive(i, command)[0] == "ready", f"worker {i} not parked"
        self.gos[round_].set()  # every caller of every process goes at once
        outcomes: list[tuple[str, object]] = []
        for i in range(len(self.conns)):
            status, value = self._receive(i, command)
            assert status == "ok", f"worker {i}: {value}"
            assert isinstance(value, list)
            outcomes += value
        return outcomes

    def close(self) -> None:
        """Stop every worker; kill one that does not stop. Assert clean exits."""
        for event in self.gos:
            event.set()  # never leave a caller parked
        for conn, process in zip(self.conns, self.processes, strict=True):
            if process.is_alive():
                with contextlib.suppress(OSError):  # it died meanwhile
                    conn.send(("stop",))
        for conn, process in zip(self.conns, self.processes, strict=True):
            process.join(BOUND / 2)
            if process.is_alive():
                process.kill()
                process.join(BOUND / 2)
            conn.close()
        assert [p.exitcode for p in self.processes] == [0] * len(self.processes)


@pytest.fixture
def fleet(redis_url: str, redis_prefix: str) -> Iterator[type[Fleet]]:
    """Start fleets with `Fleet(setup)`; every one started is closed afterwards."""
    started: list[Fleet] = []

    class Tracked(Fleet):
        def __init__(self, setup: Setup) -> None:
            super().__init__(setup)
            started.append(self)

    yield Tracked
    for each in started:
        each.close()


def calls(client: redis.Redis, prefix: str, fn: str) -> int:
    return int(client.get(calls_key(prefix, fn)) or 0)


def no_locks(client: redis.Redis, prefix: str) -> bool:
    return not list(client.scan_iter(match=f"{prefix}:*:l:*"))


def test_a_tag_invalidation_makes_four_stampeding_processes_compute_once_more(
    fleet: type[Fleet], redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    """100 callers in 4 processes: 1 computation; invalidate_tag; 1 more, all get it."""
    processes, threads = 4, 25
    workers = fleet(Setup(redis_url, redis_prefix, processes, threads))
    first = workers.stampede(0, "user")
    assert first == [("ok", {"computation": 1})] * (processes * threads)
    assert calls(redis_client, redis_prefix, "user") == 1

    assert workers.ask(3, "invalidate_tag", f"user:{USER_ID}") is None
    second = workers.stampede(1, "user")
    assert second == [("ok", {"computation": 2})] * (processes * threads)
    assert calls(redis_client, redis_prefix, "user") == 2
    assert no_locks(redis_client, redis_prefix)


def test_a_computation_in_flight_when_its_tag_is_invalidated_elsewhere_is_not_stored(
    fleet: type[Fleet], redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    """A computes, B invalidates a tag of it: A's caller has it, C computes again."""
    workers = fleet(Setup(redis_url, redis_prefix, processes=3))
    a, b, c = 0, 1, 2
    redis_client.set(hold_key(redis_prefix), 1)
    assert workers.ask(a, "start", "user") is None
    until("A computing", lambda: calls(redis_client, redis_prefix, "user") == 1)
    # The other tag of the value ("user:42" is its key's): any of its tags fences it.
    assert workers.ask(b, "invalidate_tag", "org:acme") is None
    redis_client.set(release_key(redis_prefix), 1)
    assert workers.ask(a, "finish") == ("ok", {"computation": 1})

    assert workers.call(c, "user") == ("ok", {"computation": 2})
    assert calls(redis_client, redis_prefix, "user") == 2
    # What C computed is stored: A and B read it, nobody computes a third time.
    assert workers.call(a, "user") == ("ok", {"computation": 2})
    assert workers.call(b, "user") == ("ok", {"computation": 2})
    assert calls(redis_client, redis_prefix, "user") == 2
    assert no_locks(redis_client, redis_prefix)


def test_a_waiter_of_another_process_is_not_served_a_value_its_tag_invalidated(
    fleet: type[Fleet], redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    """C waits on A's lock; B invalidates a tag of A's value: C computes anew."""
    workers = fleet(Setup(redis_url, redis_prefix, processes=3))
    a, b, c = 0, 1, 2
    redis_client.set(hold_key(redis_prefix), 1)
    assert workers.ask(a, "start", "user") is None
    until("A computing", lambda: calls(redis_client, redis_prefix, "user") == 1)
    assert workers.ask(c, "start", "user") is None
    # A's Miss (it took the lock) and C's (it found the lock held, and waits).
    until(
        "C waiting on A's lock",
        lambda: int(redis_client.get(misses_key(redis_prefix)) or 0) == 2,
    )
    assert workers.ask(b, "invalidate_tag", f"user:{USER_ID}") is None
    redis_client.set(release_key(redis_prefix), 1)
    assert workers.ask(a, "finish") == ("ok", {"computation": 1})
    assert workers.ask(c, "finish") == ("ok", {"computation": 2})
    assert calls(redis_client, redis_prefix, "user") == 2
    assert workers.call(a, "user") == ("ok", {"computation": 2})
    assert no_locks(redis_client, redis_prefix)


def test_a_near_cache_of_another_process_serves_nothing_old_once_it_heard_a_tag(
    fleet: type[Fleet], redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    """Near caches in A and B; B invalidates a tag; once A heard, A's next call is new."""
    workers = fleet(Setup(redis_url, redis_prefix, processes=2, near=True))
    a, b = 0, 1
    assert workers.ask(a, "warm", "user") is None
    assert workers.ask(b, "warm", "user") is None
    assert workers.call(a, "user") == ("ok", {"computation": 1})  # a near hit
    assert calls(redis_client, redis_prefix, "user") == 1

    assert workers.ask(b, "invalidate_tag", f"user:{USER_ID}") is None
    # B itself reads its write at once: its own near cache dropped before returning.
    assert workers.ask(b, "near_size") == 0
    assert workers.ask(a, "near_emptied") is None  # A heard the message
    assert workers.call(a, "user") == ("ok", {"computation": 2})
    assert workers.call(b, "user") == ("ok", {"computation": 2})
    assert calls(redis_client, redis_prefix, "user") == 2


def test_a_cached_timeout_reaches_every_caller_of_every_process_for_its_period(
    fleet: type[Fleet], redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    """40 callers in 4 processes, one TimeoutError call; kept 2 s everywhere; then again."""
    processes, threads, period = 4, 10, 2.0
    workers = fleet(
        Setup(redis_url, redis_prefix, processes, threads, failure_period=period)
    )
    first = "upstream timed out (call 1)"
    outcomes = workers.stampede(0, "flaky")
    assert outcomes == [("error", f"{TIMEOUT}: {first}")] * (processes * threads)
    assert calls(redis_client, redis_prefix, "flaky") == 1

    # Within the period: a fresh call in each process is refused without calling.
    failures = list(redis_client.scan_iter(match=f"{redis_prefix}:*:v:flaky:*"))
    assert len(failures) == 1
    for i in range(processes):
        assert workers.call(i, "flaky") == ("error", f"{TIMEOUT}: {first}")
    assert calls(redis_client, redis_prefix, "flaky") == 1
    assert redis_client.exists(failures[0]), "the period ran out during the checks"

    until(
        "the cached failure's expiry",
        lambda: not redis_client.exists(failures[0]),
        period + 5,
    )
    second = "upstream timed out (call 2)"
    assert workers.call(2, "flaky") == ("error", f"{TIMEOUT}: {second}")
    assert calls(redis_client, redis_prefix, "flaky") == 2
    assert workers.call(1, "flaky") == ("error", f"{TIMEOUT}: {second}")
    assert calls(redis_client, redis_prefix, "flaky") == 2
    assert no_locks(redis_client, redis_prefix)
