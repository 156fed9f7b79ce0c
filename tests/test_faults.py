"""Faults on a real redis-server: down, hung, a leader killed, a fork."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import redis

from _servers import Server, free_port
from _waiting import Waiting
from stampede_guard import (
    AsyncRedisBackend,
    BackendError,
    NearCache,
    RedisBackend,
    StampedeStats,
    cached_stampede_safe,
)
from stampede_guard.metrics import BackendSkipped, Event
from stampede_guard.serializers import SignedPickleSerializer
from stampede_guard.testing import wait_for_joiners

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]


def closed_port_url() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"


def test_redis_down_serves_computed_values_and_reports_the_errors() -> None:
    """Connection refused: every call still returns the computed value; errors are counted."""
    backend = RedisBackend.from_url(closed_port_url())
    stats = StampedeStats()

    @cached_stampede_safe(key="k:{x}", backend=backend, metrics=stats)
    def f(x: int) -> int:
        return x * 2

    assert [f(i) for i in range(3)] == [0, 2, 4]
    snap = stats.snapshot()
    assert snap.computations == 3
    assert snap.backend_errors == 3


def test_circuit_breaker_stops_calling_a_dead_backend() -> None:
    """After 5 failures in a row the calls skip the backend (BackendSkipped), still served."""
    backend = RedisBackend.from_url(closed_port_url())
    events: list[Event] = []

    @cached_stampede_safe(key="k:{x}", backend=backend, metrics=events.append)
    def f(x: int) -> int:
        return x

    assert [f(i) for i in range(20)] == list(range(20))
    skipped = sum(isinstance(e, BackendSkipped) for e in events)
    assert skipped == 15, "5 failures open the circuit; the next 15 calls skip Redis"


def test_a_hung_server_costs_at_most_the_socket_timeout_then_the_circuit_opens(
    own_server: Server,
) -> None:
    """SIGSTOP the server: calls fail over to computing after the socket timeout, then skip."""
    backend = RedisBackend.from_url(
        own_server.url, socket_timeout=0.3, connect_timeout=0.3
    )
    stats = StampedeStats()

    @cached_stampede_safe(key="k:{x}", backend=backend, metrics=stats)
    def f(x: int) -> int:
        return x

    assert f(0) == 0  # connected and working
    os.kill(own_server.proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        assert [f(i) for i in range(1, 11)] == list(range(1, 11))
        elapsed = time.monotonic() - started
    finally:
        os.kill(own_server.proc.pid, signal.SIGCONT)
    snap = stats.snapshot()
    assert snap.backend_errors == 5
    assert snap.backend_skipped == 5
    # A bound, not a speed: 5 failed calls of (timeout + one retry) each, never a minute.
    assert elapsed < 5 * 2 * 0.3 + 5
    backend.close()


def test_with_raise_a_dead_backend_raises_backend_error() -> None:
    """on_backend_error='raise': the caller gets BackendError, chained to redis-py's error."""
    backend = RedisBackend.from_url(closed_port_url())

    @cached_stampede_safe(key="k", backend=backend, on_backend_error="raise")
    def f() -> int:
        return 1

    with pytest.raises(BackendError) as raised:
        f()
    assert isinstance(raised.value.__cause__, redis.ConnectionError)


def test_a_killed_leader_is_replaced_by_exactly_one_new_computation(
    redis_url: str,
    redis_client: redis.Redis,
    redis_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """kill -9 of the computing process: within the lease, one waiter takes over; all served."""
    monkeypatch.syspath_prepend(
        str(Path(__file__).parent)
    )  # spawned children inherit it
    import _workers

    ctx = multiprocessing.get_context("spawn")
    started = ctx.Event()
    leader = ctx.Process(
        target=_workers.compute_forever, args=(redis_url, redis_prefix, started)
    )
    leader.start()
    try:
        assert started.wait(20), "the leader never started computing"
        backend = RedisBackend.from_url(redis_url, prefix=redis_prefix)
        waiting = Waiting()

        @cached_stampede_safe(
            key="job",
            backend=backend,
            metrics=waiting,
            lock_timeout=1,
            # Longer than the dead leader's lease: the joiners wait for their own
            # leader's take-over instead of giving up on it at the same moment (with
            # wait_timeout = lock_timeout both could compute: a documented duplicate).
            wait_timeout=5,
            ttl=60,
            base_delay=0.05,
            max_delay=0.2,
        )
        def job() -> str:
            redis_client.incr(f"{redis_prefix}:computations")
            # A computation that takes a while: a second take-over, were there one,
            # would find no value yet and be counted.
            time.sleep(0.2)
            return "from-new-leader"

        results: list[str] = []
        waiters = [
            threading.Thread(target=lambda: results.append(job())) for _ in range(20)
        ]
        for t in waiters:
            t.start()
        waiting.until_missed()  # the dead-to-be leader's lock stopped one of us
        wait_for_joiners(job, 19)  # and the others wait on that one
        os.kill(leader.pid or 0, signal.SIGKILL)
        for t in waiters:
            t.join(15)
        backend.close()
    finally:
        leader.kill()
        leader.join(10)
    assert results == ["from-new-leader"] * 20
    assert redis_client.get(f"{redis_prefix}:computations") == b"2"
    # One caller of this process took the lock over: its leader, once its look found
    # the lease run out; the others were served its value.
    assert waiting.acquired == 1


def test_a_forked_child_gets_its_own_connections_and_listener(
    redis_url: str, redis_prefix: str
) -> None:
    """After os.fork() the child computes and is served through fresh connections."""
    backend = RedisBackend.from_url(redis_url, prefix=redis_prefix)

    @cached_stampede_safe(key="f:{x}", backend=backend)
    def f(x: int) -> int:
        return x + 1

    assert f(1) == 2
    parent_id = backend.client.client_id()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running pytest's teardown
        try:
            ok = f(1) == 2 and f(2) == 3 and backend.client.client_id() != parent_id
            os.write(write, b"ok" if ok else b"no")
        finally:
            os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    answer = os.read(read, 2)
    os.close(read)
    backend.close()
    assert os.waitstatus_to_exitcode(status) == 0
    assert answer == b"ok"


def test_nothing_hangs_when_the_server_vanishes_mid_stampede(
    own_server: Server,
) -> None:
    """The server killed while 50 threads wait: every caller is served, none hangs."""
    backend = RedisBackend.from_url(
        own_server.url, socket_timeout=0.5, connect_timeout=0.5
    )
    started, killed = threading.Event(), threading.Event()

    @cached_stampede_safe(
        key="k", backend=backend, base_delay=0.05, max_delay=0.1, lock_timeout=5
    )
    def f() -> str:
        started.set()
        killed.wait(10)  # computing until the server is gone
        return "v"

    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(f())) for _ in range(50)]
    for t in threads:
        t.start()
    assert started.wait(10)
    wait_for_joiners(f, 49)  # every other thread waits on the computation
    own_server.kill()
    killed.set()
    for t in threads:
        t.join(20)
    assert not any(t.is_alive() for t in threads)
    assert results == ["v"] * 50


def test_a_password_in_the_url_appears_in_no_error_repr_or_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The password of a URL never shows in repr(backend), an error, or a log record."""
    secret = "s3cr3t-pa55word"  # noqa: S105 - a test credential, on a closed port
    backend = RedisBackend.from_url(f"redis://alice:{secret}@127.0.0.1:{free_port()}/0")

    @cached_stampede_safe(key="k", backend=backend, on_backend_error="raise")
    def f() -> int:
        return 1

    with caplog.at_level("DEBUG"), pytest.raises(BackendError) as raised:
        f()
    texts = [repr(backend), str(raised.value), repr(raised.value.__cause__)]
    texts += [record.getMessage() for record in caplog.records]
    assert not any(secret in text for text in texts)


def test_backend_reprs_are_short_and_name_the_address_never_the_password() -> None:
    """repr() of both Redis backends: class, address and prefix; no password, no client."""
    secret = "s3cr3t-pa55word"  # noqa: S105 - a test credential, on a closed port
    port = free_port()
    url = f"redis://alice:{secret}@127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    backends = [
        RedisBackend.from_url(url),
        AsyncRedisBackend.from_url(url, prefix="app"),
        RedisBackend(client),
    ]
    assert [repr(backend) for backend in backends] == [
        f"RedisBackend(127.0.0.1:{port}, prefix='sg')",
        f"AsyncRedisBackend(127.0.0.1:{port}, prefix='app')",
        f"RedisBackend(127.0.0.1:{port}, prefix='sg')",
    ]
    signed = RedisBackend.from_url(
        "unix:///run/redis.sock", serializer=SignedPickleSerializer(secret=b"k" * 32)
    )
    assert repr(signed) == (
        "RedisBackend(unix:/run/redis.sock, prefix='sg', "
        "serializer=SignedPickleSerializer(secret=<hidden>))"
    )
    for backend in (*backends, signed):
        assert secret not in repr(backend)
    client.close()


def test_mixing_sync_and_async_is_a_short_error_that_names_the_fix() -> None:
    """Each mix raises a TypeError under 300 characters, no password, naming the backend to use."""
    secret = "s3cr3t-pa55word"  # noqa: S105 - a test credential, on a closed port
    url = f"redis://alice:{secret}@127.0.0.1:{free_port()}/0"

    async def fetch() -> int:
        return 1

    def load() -> int:
        return 1

    with pytest.raises(TypeError) as async_on_sync:
        cached_stampede_safe(backend=RedisBackend.from_url(url))(fetch)  # type: ignore[deprecated]
    with pytest.raises(TypeError) as sync_on_async:
        cached_stampede_safe(backend=AsyncRedisBackend.from_url(url))(load)  # type: ignore[arg-type]
    for raised, fix in (
        (async_on_sync, "use AsyncRedisBackend"),
        (sync_on_async, "use RedisBackend"),
    ):
        message = str(raised.value)
        assert len(message) < 300, message
        assert fix in message
        assert "127.0.0.1:" in message
        assert secret not in message


def test_an_acl_user_with_a_password_works(own_server: Server) -> None:
    """A Redis ACL user limited to the commands the backend uses can run a stampede."""
    admin = own_server.client()
    admin.acl_setuser(
        "app",
        enabled=True,
        passwords=["+app-password"],
        keys=["sg:*"],
        channels=["sg:*"],
        commands=[
            "+get",
            "+set",
            "+del",
            "+evalsha",
            "+eval",
            "+script|load",
            "+publish",
            "+subscribe",
            "+unsubscribe",
            "+ping",
            "+hello",
            "+pexpire",
            "+pttl",
            "+time",
            "+hset",  # the tag record of a tagged value
            "+hgetall",
        ],
    )
    backend = RedisBackend.from_url(
        f"redis://app:app-password@127.0.0.1:{own_server.port}/0"
    )

    @cached_stampede_safe(key="k:{x}", backend=backend, on_backend_error="raise")
    def f(x: int) -> int:
        return x * 10

    assert [f(1), f(1), f(2)] == [10, 10, 20]
    assert admin.exists(backend._codec.value_key("k:1")) == 1
    calls: list[int] = []

    @cached_stampede_safe(
        key="t:{x}", tags=("x:{x}",), backend=backend, on_backend_error="raise"
    )
    def tagged(x: int) -> int:
        calls.append(x)
        return x

    assert [tagged(1), tagged(1)] == [1, 1]
    backend.invalidate_tag("x:1")
    assert tagged(1) == 1
    assert calls == [1, 1]
    backend.close()
    admin.close()


def test_an_acl_user_without_hgetall_gets_an_error_not_a_silent_miss(
    own_server: Server,
) -> None:
    """A tagged read the server refuses is a BackendError, never a value never kept."""
    admin = own_server.client()
    admin.acl_setuser(
        "app",
        enabled=True,
        passwords=["+app-password"],
        keys=["sg:*"],
        channels=["sg:*"],
        commands=["+@all", "-hgetall"],
    )
    backend = RedisBackend.from_url(
        f"redis://app:app-password@127.0.0.1:{own_server.port}/0"
    )

    @cached_stampede_safe(
        key="t:{x}", tags=("x:{x}",), backend=backend, on_backend_error="raise"
    )
    def tagged(x: int) -> int:
        return x

    try:
        assert tagged(1) == 1  # stored: a store writes the record, it reads none
        with pytest.raises(BackendError, match=r"can't run this command"):
            tagged(1)
    finally:
        backend.close()
        admin.close()


def test_a_backend_failure_says_why_and_where(
    own_server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """The log line and BackendError name the client's error and the server's address."""
    backend = RedisBackend.from_url(own_server.url, socket_timeout=0.2)
    port = own_server.port
    own_server.stop()

    @cached_stampede_safe(key="w:{city}", backend=backend)
    def weather(city: str) -> str:
        return city

    @cached_stampede_safe(key="w:{city}", backend=backend, on_backend_error="raise")
    def strict(city: str) -> str:
        return city

    try:
        with caplog.at_level(logging.WARNING, logger="stampede_guard"):
            assert weather("oslo") == "oslo"
        assert "ConnectionError" in caplog.text
        assert f"127.0.0.1:{port}" in caplog.text
        with pytest.raises(BackendError) as raised:
            strict("oslo")
        assert f"127.0.0.1:{port}" in str(raised.value)
        assert "ConnectionError" in str(raised.value)
    finally:
        backend.close()


def test_an_invalidate_tag_the_server_never_answers_raises_and_can_be_repeated(
    own_server: Server,
) -> None:
    """SIGSTOP during invalidate_tag(): BackendError, bounded; repeating it is final.

    A near cache keeps serving nothing it should not: it drops the tag's entries only
    once the invalidation is known to have happened (the call returned, or the
    message came), and the repeat drops them.
    """
    backend = RedisBackend.from_url(
        own_server.url, socket_timeout=0.3, near_cache=NearCache(ttl=60)
    )
    source = ["old"]

    @cached_stampede_safe(
        key="doc", tags=("docs",), backend=backend, on_backend_error="raise"
    )
    def doc() -> str:
        return source[0]

    try:
        assert doc() == "old"
        source[0] = "new"
        os.kill(own_server.proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(
                BackendError, match="during invalidate_tag of key 'docs'"
            ):
                backend.invalidate_tag("docs")
        finally:
            os.kill(own_server.proc.pid, signal.SIGCONT)
        backend.invalidate_tag("docs")
        assert doc() == "new"
    finally:
        backend.close()


def test_an_invalidate_the_server_never_answers_raises_and_can_be_repeated(
    own_server: Server,
) -> None:
    """SIGSTOP during invalidate(): BackendError while the server is still stopped.

    The script may still run once the server wakes (its bytes were sent), so the error
    means "unknown"; invalidate() is idempotent, and repeating it is final.
    """
    backend = RedisBackend.from_url(own_server.url, socket_timeout=0.3)
    source = ["old"]

    @cached_stampede_safe(key="doc", backend=backend, on_backend_error="raise")
    def doc() -> str:
        return source[0]

    try:
        assert doc() == "old"
        source[0] = "new"
        os.kill(own_server.proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(BackendError, match="during delete of key 'doc'"):
                doc.invalidate()
        finally:
            os.kill(own_server.proc.pid, signal.SIGCONT)
        doc.invalidate()
        assert doc() == "new"
    finally:
        backend.close()
