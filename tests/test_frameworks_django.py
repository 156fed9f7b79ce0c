"""The Django example (examples/django_app): one upstream call per city, in every setting.

In Django's own test clients (async and sync), and for real: the project served by
gunicorn (WSGI, two workers of eight threads) and by uvicorn (ASGI, two workers) on
the session's Redis, against a counting upstream HTTP server on a loopback port.

Django's settings are process-global, so nothing here configures Django in the pytest
process: the test-client checks run this file as a script in a child process
(``python tests/test_frameworks_django.py async|sync PATH...``), which prints what
each request got, and the servers are child processes too.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from http import HTTPStatus
from pathlib import Path
from typing import Any

import pytest
import redis

from _servers import free_port
from _upstream import Upstream, expected_body

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CITIES = ("Paris", "Lima", "Oslo")
UPSTREAM_SECONDS = 0.3
READY_WITHIN_S = 30.0
STOP_WITHIN_S = 15.0

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    with Upstream(latency=UPSTREAM_SECONDS) as server:
        yield server


def django_env(
    upstream: Upstream, redis_url: str | None, prefix: str
) -> dict[str, str]:
    """Return the environment of a child that runs the example."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in {"STAMPEDE_GUARD_REDIS_URL", "DJANGO_SETTINGS_MODULE"}
    }
    env["DJANGO_SETTINGS_MODULE"] = "django_app.settings"
    env["PYTHONPATH"] = os.pathsep.join(
        [str(EXAMPLES), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    env["WEATHER_API_URL"] = upstream.url
    env["STAMPEDE_GUARD_PREFIX"] = prefix
    if redis_url is not None:
        env["STAMPEDE_GUARD_REDIS_URL"] = redis_url
    return env


def stampede_paths(view: str, requests: int, cities: Sequence[str]) -> list[str]:
    """Return *requests* paths of *view*, spread over *cities*."""
    return [f"{view}{cities[i % len(cities)]}" for i in range(requests)]


def assert_served(
    answers: Sequence[tuple[int, str]], paths: Sequence[str], upstream: Upstream
) -> None:
    """Every request got its city's weather, and the upstream saw each city once."""
    assert len(answers) == len(paths)
    for path, (status, body) in zip(paths, answers, strict=True):
        assert status == HTTPStatus.OK, (path, status, body)
        # The upstream's first answer for the city: served from the one call.
        city = path.rsplit("/", 1)[-1]
        assert json.loads(body) == expected_body(f"/weather/{city}"), (path, body)
    cities = {path.rsplit("/", 1)[-1] for path in paths}
    assert upstream.calls() == {f"/weather/{city}": 1 for city in cities}


# -- Django's test clients, in a child process ---------------------------------------


def run_clients(kind: str, paths: Sequence[str]) -> list[tuple[int, str]]:
    """In the child: send every path at once through Django's *kind* test client."""
    import django  # type: ignore[import-untyped]
    from django.test import AsyncClient, Client  # type: ignore[import-untyped]
    from django_app.backends import aclose_async_backend, close_sync_backend

    django.setup()

    def answer(response: Any) -> tuple[int, str]:
        return response.status_code, response.content.decode()

    if kind == "async":

        async def gather() -> list[tuple[int, str]]:
            try:
                responses = await asyncio.gather(*(AsyncClient().get(p) for p in paths))
            finally:
                await aclose_async_backend()
            return [answer(response) for response in responses]

        return asyncio.run(gather())
    try:
        with ThreadPoolExecutor(len(paths)) as pool:
            return [answer(r) for r in pool.map(lambda p: Client().get(p), paths)]
    finally:
        close_sync_backend()


def in_client(
    kind: str, paths: Sequence[str], env: dict[str, str]
) -> list[tuple[int, str]]:
    """Run `run_clients` in a child process with *env*; return its answers."""
    done = subprocess.run(
        [sys.executable, __file__, kind, *paths],
        env=env,
        capture_output=True,
        text=True,
        timeout=40,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return [(status, body) for status, body in json.loads(done.stdout)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("store", ["memory", "redis"])
def test_async_view_calls_upstream_once_per_city_in_the_async_test_client(
    store: str, upstream: Upstream, request: pytest.FixtureRequest
) -> None:
    """50 concurrent AsyncClient requests for 2 cities, cold cache: 2 upstream calls."""
    url = request.getfixturevalue("redis_url") if store == "redis" else None
    prefix = request.getfixturevalue("redis_prefix") if store == "redis" else "mem"
    paths = stampede_paths("/async/weather/", 50, CITIES[:2])
    answers = in_client("async", paths, django_env(upstream, url, prefix))
    assert_served(answers, paths, upstream)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("store", ["memory", "redis"])
def test_sync_view_calls_upstream_once_per_city_in_the_test_client(
    store: str, upstream: Upstream, request: pytest.FixtureRequest
) -> None:
    """50 test Clients in 50 threads at once, for 2 cities: 2 upstream calls."""
    url = request.getfixturevalue("redis_url") if store == "redis" else None
    prefix = request.getfixturevalue("redis_prefix") if store == "redis" else "mem"
    paths = stampede_paths("/weather/", 50, CITIES[:2])
    answers = in_client("sync", paths, django_env(upstream, url, prefix))
    assert_served(answers, paths, upstream)


# -- For real: gunicorn and uvicorn ------------------------------------------------


def get(url: str) -> tuple[int, str]:
    """GET *url*; return its status and body (an error status too)."""
    try:
        with _opener.open(url, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def ready(url: str) -> bool:
    try:
        return get(url)[0] == HTTPStatus.OK
    except OSError:
        return False


@contextmanager
def serving(command: list[str], env: dict[str, str], log: Path) -> Iterator[str]:
    """Run a server *command* from examples/; yield its URL once it answers /healthz.

    Its output goes to *log*, shown if it fails to start. Stopped with SIGTERM (the
    graceful shutdown: workers finish their requests and run their exit hooks), then
    killed if it has not exited within STOP_WITHIN_S.
    """
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [arg.format(port=port) for arg in command],
            cwd=EXAMPLES,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + READY_WITHIN_S
        while not ready(f"{base}/healthz"):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{command[2]} did not start:\n{log.read_text()}")
            time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(STOP_WITHIN_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            pytest.fail(f"{command[2]} did not stop within {STOP_WITHIN_S} s")


def stampede(base: str, paths: Sequence[str]) -> list[tuple[int, str]]:
    """Send every path at once, each from a thread of its own."""
    with ThreadPoolExecutor(len(paths)) as pool:
        return list(pool.map(lambda path: get(f"{base}{path}"), paths))


GUNICORN = [
    sys.executable,
    "-m",
    "gunicorn",
    "--config",
    "django_app/gunicorn_conf.py",
    "--workers",
    "2",
    "--threads",
    "8",
    "--bind",
    "127.0.0.1:{port}",
    "django_app.wsgi:application",
]
UVICORN = [
    sys.executable,
    "-m",
    "uvicorn",
    "--host",
    "127.0.0.1",
    "--port",
    "{port}",
    "--workers",
    "2",
    "--lifespan",
    "on",
    "django_app.asgi:application",
]


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_gunicorn_two_workers_call_upstream_once_per_city(
    upstream: Upstream,
    redis_url: str,
    redis_prefix: str,
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    """The sync view under gunicorn (2 workers x 8 threads), 99 requests: 3 calls."""
    env = django_env(upstream, redis_url, redis_prefix)
    paths = stampede_paths("/weather/", 99, CITIES)
    log = tmp_path / "gunicorn.log"
    # gunicorn 24+ opens a control socket, by default one per user in ~/.gunicorn
    # (or $XDG_RUNTIME_DIR): give this one a directory of its own.
    with tempfile.TemporaryDirectory() as runtime_dir:
        env["XDG_RUNTIME_DIR"] = runtime_dir
        with serving(GUNICORN, env, log) as base:
            answers = stampede(base, paths)
    assert_served(answers, paths, upstream)
    assert any(redis_client.scan_iter(match=f"{redis_prefix}:*"))
    assert "Traceback" not in log.read_text()  # nor at exit (worker_exit's close)


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_uvicorn_two_workers_call_upstream_once_per_city(
    upstream: Upstream,
    redis_url: str,
    redis_prefix: str,
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    """The async view under uvicorn (2 workers), 99 requests: 3 calls; closed at shutdown."""
    env = django_env(upstream, redis_url, redis_prefix)
    paths = stampede_paths("/async/weather/", 99, CITIES)
    log = tmp_path / "uvicorn.log"
    with serving(UVICORN, env, log) as base:
        answers = stampede(base, paths)
    assert_served(answers, paths, upstream)
    assert any(redis_client.scan_iter(match=f"{redis_prefix}:*"))
    # The lifespan handler of asgi.py ran in each worker (and closed its backend).
    assert log.read_text().count("Application shutdown complete.") == 2, log.read_text()
    assert "Traceback" not in log.read_text()


if __name__ == "__main__":
    print(json.dumps(run_clients(sys.argv[1], sys.argv[2:])))
