"""One AsyncRedisBackend across event loops: a new loop gets new connections, or a clear error."""

from __future__ import annotations

import asyncio
import gc
import threading
import uuid
import warnings
from collections.abc import Iterator

import pytest
import redis
import redis.asyncio

from _waiting import until
from stampede_guard import AsyncRedisBackend, cached_stampede_safe

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]


@pytest.fixture
def abandoned_connections_allowed() -> Iterator[None]:
    """Collect, quietly, the connections a stopped event loop left unclosed.

    A loop that stops without closing its connections leaves their sockets to the
    garbage collector, which warns (ResourceWarning): redis.asyncio's behaviour, not
    ours; the tests here provoke it on purpose.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        yield
        gc.collect()


@pytest.mark.usefixtures("abandoned_connections_allowed")
def test_a_from_url_backend_serves_one_asyncio_run_after_another(
    redis_url: str, redis_prefix: str
) -> None:
    """Each asyncio.run gets fresh connections; the value cached in one is a hit in the next."""
    backend = AsyncRedisBackend.from_url(redis_url, prefix=redis_prefix)
    computed: list[int] = []

    @cached_stampede_safe(key="k:{x}", backend=backend, on_backend_error="raise")
    async def f(x: int) -> int:
        computed.append(x)
        return x * 10

    async def burst(x: int) -> list[int]:
        return list(await asyncio.gather(*(f(x) for _ in range(20))))

    assert asyncio.run(burst(1)) == [10] * 20
    assert asyncio.run(burst(1)) == [10] * 20  # a hit, in a loop of its own
    assert asyncio.run(burst(2)) == [20] * 20  # a miss: lock, store and notices work
    assert computed == [1, 2]

    async def close() -> None:
        await backend.aclose()

    asyncio.run(close())


@pytest.mark.usefixtures("abandoned_connections_allowed")
def test_a_backend_in_use_by_a_loop_in_another_thread_refuses_this_one(
    redis_url: str, redis_prefix: str
) -> None:
    """While its loop runs in another thread, the backend names the problem to a second loop."""
    backend = AsyncRedisBackend.from_url(redis_url, prefix=redis_prefix)
    used = threading.Event()
    done = threading.Event()

    async def hold() -> None:
        await backend.adelete("k")  # binds the backend to this thread's loop
        used.set()
        await asyncio.to_thread(done.wait, 10)  # the loop runs on meanwhile
        await backend.aclose()

    other = threading.Thread(target=asyncio.run, args=(hold(),))
    other.start()
    try:
        assert used.wait(10)
        with pytest.raises(RuntimeError, match="another thread"):
            asyncio.run(backend.aget("k"))
    finally:
        done.set()
        other.join(10)


@pytest.mark.usefixtures("abandoned_connections_allowed")
def test_a_given_client_used_after_its_loop_stopped_raises_a_clear_error(
    redis_url: str, redis_prefix: str
) -> None:
    """A client passed in cannot be remade, so a second loop gets an error naming from_url."""
    client = redis.asyncio.Redis.from_url(redis_url)
    backend = AsyncRedisBackend(client, prefix=redis_prefix)
    asyncio.run(backend.adelete("k"))
    with pytest.raises(RuntimeError, match="from_url"):
        asyncio.run(backend.aget("k"))


def test_a_fresh_connection_per_loop_leaves_no_connection_open_after_aclose(
    redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    """aclose() in each loop closes that loop's connections: none is left on the server."""
    name = f"sg-loops-{uuid.uuid4().hex[:8]}"
    backend = AsyncRedisBackend.from_url(
        f"{redis_url}?client_name={name}", prefix=redis_prefix
    )

    async def use_and_close() -> None:
        await backend.adelete("k")
        assert await backend.aget("k") is None
        await backend.aclose()

    for _ in range(3):
        asyncio.run(use_and_close())
    # The server reaps a closed socket on its next event-loop turn: look until it has.
    until(
        "the server seeing every loop's connection closed",
        lambda: [c for c in redis_client.client_list() if c.get("name") == name] == [],
    )
