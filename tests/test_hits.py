"""Hits on the pool `from_url` builds: one GET on a kept connection, safe after faults."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import redis
import redis.asyncio.connection

from _servers import Server
from _waiting import until
from stampede_guard import AsyncRedisBackend, BackendError, RedisBackend
from stampede_guard.backends import Entry

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]


def named(url: str) -> tuple[str, str]:
    """Return *url* with a client name of its own, and that name."""
    name = f"sg-hits-{uuid.uuid4().hex[:8]}"
    return f"{url}?client_name={name}", name


def connections_named(admin: redis.Redis, name: str) -> list[dict[str, Any]]:
    return [c for c in admin.client_list() if c.get("name") == name]


def count_checkouts(backend: RedisBackend | AsyncRedisBackend) -> list[int]:
    """Count get_connection calls of the backend's pool from now on."""
    client: Any = backend.client  # a single server's client: it has one pool
    pool = client.connection_pool
    counted = [0]
    checkout: Callable[..., Any] = pool.get_connection

    def counting(*args: Any, **kwargs: Any) -> Any:
        counted[0] += 1
        return checkout(*args, **kwargs)

    pool.get_connection = counting
    return counted


def store(backend: RedisBackend, key: str, value: object) -> None:
    backend.set(key, Entry(value, 1.0, 0.0), ttl=60)


def test_hits_reuse_one_kept_connection_instead_of_checking_out_each_time(
    redis_url: str, redis_prefix: str
) -> None:
    """100 hits in a row take a connection out of the pool once, not 100 times."""
    backend = RedisBackend.from_url(redis_url, prefix=redis_prefix)
    store(backend, "k", {"v": 1})
    checkouts = count_checkouts(backend)
    try:
        assert all(backend.get("k") == Entry({"v": 1}, 1.0, 0.0) for _ in range(100))
        assert checkouts[0] <= 1
    finally:
        backend.close()


def test_a_hit_on_a_connection_the_server_closed_is_retried_on_a_fresh_one(
    redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    """The server drops the kept connection while idle: the next hit still succeeds."""
    url, name = named(redis_url)
    backend = RedisBackend.from_url(url, prefix=redis_prefix)
    try:
        store(backend, "k", "v")
        assert backend.get("k") is not None  # a connection is now kept
        kept = connections_named(redis_client, name)
        assert kept
        for connection in kept:
            redis_client.client_kill_filter(_id=connection["id"])
        entry = backend.get("k")
        assert entry is not None
        assert entry.value == "v"
    finally:
        backend.close()


def test_a_timed_out_hit_never_leaves_its_reply_for_the_next_one(
    own_server: Server,
) -> None:
    """A GET that timed out on a paused server is never answered to a later GET."""
    backend = RedisBackend.from_url(own_server.url, socket_timeout=0.3)
    try:
        store(backend, "a", "value of a")
        store(backend, "b", "value of b")
        assert backend.get("b") is not None  # a connection is now kept
        os.kill(own_server.proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(BackendError):
                backend.get("a")  # sent; its reply comes once the server resumes
        finally:
            os.kill(own_server.proc.pid, signal.SIGCONT)
        for _ in range(3):
            b = backend.get("b")
            assert b is not None
            assert b.value == "value of b"
    finally:
        backend.close()


def test_kept_connections_stay_within_max_connections(
    redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    """32 threads hitting 32 keys on a pool of 4: all served, on at most 4 connections."""
    url, name = named(redis_url)
    backend = RedisBackend.from_url(url, prefix=redis_prefix, max_connections=4)
    errors: list[BaseException] = []
    try:
        for i in range(32):
            store(backend, f"k{i}", i)

        def hit(i: int) -> None:
            try:
                for _ in range(50):
                    entry = backend.get(f"k{i}")
                    assert entry is not None
                    assert entry.value == i
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=hit, args=(i,)) for i in range(32)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert errors == []
        # Connections stay open once made (in the pool or kept), so this counts them all.
        assert 1 <= len(connections_named(redis_client, name)) <= 4
        # The pool still has a connection to give the listener: a store is heard.
        subscription = backend.subscribe("k0")
        try:
            store(backend, "k0", "new")
            notice = subscription.wait(10)
        finally:
            subscription.close()
        assert isinstance(notice, Entry)
        assert notice.value == "new"
    finally:
        backend.close()


def test_close_gives_kept_connections_back_and_disconnects_them(
    redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    """After close() the server sees no connection of the backend's left open."""
    url, name = named(redis_url)
    backend = RedisBackend.from_url(url, prefix=redis_prefix)
    store(backend, "k", 1)
    assert backend.get("k") is not None
    assert connections_named(redis_client, name)
    backend.close()
    # The server reaps a closed socket on its next event-loop turn, which may come after
    # it answers CLIENT LIST on another connection: look until it has (bounded).
    until(
        "the server seeing the backend's connections closed",
        lambda: connections_named(redis_client, name) == [],
    )


def test_a_forked_child_hits_on_its_own_connection_not_the_parents(
    redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    """After os.fork() the child's hit opens a connection instead of sharing a kept one."""
    url, name = named(redis_url)
    backend = RedisBackend.from_url(url, prefix=redis_prefix)
    store(backend, "k", "v")
    assert backend.get("k") is not None  # the parent keeps a connection
    before = {c["id"] for c in connections_named(redis_client, name)}
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running pytest's teardown
        try:
            entry = backend.get("k")
            admin = redis.Redis.from_url(redis_url)
            fresh = [
                c
                for c in connections_named(admin, name)
                if c["id"] not in before and c["cmd"] == "get"
            ]
            ok = entry is not None and entry.value == "v" and len(fresh) == 1
            os.write(write, b"ok" if ok else b"no")
        finally:
            os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    answer = os.read(read, 2)
    os.close(read)
    try:
        assert os.waitstatus_to_exitcode(status) == 0
        assert answer == b"ok"
        # The parent's kept connection still answers its own requests.
        entry = backend.get("k")
        assert entry is not None
        assert entry.value == "v"
    finally:
        backend.close()


def test_async_hits_reuse_one_kept_connection(
    redis_url: str, redis_prefix: str
) -> None:
    """asyncio: 100 hits in a row take a connection out of the pool once."""

    async def scenario() -> None:
        backend = AsyncRedisBackend.from_url(redis_url, prefix=redis_prefix)
        try:
            await backend.aset("k", Entry([1, 2], 1.0, 0.0), ttl=60)
            checkouts = count_checkouts(backend)
            for _ in range(100):
                assert await backend.aget("k") == Entry([1, 2], 1.0, 0.0)
            assert checkouts[0] <= 1
        finally:
            await backend.aclose()

    asyncio.run(scenario())


def test_a_cancelled_async_hit_never_leaves_its_reply_for_the_next_one(
    own_server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """asyncio: a GET cancelled while the server is paused is never answered to a later GET."""
    sent: list[asyncio.Event] = []
    send = redis.asyncio.connection.AbstractConnection.send_packed_command

    async def send_and_tell(self: Any, command: Any, check_health: bool = True) -> None:
        await send(self, command, check_health)
        for event in sent:
            event.set()

    # redis-py's own method, wrapped: the test learns when a command has gone out.
    monkeypatch.setattr(
        redis.asyncio.connection.AbstractConnection,
        "send_packed_command",
        send_and_tell,
    )

    async def scenario() -> None:
        backend = AsyncRedisBackend.from_url(own_server.url, socket_timeout=5)
        try:
            await backend.aset("a", Entry("value of a", 1.0, 0.0), ttl=60)
            await backend.aset("b", Entry("value of b", 1.0, 0.0), ttl=60)
            assert await backend.aget("b") is not None  # a connection is now kept
            os.kill(own_server.proc.pid, signal.SIGSTOP)
            try:
                sent.append(asyncio.Event())
                pending = asyncio.create_task(backend.aget("a"))
                await asyncio.wait_for(sent[-1].wait(), 10)  # sent, never answered
                pending.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await pending
            finally:
                os.kill(own_server.proc.pid, signal.SIGCONT)
            for _ in range(3):
                b = await backend.aget("b")
                assert b is not None
                assert b.value == "value of b"
        finally:
            await backend.aclose()

    asyncio.run(scenario())


def test_an_async_hit_on_a_connection_the_server_closed_is_retried(
    redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    """asyncio: the server drops the kept connection while idle; the next hit succeeds."""

    async def scenario() -> None:
        url, name = named(redis_url)
        backend = AsyncRedisBackend.from_url(url, prefix=redis_prefix)
        try:
            await backend.aset("k", Entry("v", 1.0, 0.0), ttl=60)
            assert await backend.aget("k") is not None
            kept = connections_named(redis_client, name)
            assert kept
            for connection in kept:
                redis_client.client_kill_filter(_id=connection["id"])
            entry = await backend.aget("k")
            assert entry is not None
            assert entry.value == "v"
        finally:
            await backend.aclose()

    asyncio.run(scenario())
