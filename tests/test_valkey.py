"""valkey-py, the client of the Valkey fork, in place of redis-py.

Run against ``valkey-server`` when it is on PATH, else against the session's
redis-server (Debian 12 has no valkey-server package): the client is what differs.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import valkey
import valkey.asyncio

from _load import stampede
from _servers import ServerError, start_data_server, unavailable
from stampede_guard import AsyncRedisBackend, BackendError, RedisBackend
from stampede_guard.testing import BackendContract

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(60)]


@pytest.fixture(scope="module")
def server_url(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[str]:
    """Return a ``valkey://`` URL: a private valkey-server if installed, else Redis."""
    binary = shutil.which("valkey-server")
    if binary is None:
        url: str = request.getfixturevalue("redis_url")
        yield url.replace("redis://", "valkey://", 1)
        return
    try:
        server = start_data_server(binary, Path(tmp_path_factory.mktemp("valkey")))
    except (OSError, ServerError) as exc:
        unavailable(f"could not start valkey-server: {exc}")
    yield server.url.replace("redis://", "valkey://", 1)
    server.stop()


@pytest.fixture
def backend(server_url: str, redis_prefix: str) -> Iterator[RedisBackend]:
    """Return a RedisBackend over a valkey-py client."""
    made = RedisBackend.from_url(server_url, prefix=redis_prefix)
    yield made
    made.close()


class TestValkeyClientContract(BackendContract):
    """The backend contract, through valkey-py."""


def test_a_valkey_url_builds_a_valkey_client_with_short_timeouts(
    backend: RedisBackend,
) -> None:
    """from_url("valkey://...") builds a valkey.Valkey over a blocking pool."""
    client = backend.client
    assert isinstance(client, valkey.Valkey)
    pool = client.connection_pool
    assert isinstance(pool, valkey.BlockingConnectionPool)
    assert pool.connection_kwargs["socket_timeout"] == 1.0


def test_a_stampede_through_valkey_clients_computes_each_key_once(
    server_url: str, redis_prefix: str
) -> None:
    """Three valkey-py backends, 20 keys, 120 callers: one computation per key."""
    made = [RedisBackend.from_url(server_url, prefix=redis_prefix) for _ in range(3)]
    try:
        keys = [f"key:{n}" for n in range(20)]
        tally = stampede(made, keys)
    finally:
        for b in made:
            b.close()
    assert tally.errors == {}
    assert tally.wrong == []
    assert tally.computations == dict.fromkeys(keys, 1)


def test_a_user_made_asyncio_valkey_client_is_accepted(
    server_url: str, redis_prefix: str
) -> None:
    """AsyncRedisBackend takes a valkey.asyncio.Valkey built by the user."""

    async def main() -> object:
        backend = AsyncRedisBackend(
            valkey.asyncio.Valkey.from_url(server_url), prefix=redis_prefix
        )
        try:
            return await backend.aget_or_lock("k", "token", 5)
        finally:
            await backend.aclose()

    assert asyncio.run(main()) == "token"


def test_valkey_errors_become_backend_errors(redis_prefix: str) -> None:
    """A valkey-py failure (nothing listening) raises BackendError, not ValkeyError."""
    backend = RedisBackend.from_url(
        "valkey://127.0.0.1:1/0", prefix=redis_prefix, connect_timeout=0.2
    )
    try:
        with pytest.raises(BackendError) as caught:
            backend.get("k")
        assert isinstance(caught.value.__cause__, valkey.ValkeyError)
    finally:
        backend.close()


def test_a_decoding_valkey_client_is_refused(server_url: str) -> None:
    """A valkey-py client with decode_responses=True is refused like redis-py's."""
    client = valkey.Valkey.from_url(server_url, decode_responses=True)
    with pytest.raises(ValueError, match="decode_responses"):
        RedisBackend(client)
    client.close()  # type: ignore[no-untyped-call]
