"""Redis over TLS (``rediss://``): kept connections, scripts and pub/sub all encrypted."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from _servers import (
    Server,
    ServerError,
    binary,
    free_port,
    start_data_server,
    unavailable,
)
from _waiting import Waiting, until_async
from stampede_guard import AsyncRedisBackend, RedisBackend, cached_stampede_safe
from stampede_guard.testing import joiners, wait_for_joiners

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]

# A waiter that polls only every 30 s: served at once only if a notice wakes it.
SLOW_POLL: dict[str, Any] = {"base_delay": 30, "max_delay": 30, "wait_timeout": 60}


@dataclass(frozen=True, slots=True)
class TlsServer:
    server: Server
    url: str  # rediss:// on the TLS port
    ca: Path

    def backend(self) -> RedisBackend:
        return RedisBackend.from_url(self.url, ssl_ca_certs=str(self.ca))


def self_signed(workdir: Path) -> tuple[Path, Path]:
    """Return a certificate for 127.0.0.1 and its key, made with the openssl CLI."""
    openssl = shutil.which("openssl")
    if openssl is None:
        unavailable("openssl is not on PATH (Debian: apt install openssl)")
    cert, key = workdir / "cert.pem", workdir / "key.pem"
    command = [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    command += ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"]
    command += ["-addext", "subjectAltName=IP:127.0.0.1"]
    subprocess.run(
        command,
        check=True,
        capture_output=True,
        timeout=30,
    )
    return cert, key


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    """A redis-server of this module's own, with a TLS port beside its plain one."""
    workdir = tmp_path_factory.mktemp("tls")
    cert, key = self_signed(workdir)
    tls_port = free_port()
    try:
        server = start_data_server(
            binary("redis-server"),
            workdir,
            *("--tls-port", str(tls_port), "--tls-auth-clients", "no"),
            *("--tls-cert-file", str(cert), "--tls-key-file", str(key)),
            *("--tls-ca-cert-file", str(cert)),
        )
    except ServerError as exc:  # a redis-server built without TLS, for one
        unavailable(f"redis-server could not serve TLS: {exc}")
    yield TlsServer(server, f"rediss://127.0.0.1:{tls_port}/0", cert)
    server.stop()


def test_a_stampede_over_tls_computes_once_and_every_thread_is_served(
    tls: TlsServer,
) -> None:
    """50 threads miss one key over TLS: one computation, then hits on kept connections."""
    backend = tls.backend()
    computed: list[str] = []
    start = threading.Barrier(50, timeout=10)

    @cached_stampede_safe(key="stampede:{city}", backend=backend)
    def weather(city: str) -> dict[str, str]:
        computed.append(city)
        wait_for_joiners(weather, 49, "oslo")  # the slow call: the others join it
        return {"city": city}

    results: list[object] = []

    def call() -> None:
        start.wait()
        results.append(weather("oslo"))

    threads = [threading.Thread(target=call) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    try:
        assert results == [{"city": "oslo"}] * 50
        assert computed == ["oslo"]
        assert [weather("oslo") for _ in range(20)] == [{"city": "oslo"}] * 20
        assert computed == ["oslo"]
    finally:
        weather.invalidate("oslo")
        backend.close()


def test_a_waiter_is_woken_by_a_notice_sent_over_tls(tls: TlsServer) -> None:
    """Another backend's waiter (one that would poll every 30 s) hears the store at once."""
    leader_backend, waiter_backend = tls.backend(), tls.backend()
    release = threading.Event()

    leading = Waiting()

    @cached_stampede_safe(
        key="notice", backend=leader_backend, metrics=leading, lock_timeout=30
    )
    def lead() -> str:
        release.wait(10)
        return "from-leader"

    waiting = Waiting()

    @cached_stampede_safe(
        key="notice", backend=waiter_backend, metrics=waiting, **SLOW_POLL
    )
    def wait() -> str:
        raise AssertionError("the waiter must not compute")

    led: list[str] = []
    leader = threading.Thread(target=lambda: led.append(lead()))
    leader.start()
    results: list[str] = []
    try:
        leading.until_missed()  # the first caller: it holds the lock now
        waiter = threading.Thread(target=lambda: results.append(wait()))
        waiter.start()
        waiting.until_missed()
        release.set()
        waiter.join(10)
        leader.join(10)
        assert led == results == ["from-leader"]
        assert waiting.waited("value") == 1
    finally:
        release.set()
        leader_backend.delete("notice")
        leader_backend.close()
        waiter_backend.close()


def test_asyncio_tasks_share_one_computation_over_tls(tls: TlsServer) -> None:
    """200 tasks miss one key over TLS (redis.asyncio): one computation, all served."""
    computed: list[int] = []

    async def scenario() -> list[object]:
        backend = AsyncRedisBackend.from_url(tls.url, ssl_ca_certs=str(tls.ca))

        @cached_stampede_safe(key="tasks:{n}", backend=backend)
        async def slow(n: int) -> int:
            computed.append(n)
            await until_async("199 joiners", lambda: joiners(slow, 7) == 199)
            return n * 2

        try:
            return list(await asyncio.gather(*(slow(7) for _ in range(200))))
        finally:
            await backend.adelete(slow.cache_key(7))
            await backend.aclose()

    assert asyncio.run(scenario()) == [14] * 200
    assert computed == [7]
