"""examples/demo_stampede_prevention.py: its entry point, counted by its own HTTP server."""

from __future__ import annotations

import functools
import importlib
import io
import re
import socket
import struct
import threading
import time
import urllib.error
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import redis

from _waiting import until

EXAMPLES = Path(__file__).parent.parent / "examples"
FAST = ["--latency", "0.05"]


@pytest.fixture
def demo(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Return the demo's module; spawned worker processes find its helpers too."""
    # Spawned children start with the parent's sys.path, so they import them as well.
    monkeypatch.syspath_prepend(str(EXAMPLES))
    return importlib.import_module("demo_stampede_prevention")


@pytest.fixture
def upstream(demo: ModuleType, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, int]]:
    """Return the weather server's own count of API calls per city, one dict per run."""
    api_class: Any = importlib.import_module("demo_weather_api").WeatherAPI
    original = api_class.calls
    counts: list[dict[str, int]] = []

    def calls(self: object) -> dict[str, int]:
        got: dict[str, int] = original(self)
        counts.append(got)
        return got

    monkeypatch.setattr(api_class, "calls", calls)
    return counts


@pytest.fixture
def weather(demo: ModuleType) -> ModuleType:
    """Return the demo's weather API module (the demo fixture puts it on sys.path)."""
    del demo  # asked for first: a test naming `weather` before `demo` needs its path
    return importlib.import_module("demo_weather_api")


def with_fault(
    demo: ModuleType,
    weather: ModuleType,
    monkeypatch: pytest.MonkeyPatch,
    fault: Callable[[str, int], bool],
) -> None:
    """Make the demo's weather API answer 503 to the requests *fault* picks."""
    monkeypatch.setattr(
        demo, "WeatherAPI", functools.partial(weather.WeatherAPI, fault=fault)
    )


@pytest.fixture
def demo_keys_cleaned(redis_client: redis.Redis) -> Iterator[redis.Redis]:
    """Return a client; afterwards delete the demo's keys (``sg-demo:*``), nothing else."""
    yield redis_client
    stale = list(redis_client.scan_iter(match="sg-demo:*", count=1000))
    if stale:
        redis_client.delete(*stale)


@pytest.mark.timeout(30)
def test_in_memory_run_calls_the_api_once_per_city(
    demo: ModuleType, upstream: list[dict[str, int]], capsys: pytest.CaptureFixture[str]
) -> None:
    """300 requests for 3 cities: 3 calls protected; unprotected, a call per request.

    Unprotected is plain cache-aside: a request that starts after a value was stored
    (a thread started late on a loaded machine) hits the cache, so up to 100 a city.
    """
    assert demo.main(["-r", "300", "-c", "3", *FAST]) == 0
    unprotected, protected = upstream
    assert set(unprotected) == {"paris", "tokyo", "lima"}
    assert all(1 < calls <= 100 for calls in unprotected.values()), unprotected
    assert protected == {"paris": 1, "tokyo": 1, "lima": 1}
    out = capsys.readouterr().out
    assert "API calls per city, protected: paris 1, tokyo 1, lima 1" in out
    for figure in ("API call reduction", "cache hit rate", "average wait", "p99 wait"):
        assert figure in out
    assert "99.0 %" in out  # (300 - 3) / 300
    assert "$36,500 a year" in out  # the cost example without protection
    assert "OK: protection held and every target was met" in out


@pytest.mark.timeout(30)
def test_unprotected_run_calls_the_api_once_per_request(
    demo: ModuleType, upstream: list[dict[str, int]], capsys: pytest.CaptureFixture[str]
) -> None:
    """--no-protection: 200 concurrent requests reach the server as 200 API calls."""
    # A long upstream call keeps every request's cache miss before the first answer.
    argv = ["--no-protection", "-r", "200", "-c", "2", "--latency", "0.5"]
    assert demo.main(argv) == 0
    assert upstream == [{"paris": 100, "tokyo": 100}]
    out = capsys.readouterr().out
    assert "Unprotected: 200 API calls for 200 requests" in out


@pytest.mark.timeout(30)
def test_exit_status_is_1_when_a_city_gets_more_than_one_api_call(
    demo: ModuleType,
    upstream: list[dict[str, int]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With the decorator replaced by a no-op, the demo reports failure and exits 1."""
    load = importlib.import_module("demo_load")
    monkeypatch.setattr(load, "cached_stampede_safe", lambda **_: lambda fn: fn)
    argv = ["--protected-only", "-r", "40", "-c", "1", "--latency", "0.3"]
    assert demo.main(argv) == 1
    assert upstream[-1]["paris"] > 1
    assert "FAILED: protection did not hold" in capsys.readouterr().out


@pytest.mark.timeout(30)
def test_verbose_lists_who_called_the_api_and_who_waited(
    demo: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    """-v shows request by request which one computed and which ones waited."""
    assert demo.main(["-r", "30", "-c", "1", "--protected-only", "-v", *FAST]) == 0
    out = capsys.readouterr().out
    assert "protected run, request by request" in out
    assert " computed " in out
    assert " waited " in out
    assert "-vv shows every request" in out


@pytest.mark.timeout(30)
def test_interactive_waits_for_enter_before_each_phase_on_a_terminal(
    demo: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """-i on a terminal reads one Enter per phase: setup, two runs, report."""

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stdin = Terminal("\n" * 5)
    monkeypatch.setattr("sys.stdin", stdin)
    assert demo.main(["-i", "-r", "20", *FAST]) == 0
    assert stdin.read() == "\n"  # four phases, four lines read


@pytest.mark.timeout(30)
def test_interactive_without_a_terminal_explains_but_does_not_wait(
    demo: ModuleType,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """-i with stdin not a terminal explains each phase, says so, and reads nothing."""
    stdin = io.StringIO("\n" * 5)
    monkeypatch.setattr("sys.stdin", stdin)
    assert demo.main(["-i", "-r", "20", *FAST]) == 0
    out = capsys.readouterr().out
    assert "stdin is not a terminal" in out
    assert "The protected run" in out
    assert stdin.read() == "\n" * 5


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-r", "0"], "argument -r/--requests: 0 is out of range: give 1 to 10000"),
        (["-r", "10001"], "10001 is out of range: give 1 to 10000"),
        (["--requests", "many"], "'many' is not a whole number"),
        (["-c", "6"], "argument -c/--cities: 6 is out of range: give 1 to 5"),
        (["-t", "0"], "argument -t/--threads: 0 is out of range"),
        (["--latency", "-1"], "argument --latency: -1 is out of range"),
        (["--latency", "inf"], "argument --latency: inf is out of range"),
        (["--no-protection", "--protected-only"], "not allowed with argument"),
        (["--redis-url", "http://localhost"], "is not a Redis URL"),
        (["--base-delay", "0.5", "--max-delay", "0.2"], "--max-delay 0.2 is shorter"),
    ],
)
@pytest.mark.timeout(10)
def test_bad_values_exit_with_status_2_and_say_why(
    demo: ModuleType,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    """A value out of range is a one-line error and exit status 2, not a traceback."""
    assert demo.main(argv) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert "Traceback" not in captured.err + captured.out


@pytest.mark.timeout(10)
def test_processes_without_redis_exit_with_status_2(
    demo: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    """--processes without --redis-url is refused: Redis is required to share a cache."""
    assert demo.main(["--processes", "2"]) == 2
    assert (
        "--processes 2 needs --redis-url: Redis is required" in capsys.readouterr().err
    )


@pytest.mark.timeout(10)
def test_unreachable_redis_exits_with_status_2(
    demo: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    """A --redis-url that nothing answers is an error message and exit status 2."""
    with socket.socket() as sock:  # a port nobody listens on: bound, never listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        assert demo.main(["--redis-url", f"redis://127.0.0.1:{port}/0"]) == 2
    assert "cannot reach Redis at" in capsys.readouterr().err


@pytest.mark.timeout(10)
def test_help_exits_with_status_0(
    demo: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    """--help lists the demo's options and returns 0."""
    assert demo.main(["--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--requests", "--cities", "--threads", "--verbose", "--flush"):
        assert option in out


@pytest.mark.timeout(30)
def test_redis_run_calls_the_api_once_per_city(
    demo: ModuleType,
    upstream: list[dict[str, int]],
    redis_url: str,
    demo_keys_cleaned: redis.Redis,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """On a real Redis, 300 concurrent requests for 3 cities make 3 API calls."""
    argv = ["-r", "300", "-c", "3", "--redis-url", redis_url, "--flush", *FAST]
    assert demo.main(argv) == 0
    assert upstream[-1] == {"paris": 1, "tokyo": 1, "lima": 1}
    assert "OK: protection held" in capsys.readouterr().out


@pytest.mark.timeout(30)
def test_flush_deletes_only_the_demo_keys(
    demo: ModuleType,
    redis_url: str,
    redis_prefix: str,
    demo_keys_cleaned: redis.Redis,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--flush deletes the keys under sg-demo: and leaves every other key alone."""
    client = demo_keys_cleaned
    client.set(f"{redis_prefix}:not-the-demos", b"kept")
    client.set("sg-demo:left-from-before", b"stale")
    argv = ["-r", "10", "-c", "1", "--protected-only", "--redis-url", redis_url]
    assert demo.main([*argv, "--flush", *FAST]) == 0
    assert client.get(f"{redis_prefix}:not-the-demos") == b"kept"
    assert client.get("sg-demo:left-from-before") is None
    assert "--flush: deleted 1 demo key (sg-demo:*)" in capsys.readouterr().out


@pytest.mark.timeout(30)
def test_rerun_without_flush_warns_that_the_cache_is_warm(
    demo: ModuleType,
    upstream: list[dict[str, int]],
    redis_url: str,
    demo_keys_cleaned: redis.Redis,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A second run without --flush is served from the cache, and says so."""
    argv = ["-r", "20", "-c", "2", "--protected-only", "--redis-url", redis_url, *FAST]
    assert demo.main([*argv, "--flush"]) == 0
    capsys.readouterr()
    assert demo.main(argv) == 0
    assert upstream[-1] == {}
    out = capsys.readouterr().out
    assert "already holds 2 cached values" in out
    assert "made no API call" in out


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_processes_on_redis_call_the_api_once_per_city(
    demo: ModuleType,
    upstream: list[dict[str, int]],
    redis_url: str,
    demo_keys_cleaned: redis.Redis,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Two worker processes share Redis: one API call per city, as the server counts."""
    argv = ["-r", "200", "-c", "2", "--processes", "2", "--redis-url", redis_url]
    assert demo.main([*argv, "--flush", "--latency", "0.2"]) == 0
    unprotected, protected = upstream
    assert sum(unprotected.values()) > 2  # the stampede happened without protection
    assert protected == {"paris": 1, "tokyo": 1}
    out = capsys.readouterr().out
    assert "200 threads in 2 processes" in out
    assert "API calls per city, protected: paris 1, tokyo 1" in out


@pytest.mark.timeout(30)
def test_unprotected_failures_are_charged_to_the_unprotected_run(
    demo: ModuleType,
    weather: ModuleType,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Failed unprotected requests are reported as that run's, and protection still passes."""
    # The server numbers its requests from 1: the first 10 are all in the unprotected
    # run, whose 100 concurrent requests all miss while the API takes 0.3 s.
    with_fault(demo, weather, monkeypatch, lambda _city, call: call <= 10)
    assert demo.main(["-r", "100", "-c", "2", "--latency", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "unprotected run: 100 requests in" in out
    assert ", 10 failed" in out
    assert "10 of the 100 unprotected requests failed: HTTPError: HTTP Error 503" in out
    assert "Unprotected run: 10 of 100 requests failed" in out
    assert "OK: protection held" in out
    assert "FAILED" not in out


@pytest.mark.timeout(30)
def test_unprotected_only_failures_are_reported_with_exit_status_0(
    demo: ModuleType,
    weather: ModuleType,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--no-protection has no protection to judge: its failures are reported, status 0."""
    with_fault(demo, weather, monkeypatch, lambda _city, call: call <= 5)
    argv = ["--no-protection", "-r", "50", "-c", "1", "--latency", "0.3"]
    assert demo.main(argv) == 0
    out = capsys.readouterr().out
    assert "Unprotected run: 5 of 50 requests failed" in out
    assert "there is no protected run to judge" in out
    assert "target (" not in out  # an unprotected run has no targets to miss


@pytest.mark.timeout(30)
def test_failed_protected_requests_exit_with_status_1(
    demo: ModuleType,
    weather: ModuleType,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An API that fails every protected call: the verdict and the status say so."""
    with_fault(demo, weather, monkeypatch, lambda _city, _call: True)
    argv = ["--protected-only", "-r", "10", "-c", "1", *FAST]
    assert demo.main(argv) == 1
    out = capsys.readouterr().out
    assert "FAILED: protection did not hold" in out
    assert "of them failed" in out
    assert re.search(r"failed requests\s+10\s+0\s+\S+ FAIL", out)


@pytest.mark.timeout(30)
def test_a_missed_target_is_named_in_the_verdict_too(
    demo: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    """A slow API misses the average-wait target: table and verdict both say so, status 0."""
    # Every waiter waits for the one API call, 0.7 s, against a 500 ms target.
    argv = ["--protected-only", "-r", "20", "-c", "1", "--latency", "0.7"]
    assert demo.main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"average wait\s+\d+ ms\s+< 500 ms\s+\S+ FAIL", out)
    verdict = " ".join(out[out.index("PROTECTION HELD") :].split())  # unwrapped
    assert "PROTECTION HELD, 1 TARGET MISSED:" in verdict
    assert "but missed average wait" in verdict
    assert "(target < 500 ms)" in verdict
    assert "OK:" not in out


def test_plural_counts_one_as_one() -> None:
    """plural() says "1 API call", "3 API calls", "1,000 requests", "2 cities"."""
    plural = importlib.import_module("demo_report").plural
    assert plural(1, "API call") == "1 API call"
    assert plural(3, "API call") == "3 API calls"
    assert plural(1000, "request") == "1,000 requests"
    assert plural(0, "request") == "0 requests"
    assert plural(2, "city", "cities") == "2 cities"


@pytest.mark.timeout(30)
def test_a_single_request_is_counted_in_the_singular(
    demo: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    """-r 1 -c 1: "1 request", "1 API call", "1 city", "1 thread", never "1 requests"."""
    assert demo.main(["-r", "1", "-c", "1", *FAST]) == 0
    out = capsys.readouterr().out
    assert "1 concurrent request for the weather in 1 city (paris)" in out
    assert "1 thread in 1 process" in out
    assert "protected run: 1 request in" in out
    assert "with protection, 1 request made 1 API call," in out
    wrong = re.findall(
        r"\b1 (?:API calls|requests|threads|cities|processes|keys)\b", out
    )
    assert wrong == []


@pytest.mark.timeout(30)
def test_the_server_counts_client_disconnects_without_a_traceback(
    weather: ModuleType, demo: ModuleType, capfd: pytest.CaptureFixture[str]
) -> None:
    """A client that resets its connection before the answer is counted, not printed."""
    with weather.WeatherAPI(0.2) as api:
        host, port = api.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"GET /weather?city=paris HTTP/1.1\r\nHost: x\r\n\r\n")
            until("the server received the request", lambda: api.total() == 1)
            # Linger 0: close() sends a reset, so the server's answer cannot be written.
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
        until("the server noticed the disconnect", lambda: api.errors.disconnects == 1)
        assert api.errors.errors() == {}
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err + captured.out
    assert "Error" not in captured.err


@pytest.mark.timeout(30)
def test_the_server_counts_its_own_failures_without_a_traceback(
    weather: ModuleType, demo: ModuleType, capfd: pytest.CaptureFixture[str]
) -> None:
    """An exception while serving drops the connection and is counted, not printed."""

    def broken(_city: str, _call: int) -> bool:
        raise RuntimeError("boom")

    with weather.WeatherAPI(0, fault=broken) as api:
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            weather.WeatherClient(api.url, timeout=5).get("paris")
        until("the server counted its failure", lambda: api.errors.errors() != {})
        assert api.errors.errors() == {"RuntimeError: boom": 1}
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.timeout(30)
def test_the_server_serves_max_connections_at_once_and_the_rest_in_turn(
    weather: ModuleType, demo: ModuleType
) -> None:
    """With max_connections=2, six 0.2 s requests all succeed, in at least 3 rounds."""
    answers: list[object] = []
    with weather.WeatherAPI(0.2, max_connections=2) as api:
        client = weather.WeatherClient(api.url, timeout=10)
        threads = [
            threading.Thread(target=lambda: answers.append(client.get("lima")))
            for _ in range(6)
        ]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        took = time.monotonic() - started
        assert api.calls() == {"lima": 6}
    assert len(answers) == 6
    assert took >= 3 * 0.2
