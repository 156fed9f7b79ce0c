"""Fixtures for the Redis tests: a private redis-server per session, a key prefix per test.

The session starts its own ``redis-server`` on a free loopback port and stops that pid
only (with the helpers of ``_servers.py``, which also starts clusters and Sentinel
sets). ``STAMPEDE_GUARD_REDIS_URL`` points the tests at another server instead (nothing is
started, nothing is ever flushed: each test works under its own key prefix and deletes
only the keys under it). Without a usable server the Redis tests skip, unless
``STAMPEDE_GUARD_REQUIRE_REDIS=1`` (CI) turns the skip into a failure.

Under pytest-xdist (``-n auto``, the default) each worker is a session of its own: it
starts its own server, and the cluster and Sentinel modules their own servers, on free
ports and under the worker's own temporary directory.
"""

from __future__ import annotations

import gc
import os
import shutil
import signal
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis

from _proxy import Proxy
from _servers import (
    URL_ENV,
    Server,
    ServerError,
    answers_ping,
    binary,
    start_data_server,
    unavailable,
)
from stampede_guard import Backend, MemoryBackend, RedisBackend

# A test that uses any of these fixtures needs a real server: it gets the `redis` marker.
REDIS_FIXTURES = frozenset(
    {
        "redis_server",
        "redis_url",
        "redis_prefix",
        "redis_backend",
        "redis_client",
        "private_redis_client",
        "own_server",
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


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """Return the server for this session: STAMPEDE_GUARD_REDIS_URL, or a private one."""
    url = os.environ.get(URL_ENV)
    if url:
        if not answers_ping(url):
            unavailable(f"{URL_ENV}={url!r} does not answer PING")
        yield RedisServer(url, private=False)
        return
    binary = shutil.which("redis-server")
    if binary is None:
        unavailable(f"redis-server is not on PATH; install it or set {URL_ENV}")
    try:
        server = start_data_server(binary, tmp_path_factory.mktemp("redis"))
    except (OSError, ServerError) as exc:
        unavailable(f"could not start redis-server: {exc}")
    try:
        yield RedisServer(server.url, private=True)
    finally:
        server.stop()


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


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[Server]:
    """A redis-server of this test's own, which it may stop, pause or kill."""
    server = start_data_server(binary("redis-server"), tmp_path)
    yield server
    if server.proc.poll() is None:
        os.kill(server.proc.pid, signal.SIGCONT)
        server.stop()


@pytest.fixture(params=["memory", "redis"])
def make_backend(request: pytest.FixtureRequest) -> Iterator[Callable[[], Backend]]:
    """Make backends that share one store, one per simulated process: in memory, and
    on the session's redis-server (each a `RedisBackend` with connections of its own)."""
    if request.param == "memory":
        shared = MemoryBackend()
        yield lambda: shared
        return
    url = request.getfixturevalue("redis_url")
    prefix = request.getfixturevalue("redis_prefix")
    made: list[RedisBackend] = []

    def make() -> RedisBackend:
        made.append(RedisBackend.from_url(url, prefix=prefix))
        return made[-1]

    yield make
    for backend in made:
        backend.close()


@pytest.fixture
def proxy(redis_url: str) -> Iterator[Proxy]:
    """A black-holing proxy to the session's Redis, closed afterwards."""
    parts = urlsplit(redis_url)
    if parts.scheme != "redis" or parts.port is None:
        pytest.skip(f"the proxy speaks plain TCP, not {redis_url!r}")
    made = Proxy(parts.hostname or "127.0.0.1", parts.port)
    yield made
    made.close()


@pytest.fixture
def abandoned_connections_collected() -> Iterator[None]:
    """Collect, quietly, at the end of the test, the sockets asyncio left unclosed.

    A stopped event loop leaves its connections to the garbage collector, which warns
    (ResourceWarning): redis.asyncio's behaviour (see test_event_loops.py), and
    redis-py's asyncio cluster client leaves a socket even after ``aclose()``. Left
    to a later collection, the warning fails whichever test happens to be running
    then (``filterwarnings = error``); collected here, it is this test's, and quiet.
    """
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
