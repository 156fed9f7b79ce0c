"""The FastAPI and Flask examples, started for real, keep a cold stampede to one upstream call.

examples/fastapi_app.py runs under uvicorn and examples/flask_app.py under gunicorn,
each as a subprocess with 2 worker processes on a free loopback port, on the session's
redis-server under the test's key prefix, in front of a counting upstream
(`_upstream.Upstream`) in this process. Many concurrent clients then ask for a few
cities on a cold cache: every answer must be right, and the upstream must have been
called once per city across both workers. The servers are polled until they answer
(with a deadline), and stopped by their process group, which the test started.

The FastAPI app is also run in process (httpx's ASGITransport inside the app's own
lifespan), to check that the lifespan closes the backend and that a decorated
``async def`` works as the endpoint itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import importlib.util
import inspect
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import httpx
import pytest
import redis

from _servers import free_port
from _upstream import Upstream, expected_body
from _waiting import until

ROOT = Path(__file__).resolve().parent.parent
CITIES = ("oslo", "lima", "cairo")
CLIENTS = 100  # concurrent requests, released together
LATENCY = 0.3  # seconds the upstream takes per request
START_TIMEOUT = 30.0  # seconds for a server to answer /healthz
STOP_TIMEOUT = 10.0  # seconds for a server to exit after SIGTERM
REQUEST_TIMEOUT = 20.0


@dataclass(frozen=True, slots=True)
class Answer:
    """One client's view of one request."""

    path: str
    status: int
    body: object
    pid: str | None


def _get(port: int, path: str, timeout: float = REQUEST_TIMEOUT) -> Answer:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path, headers={"Connection": "close"})
        reply = connection.getresponse()
        raw = reply.read()
        body = json.loads(raw) if reply.status == 200 else raw.decode(errors="replace")
        return Answer(path, reply.status, body, reply.getheader("X-Worker-Pid"))
    finally:
        connection.close()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop the server's process group: SIGTERM, a bounded wait, then SIGKILL."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(STOP_TIMEOUT)
    # The workers too, should the master have left any behind.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(STOP_TIMEOUT)


@dataclass
class Running:
    """A server subprocess answering on *port*; its output goes to *log*."""

    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def output(self) -> str:
        """Return what the server has printed so far."""
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def serve(
    command: Sequence[str], env: dict[str, str], log: Path, attempts: int = 3
) -> Iterator[Running]:
    """Start ``command`` (with ``{port}`` filled in) and wait until it answers /healthz.

    A free port can be taken by someone else before the server binds it: a server
    that exits before it answers is started again on another port, *attempts* times.
    """
    for attempt in range(attempts):
        port = free_port()
        argv = [part.format(port=port) for part in command]
        with log.open("wb") as out:
            proc = subprocess.Popen(
                argv,
                cwd=ROOT,
                env={**os.environ, **env},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: the workers are stopped with it
            )
        running = Running(proc, port, log)
        try:
            if _ready(running):
                yield running
                return
        finally:
            _stop(proc)
        if attempt == attempts - 1:
            pytest.fail(
                f"{argv[2]} did not answer on port {port}; it printed:\n{running.output()}"
            )


def _ready(running: Running) -> bool:
    """Poll /healthz until it answers 200 (True) or the server exits (False)."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if running.proc.poll() is not None:
            return False
        try:
            if _get(running.port, "/healthz", timeout=1).status == 200:
                return True
        except OSError:
            pass
        time.sleep(0.05)  # between two looks, not a synchronisation
    pytest.fail(f"no answer within {START_TIMEOUT} s; it printed:\n{running.output()}")


def _stampede(port: int, paths: Sequence[str]) -> list[Answer]:
    """Ask for each of *paths* at once, one thread and one connection each."""
    start = threading.Barrier(len(paths))

    def one(path: str) -> Answer:
        start.wait(REQUEST_TIMEOUT)
        return _get(port, path)

    with ThreadPoolExecutor(len(paths)) as pool:
        return list(pool.map(one, paths))


def _check(answers: Sequence[Answer], upstream: Upstream) -> None:
    """Every answer is right, and the upstream was called once per path."""
    wrong = [a for a in answers if a.status != 200 or a.body != expected_body(a.path)]
    assert not wrong, f"{len(wrong)} wrong answers, e.g. {wrong[:3]}"
    assert upstream.calls() == dict.fromkeys({a.path for a in answers}, 1)


def _env(redis_url: str, prefix: str, upstream: Upstream) -> dict[str, str]:
    return {
        "REDIS_URL": redis_url,
        "CACHE_PREFIX": prefix,
        "WEATHER_API_URL": upstream.url,
        "PYTHONUNBUFFERED": "1",
    }


def _assert_used_redis(client: redis.Redis, prefix: str) -> None:
    """The app cached in Redis under *prefix*, not in each worker's memory."""
    keys = [k.decode() for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
    assert any(":v:weather:" in key for key in keys), keys


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_fastapi_under_uvicorn_with_two_workers_calls_upstream_once_per_city(
    redis_url: str, redis_prefix: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """uvicorn --workers 2: 100 concurrent cold requests, one upstream call per key."""
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "examples.fastapi_app:app",
        "--host=127.0.0.1",
        "--port={port}",
        "--workers=2",
        "--no-access-log",
        "--timeout-graceful-shutdown=5",
    ]
    # Both endpoints: the one that awaits a decorated function, and the decorated one.
    # (i % 2, i % 3) takes all 6 pairs: every endpoint and city, many times each.
    paths = [
        f"/{('weather', 'forecast')[i % 2]}/{CITIES[i % len(CITIES)]}"
        for i in range(CLIENTS)
    ]
    with Upstream(LATENCY) as upstream:
        env = _env(redis_url, redis_prefix, upstream)
        with serve(command, env, tmp_path / "uvicorn.log") as server:
            answers = _stampede(server.port, paths)
            _check(answers, upstream)
            _assert_used_redis(redis_client, redis_prefix)
            _stop(server.proc)
            output = server.output()
    assert "Traceback" not in output, output
    assert "Finished server process" in output, output  # each worker's lifespan ended


@pytest.mark.slow
@pytest.mark.timeout(90)
@pytest.mark.parametrize("preload", [False, True], ids=["import-in-workers", "preload"])
def test_flask_under_gunicorn_with_two_workers_calls_upstream_once_per_city(
    redis_url: str,
    redis_prefix: str,
    redis_client: redis.Redis,
    tmp_path: Path,
    preload: bool,
) -> None:
    """gunicorn --workers 2 --threads 8: 100 concurrent cold requests, one call per key.

    With ``--preload`` the backend is made in the master and forked into the workers.
    """
    command = [
        sys.executable,
        "-m",
        "gunicorn",
        "examples.flask_app:app",
        "--bind=127.0.0.1:{port}",
        "--workers=2",
        "--threads=8",
        "--graceful-timeout=5",
        # A worker takes at most 50 connections at once: the other worker must take
        # the rest of the stampede, so both compete for each key.
        "--worker-connections=50",
        *(["--preload"] if preload else []),
    ]
    paths = [f"/weather/{CITIES[i % len(CITIES)]}" for i in range(CLIENTS)]
    with Upstream(LATENCY) as upstream:
        env = _env(redis_url, redis_prefix, upstream)
        # gunicorn 24+ opens a control socket, by default one per user in ~/.gunicorn
        # (or $XDG_RUNTIME_DIR): two gunicorn tests at once must not share it.
        (tmp_path / "run").mkdir()
        env["XDG_RUNTIME_DIR"] = str(tmp_path / "run")
        with serve(command, env, tmp_path / "gunicorn.log") as server:
            # /healthz answers once one worker is up; the stampede is for both.
            until(
                "gunicorn booting both workers",
                lambda: server.output().count("Booting worker") >= 2,
                within=START_TIMEOUT,
            )
            answers = _stampede(server.port, paths)
            _check(answers, upstream)
            _assert_used_redis(redis_client, redis_prefix)
            _stop(server.proc)
            output = server.output()
    assert len({a.pid for a in answers}) == 2, "both workers answered"
    assert "Traceback" not in output, output


def _load_fastapi_app(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str]
) -> ModuleType:
    """Import examples/fastapi_app.py afresh, with *env* as its settings."""
    for name in ("REDIS_URL", "CACHE_PREFIX", "WEATHER_API_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    spec = importlib.util.spec_from_file_location(
        "fastapi_app_under_test", ROOT / "examples" / "fastapi_app.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def _asgi_stampede(
    module: ModuleType, paths: Sequence[str]
) -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=module.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        return list(await asyncio.gather(*(client.get(path) for path in paths)))


@pytest.mark.timeout(30)
def test_fastapi_lifespan_closes_the_redis_backend(
    redis_url: str, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The app's lifespan awaits backend.aclose() on shutdown, not before."""
    with Upstream(0.1) as upstream:
        module = _load_fastapi_app(monkeypatch, _env(redis_url, redis_prefix, upstream))
        backend = module.backend
        closed: list[bool] = []
        aclose = backend.aclose

        async def spy() -> None:
            closed.append(True)
            await aclose()

        monkeypatch.setattr(backend, "aclose", spy)
        paths = [f"/forecast/{city}" for city in CITIES for _ in range(10)]

        async def run() -> list[httpx.Response]:
            async with module.app.router.lifespan_context(module.app):
                replies = await _asgi_stampede(module, paths)
                assert closed == []
            return replies

        replies = asyncio.run(run())
        assert closed == [True]
        assert [r.json() for r in replies] == [expected_body(p) for p in paths]
        assert upstream.calls() == dict.fromkeys(paths, 1)


@pytest.mark.timeout(30)
def test_fastapi_without_redis_url_caches_in_memory_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No REDIS_URL: a warning names it, and one worker still calls upstream once per key."""
    with Upstream(0.1) as upstream, caplog.at_level(logging.WARNING):
        module = _load_fastapi_app(monkeypatch, {"WEATHER_API_URL": upstream.url})
        assert "REDIS_URL is not set" in caplog.text
        # The decorated endpoint is a coroutine function, as FastAPI needs to await it.
        assert inspect.iscoroutinefunction(module.forecast)
        paths = [
            f"/{kind}/{c}" for kind in ("weather", "forecast") for c in CITIES
        ] * 10

        async def run() -> list[httpx.Response]:
            async with module.app.router.lifespan_context(module.app):
                return await _asgi_stampede(module, paths)

        replies = asyncio.run(run())
        assert [r.status_code for r in replies] == [200] * len(paths)
        assert [r.json() for r in replies] == [expected_body(p) for p in paths]
        assert upstream.calls() == dict.fromkeys(paths, 1)
