"""What stampede_guard relies on from Redis, proven on a real redis-server.

Keys are found on the server (SCAN under the test's prefix) rather than rebuilt from
the backend's private helpers, so these tests check the layout Redis actually holds.
"""

from __future__ import annotations

import logging
import re
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, cast

import pytest
import redis
from redis.crc import key_slot

from stampede_guard import (
    BackendError,
    Entry,
    JsonSerializer,
    LockTimeoutError,
    RedisBackend,
    SerializationError,
    StampedeStats,
    cached_stampede_safe,
)
from stampede_guard.serializers import decode_entry

ENTRY = Entry({"city": "Zürich", "temps": [1.5, 2.5]}, 1_700_000_000.5, 0.25)
LATE = Entry("late leader", 1_700_000_001.0, 0.5)

# Connection bookkeeping that any client may send; not part of the cost of a call.
HOUSEKEEPING = re.compile(r"^(config\||client\||info$|ping$|hello$|select$|echo$)")


def keys_under(client: redis.Redis, prefix: str, kind: str = "*") -> list[bytes]:
    """Return the Redis keys this test wrote: all, or only values ("v") or locks ("l")."""
    pattern = f"{prefix}:*" if kind == "*" else f"{prefix}:{{*}}:{kind}:*"
    return sorted(client.scan_iter(match=pattern, count=1000))


def only_key(client: redis.Redis, prefix: str, kind: str) -> bytes:
    """Return the single value ("v") or lock ("l") key under *prefix*."""
    found = keys_under(client, prefix, kind)
    assert len(found) == 1, found
    return found[0]


def command_calls(client: redis.Redis) -> dict[str, int]:
    """Return INFO commandstats as {command: calls}, housekeeping left out."""
    stats = cast("dict[str, dict[str, int]]", client.info("commandstats"))
    calls = {
        name.removeprefix("cmdstat_"): stat["calls"] for name, stat in stats.items()
    }
    return {name: n for name, n in calls.items() if not HOUSEKEEPING.match(name)}


def client_commands(
    client: redis.Redis, prefix: str, action: Callable[[], object]
) -> list[str]:
    """Run *action* under MONITOR; return the commands clients sent on *prefix* keys.

    Commands run by scripts (shown as ``lua`` by MONITOR) are left out: they are not
    round trips. The sequence ends at an ECHO of a unique marker, sent afterwards.
    """
    marker = f"end-{uuid.uuid4().hex}"
    sent: list[str] = []
    with client.monitor() as monitor:  # type: ignore[no-untyped-call]
        action()
        client.echo(marker)
        while True:
            seen = cast("dict[str, Any]", monitor.next_command())
            command = str(seen["command"])
            if marker in command:
                return sent
            if seen["client_type"] != "lua" and prefix in command:
                sent.append(command.split(" ", 1)[0].upper())


class Counted:
    """A function to decorate: counts its calls, returns `result(n)`."""

    def __init__(self, result: Callable[[int], object] = lambda n: {"n": n}) -> None:
        self.calls = 0
        self._result = result
        self._guard = threading.Lock()

    def __call__(self, n: int) -> object:
        with self._guard:
            self.calls += 1
        return self._result(n)


def decorate(
    backend: RedisBackend, fn: Callable[[int], object], **options: Any
) -> Callable[[int], object]:
    """Decorate *fn* with the key ``item:{n}`` on *backend*."""
    settings: dict[str, Any] = {"ttl": 60, "lock_timeout": 10} | options

    def item(n: int) -> object:
        return fn(n)

    return cached_stampede_safe(key="item:{n}", backend=backend, **settings)(item)


# --- The scripts and the lock -------------------------------------------------------


def test_lock_is_set_nx_px_with_its_token_and_pttl_in_range(
    redis_backend: RedisBackend, redis_client: redis.Redis, redis_prefix: str
) -> None:
    """get_or_lock takes the lock with SET NX PX: our token, a PTTL within lock_ttl."""
    assert redis_backend.get_or_lock("k", "token-1", 2.5) == "token-1"
    lock = only_key(redis_client, redis_prefix, "l")
    assert redis_client.get(lock) == b"token-1"
    assert 0 < redis_client.pttl(lock) <= 2500
    assert redis_backend.get_or_lock("k", "token-2", 2.5) == "token-1"
    assert redis_client.get(lock) == b"token-1"
    assert keys_under(redis_client, redis_prefix, "v") == []


def test_get_or_lock_returns_the_value_without_taking_the_lock(
    redis_backend: RedisBackend, redis_client: redis.Redis, redis_prefix: str
) -> None:
    """When a value is stored, the get_or_lock script returns it and writes no lock key."""
    redis_backend.set("k", ENTRY, 60)
    assert redis_backend.get_or_lock("k", "token-1", 10) == ENTRY
    assert keys_under(redis_client, redis_prefix, "l") == []


@pytest.mark.timeout(20)
def test_get_or_lock_never_takes_the_lock_once_the_holder_stored_the_value(
    redis_backend: RedisBackend,
) -> None:
    """Waiters racing the holder's set_and_unlock see the value or the lock, never a free lock."""
    waiters, rounds = 8, 20
    taken: list[str] = []
    for round_ in range(rounds):
        key = f"race:{round_}"
        assert redis_backend.get_or_lock(key, "holder", 10) == "holder"
        start = threading.Barrier(waiters + 1, timeout=10)

        def wait(token: str, key: str = key, start: threading.Barrier = start) -> None:
            start.wait()
            deadline = time.monotonic() + 10
            claim: Entry | str = "holder"
            while claim == "holder" and time.monotonic() < deadline:
                claim = redis_backend.get_or_lock(key, token, 10)
            if claim == token:
                taken.append(token)

        threads = [
            threading.Thread(target=wait, args=(f"w{i}",)) for i in range(waiters)
        ]
        for thread in threads:
            thread.start()
        start.wait()
        redis_backend.set_and_unlock(key, ENTRY, 60, "holder")
        for thread in threads:
            thread.join(timeout=15)
    assert taken == []


def test_set_and_unlock_never_deletes_the_next_leaders_lock(
    redis_backend: RedisBackend, redis_client: redis.Redis, redis_prefix: str
) -> None:
    """A leader whose lease ran out neither overwrites nor unlocks the new leader (fenced)."""
    assert redis_backend.get_or_lock("k", "leader-1", 10) == "leader-1"
    lock = only_key(redis_client, redis_prefix, "l")
    redis_client.delete(lock)  # leader-1's lease runs out while it computes
    assert redis_backend.get_or_lock("k", "leader-2", 10) == "leader-2"
    assert redis_backend.set_and_unlock("k", LATE, 60, "leader-1") == LATE
    assert redis_client.get(lock) == b"leader-2"
    assert redis_backend.get("k") is None
    assert redis_backend.set_and_unlock("k", ENTRY, 60, "leader-2") == ENTRY
    assert redis_client.exists(lock) == 0
    assert redis_backend.get("k") == ENTRY


def test_unlock_never_deletes_the_next_leaders_lock(
    redis_backend: RedisBackend, redis_client: redis.Redis, redis_prefix: str
) -> None:
    """A failed leader whose lease ran out does not release the lock of its successor."""
    assert redis_backend.get_or_lock("k", "leader-1", 10) == "leader-1"
    lock = only_key(redis_client, redis_prefix, "l")
    redis_client.delete(lock)  # leader-1's lease runs out while it computes
    assert redis_backend.get_or_lock("k", "leader-2", 10) == "leader-2"
    assert redis_backend.unlock("k", "leader-1") is False
    assert redis_client.get(lock) == b"leader-2"


@pytest.mark.parametrize(
    "cache_key", ["user:1", "{user}:1", "a}{b", "}{", "{", "Zürich weather", "x" * 500]
)
def test_value_and_lock_keys_share_one_cluster_hash_slot(
    redis_backend: RedisBackend,
    redis_client: redis.Redis,
    redis_prefix: str,
    cache_key: str,
) -> None:
    """Both Redis keys of one cache key carry the same non-empty {tag}: one slot."""
    assert redis_backend.get_or_lock(cache_key, "token", 10) == "token"
    redis_backend.set(cache_key, ENTRY, 60)
    keys = keys_under(redis_client, redis_prefix)
    assert len(keys) == 2  # the value and the lock
    tags = [re.match(rb"[^{]*\{([^}]+)\}", key) for key in keys]
    assert tags[0] is not None
    assert tags[1] is not None
    assert tags[0].group(1) == tags[1].group(1)
    assert key_slot(keys[0]) == key_slot(keys[1])


def test_scripts_are_called_by_evalsha_after_the_first_load(
    redis_backend: RedisBackend, private_redis_client: redis.Redis
) -> None:
    """After one SCRIPT LOAD each, calls are EVALSHA only: no EVAL, no reloading."""
    compute = Counted()
    fn = decorate(redis_backend, compute)
    private_redis_client.script_flush()
    private_redis_client.config_resetstat()
    fn(1)
    first = command_calls(private_redis_client)
    assert first.get("script|load") == 2  # get_or_lock and set_and_unlock
    assert "eval" not in first
    private_redis_client.config_resetstat()
    fn(2)
    fn(2)
    second = command_calls(private_redis_client)
    assert second.get("evalsha") == 2
    assert "eval" not in second
    assert "script|load" not in second
    assert compute.calls == 2


def test_hit_costs_exactly_one_get(
    redis_backend: RedisBackend, private_redis_client: redis.Redis
) -> None:
    """A call served from the cache sends one GET to Redis and nothing else."""
    fn = decorate(redis_backend, Counted())
    fn(1)
    private_redis_client.config_resetstat()
    assert fn(1) == {"n": 1}
    assert command_calls(private_redis_client) == {"get": 1}


def test_miss_costs_one_get_and_two_script_calls(
    redis_backend: RedisBackend, redis_client: redis.Redis, redis_prefix: str
) -> None:
    """A miss then compute sends GET, EVALSHA (get_or_lock), EVALSHA (set_and_unlock)."""
    compute = Counted()
    fn = decorate(redis_backend, compute)
    fn(0)  # the scripts are loaded by now
    sent = client_commands(redis_client, redis_prefix, lambda: fn(1))
    assert sent == ["GET", "EVALSHA", "EVALSHA"]
    assert compute.calls == 2


# --- Values that cannot be stored or read -------------------------------------------


@pytest.mark.parametrize("value", [{1, 2}, object()], ids=["set", "object"])
def test_unserializable_value_raises_serialization_error_and_caches_nothing(
    redis_backend: RedisBackend,
    redis_client: redis.Redis,
    redis_prefix: str,
    value: object,
) -> None:
    """A value JSON cannot encode raises SerializationError; no value, no lock remains."""
    compute = Counted(lambda _: value)
    fn = decorate(redis_backend, compute)
    with pytest.raises(SerializationError) as caught:
        fn(7)
    error = caught.value
    assert error.key == "item:7"
    assert error.value_type is type(value)
    assert "'item:7'" in str(error)
    assert f"builtins.{type(value).__qualname__}" in str(error)
    assert keys_under(redis_client, redis_prefix) == []
    with pytest.raises(SerializationError):
        fn(7)
    assert compute.calls == 2


_TIMES = struct.pack("!dd", 1.0, 2.0)


@pytest.mark.parametrize(
    "corrupt",
    [
        b"garbage",
        b"",
        b"SG\x01",
        b"SG\x01\x06pickle" + _TIMES + b"\x80\x04N.",
        b"SG\x01\x04json" + _TIMES + b"{not json",
        b"SG\x01\x04json" + b"\x00" * 3,
        b"SG\x01\x04json" + _TIMES + b"[" * 100_000 + b"]" * 100_000,
    ],
    ids=[
        "garbage",
        "empty",
        "truncated",
        "other-serializer",
        "bad-json",
        "bad-length",
        "json-nested-100k-deep",
    ],
)
def test_corrupt_value_reads_as_a_miss_and_is_overwritten(
    redis_backend: RedisBackend,
    redis_client: redis.Redis,
    redis_prefix: str,
    corrupt: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Bytes that are not an entry count as a miss: recomputed, overwritten, logged."""
    compute = Counted()
    fn = decorate(redis_backend, compute)
    assert fn(1) == {"n": 1}
    value = only_key(redis_client, redis_prefix, "v")
    redis_client.set(value, corrupt)
    with caplog.at_level(logging.WARNING, logger="stampede_guard"):
        assert fn(1) == {"n": 1}
    assert compute.calls == 2
    assert "unreadable cache entry" in caplog.text
    stored = redis_client.get(value)
    assert isinstance(stored, bytes)
    assert decode_entry(stored, JsonSerializer()).value == {"n": 1}
    assert fn(1) == {"n": 1}
    assert compute.calls == 2
    assert keys_under(redis_client, redis_prefix, "l") == []


# --- The client and its pool ---------------------------------------------------------


def _plain(backend: RedisBackend) -> redis.Redis:
    """Return the backend's client, which must be a plain (not cluster) redis-py one."""
    client = backend.client
    assert isinstance(client, redis.Redis)
    return client


def test_from_url_sets_socket_timeouts_and_a_blocking_pool(redis_url: str) -> None:
    """from_url gives the client socket timeouts and a bounded BlockingConnectionPool."""
    default = _plain(RedisBackend.from_url(redis_url)).connection_pool
    assert isinstance(default, redis.BlockingConnectionPool)
    assert default.connection_kwargs["socket_timeout"] == 1.0
    assert default.connection_kwargs["socket_connect_timeout"] == 1.0
    assert default.max_connections == 100
    tuned = _plain(
        RedisBackend.from_url(
            redis_url, socket_timeout=0.3, connect_timeout=0.2, max_connections=8
        )
    ).connection_pool
    assert tuned.connection_kwargs["socket_timeout"] == 0.3
    assert tuned.connection_kwargs["socket_connect_timeout"] == 0.2
    assert tuned.max_connections == 8


POOL = 16  # connections in the pool of the thousand-threads test


@pytest.mark.timeout(60)
def test_thousand_threads_share_one_backend_without_too_many_connections(
    redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    """1,000 threads on 1,000 cold keys (no coalescing) queue for 16 connections.

    Every thread must reach Redis itself, all at once; the pool makes them take turns:
    no backend error, no fallback, never more than its 16 connections on the server.
    """
    threads_n = 1000
    name = f"sg-pool-{uuid.uuid4().hex[:8]}"
    backend = RedisBackend.from_url(
        f"{redis_url}?client_name={name}",
        prefix=redis_prefix,
        max_connections=POOL,
        pool_timeout=30,
    )
    stats = StampedeStats()
    compute = Counted()
    fn = decorate(backend, compute, metrics=stats)
    start = threading.Barrier(threads_n + 1, timeout=30)
    results: list[object] = []
    errors: list[str] = []
    peak = [0]
    done = threading.Event()

    def call(n: int) -> None:
        try:
            start.wait()
            results.append(fn(n))
        except Exception as exc:
            errors.append(repr(exc))

    def watch() -> None:  # the server's own count of this backend's connections
        while not done.is_set():
            clients = redis_client.client_list()
            peak[0] = max(peak[0], sum(c.get("name") == name for c in clients))
            done.wait(0.005)

    threads = [threading.Thread(target=call, args=(n,)) for n in range(threads_n)]
    watcher = threading.Thread(target=watch)
    try:
        for thread in threads:
            thread.start()
        watcher.start()
        start.wait()
        for thread in threads:
            thread.join(timeout=45)
    finally:
        done.set()
        watcher.join(5)
        backend.close()
    assert errors == []
    assert sorted(results, key=str) == sorted(
        ({"n": n} for n in range(threads_n)), key=str
    )
    assert compute.calls == threads_n
    snapshot = stats.snapshot()
    assert (snapshot.backend_errors, snapshot.backend_skipped) == (0, 0)
    assert snapshot.computations == threads_n
    assert POOL // 2 <= peak[0] <= POOL, f"{peak[0]} connections at once"


def test_client_with_decode_responses_is_rejected(redis_url: str) -> None:
    """A client that decodes replies to str is refused with ValueError."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        with pytest.raises(ValueError, match="decode_responses"):
            RedisBackend(client)
    finally:
        client.close()
    with pytest.raises(ValueError, match="decode_responses"):
        RedisBackend.from_url(redis_url, decode_responses=True)


@pytest.mark.parametrize(
    "prefix", ["", "a{b}", "}", "has space", "Zürich", "a*b", "x" * 65, "a\nb"]
)
def test_invalid_prefix_is_rejected(redis_url: str, prefix: str) -> None:
    """A prefix that is empty, too long or has braces or odd characters is refused."""
    with pytest.raises(ValueError, match="prefix"):
        RedisBackend.from_url(redis_url, prefix=prefix)


def test_unreachable_server_raises_backend_error_from_connection_error() -> None:
    """A refused connection surfaces as BackendError, raised from redis' ConnectionError."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Nothing listens on the port once the probe is closed.
    backend = RedisBackend.from_url(f"redis://127.0.0.1:{port}/0", connect_timeout=0.5)
    with pytest.raises(BackendError) as caught:
        backend.get("k")
    assert caught.value.key == "k"
    assert isinstance(caught.value.__cause__, redis.ConnectionError)


# --- The decorator on Redis ----------------------------------------------------------


@pytest.mark.timeout(10)
def test_waiter_raises_lock_timeout_error_while_another_token_holds_the_lock(
    redis_backend: RedisBackend, redis_client: redis.Redis, redis_prefix: str
) -> None:
    """With on_timeout="raise", a caller that cannot get the lock raises LockTimeoutError."""
    compute = Counted()
    fn = decorate(
        redis_backend,
        compute,
        wait_timeout=0.2,
        base_delay=0.01,
        max_delay=0.05,
        on_timeout="raise",
    )
    assert redis_backend.get_or_lock("item:1", "someone-else", 30) == "someone-else"
    with pytest.raises(LockTimeoutError) as caught:
        fn(1)
    assert caught.value.key == "item:1"
    assert isinstance(caught.value, TimeoutError)
    assert compute.calls == 0
    assert (
        redis_client.get(only_key(redis_client, redis_prefix, "l")) == b"someone-else"
    )
