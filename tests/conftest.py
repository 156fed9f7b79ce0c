"""Fixtures for the Redis tests: a private redis-server per session, a key prefix per test.

The session starts its own ``redis-server`` on a free loopback port and stops that pid
only. ``STAMPEDE_GUARD_REDIS_URL`` points the tests at another server instead (nothing is
started, nothing is ever flushed: each test works under its own key prefix and deletes
only the keys under it). Without a usable server the Redis tests skip, unless
``STAMPEDE_GUARD_REQUIRE_REDIS=1`` (CI) turns the skip into a failure.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest
import redis

from stampede_guard import RedisBackend

URL_ENV = "STAMPEDE_GUARD_REDIS_URL"
REQUIRE_ENV = "STAMPEDE_GUARD_REQUIRE_REDIS"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0

# A test that uses any of these fixtures needs a real server: it gets the `redis` marker.
REDIS_FIXTURES = frozenset(
    {
        "redis_server",
        "redis_url",
        "redis_prefix",
        "redis_backend",
        "redis_client",
        "private_redis_client",
    }
)


@dataclass(frozen=True, slots=True)
class RedisServer:
    """The server the Redis tests use; *private* if this session started it."""

    url: str
    private: bool


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses a Redis fixture with `redis`."""
    for item in items:
        if REDIS_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.redis)


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} (and {REQUIRE_ENV}=1 requires Redis)", pytrace=False)
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _answers_ping(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _server_pid(url: str) -> int | None:
    """Return the pid of the server answering at *url*, or None if none answers."""
    client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        pid = client.info("server").get("process_id")
    except redis.RedisError:
        return None
    finally:
        client.close()
    return pid if isinstance(pid, int) else None


def _stop(proc: subprocess.Popen[bytes], url: str) -> None:
    # Only ever shut down the server we started: the port may belong to someone else
    # if ours never managed to bind it.
    if _server_pid(url) == proc.pid:
        client = redis.Redis.from_url(url, socket_timeout=STOP_TIMEOUT)
        try:
            client.shutdown(nosave=True)
        except redis.RedisError:
            pass  # it may close the connection while shutting down
        finally:
            client.close()
    try:
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)


def _start(binary: str, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start redis-server on a free port and wait for PING; raise RuntimeError if not."""
    log = workdir / "redis.log"
    reason = ""
    # Another process may grab the port between our probe and the server's bind: retry.
    for _ in range(3):
        port = _free_port()
        url = f"redis://127.0.0.1:{port}/0"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [
                    binary,
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--enable-debug-command",
                    "local",
                    "--dir",
                    str(workdir),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while proc.poll() is None and time.monotonic() < deadline:
            # Check the pid, not just PING: another server may have taken the port.
            if _server_pid(url) == proc.pid:
                return proc, url
            time.sleep(0.05)
        code = proc.poll()
        reason = (
            f"exited with code {code}"
            if code is not None
            else f"did not answer within {START_TIMEOUT}s"
        )
        _stop(proc, url)
        if code is None:
            break  # a server that hangs is no port race: retrying would only hang again
    tail = log.read_text(errors="replace")[-500:]
    msg = f"redis-server {reason}; its log ends: {tail}"
    raise RuntimeError(msg)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """Return the server for this session: STAMPEDE_GUARD_REDIS_URL, or a private one."""
    url = os.environ.get(URL_ENV)
    if url:
        if not _answers_ping(url):
            _unavailable(f"{URL_ENV}={url!r} does not answer PING")
        yield RedisServer(url, private=False)
        return
    binary = shutil.which("redis-server")
    if binary is None:
        _unavailable(f"redis-server is not on PATH; install it or set {URL_ENV}")
    try:
        proc, url = _start(binary, tmp_path_factory.mktemp("redis"))
    except (OSError, RuntimeError) as exc:
        _unavailable(f"could not start redis-server: {exc}")
    try:
        yield RedisServer(url, private=True)
    finally:
        _stop(proc, url)


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    """Return the URL of the session's Redis (``redis://127.0.0.1:<port>/0``)."""
    return redis_server.url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """Return a raw client (bytes replies) for inspecting the server; closed afterwards."""
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    yield client
    client.close()


@pytest.fixture
def redis_prefix(redis_client: redis.Redis) -> Iterator[str]:
    """Return a key prefix of this test's own; its keys are deleted afterwards."""
    prefix = f"t{uuid.uuid4().hex[:8]}"
    yield prefix
    # Never FLUSHDB: the server may not be ours. Delete only what this test wrote.
    stale = list(redis_client.scan_iter(match=f"{prefix}:*", count=1000))
    if stale:
        redis_client.delete(*stale)


@pytest.fixture
def redis_backend(redis_url: str, redis_prefix: str) -> Iterator[RedisBackend]:
    """Return a `RedisBackend` on the session's Redis under this test's prefix."""
    backend = RedisBackend.from_url(redis_url, prefix=redis_prefix)
    yield backend
    backend.close()


@pytest.fixture
def private_redis_client(
    redis_server: RedisServer, redis_client: redis.Redis
) -> redis.Redis:
    """Return `redis_client` if this session started the server, else skip.

    For tests that reset or read server-wide state (CONFIG RESETSTAT, SCRIPT FLUSH),
    which must never be done to a server someone else uses.
    """
    if not redis_server.private:
        pytest.skip(f"needs the session's own redis-server, not {URL_ENV}")
    return redis_client
