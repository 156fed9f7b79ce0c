"""The demo's upstream: a real HTTP weather API on a loopback port, slow on purpose.

`WeatherAPI` serves ``GET /weather?city=<name>`` from a thread of the process that
starts it, answers each request after a fixed latency, and counts every request it
receives, per city. The demo reports that count, the server's own, rather than what
the clients believe they sent. Like a real server, it handles a bounded number of
connections at once (the rest wait in the kernel's accept queue), and it never prints
a traceback: a client that hangs up early, or a request it could not serve, is counted
and reported by the demo. `WeatherClient` is what the demo's cached function
calls: one plain HTTP request per call, no keep-alive, no proxy.

A helper of ``demo_stampede_prevention.py``; it has no command line of its own.
"""

from __future__ import annotations

import collections
import json
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Self, cast
from urllib.parse import parse_qs, urlencode, urlsplit

__all__ = [
    "MAX_CONNECTIONS",
    "Fault",
    "ServerErrors",
    "Weather",
    "WeatherAPI",
    "WeatherClient",
]

Weather = dict[str, object]
#: Decides, for each request (its city and its number among all requests), whether
#: the API fails it with 503 Service Unavailable: how a test makes one run fail.
Fault = Callable[[str, int], bool]

# The kernel caps the accept backlog at net.core.somaxconn (4096 on current Linux,
# 128 on macOS). Thousands of unprotected requests connect at once; a short backlog
# would only make the excess retry their SYN a second later, not fail.
_BACKLOG = 4096
#: Connections served at once, each on a thread of its own. Unbounded, an unprotected
#: run of 10,000 requests needed 10,000 server threads and sockets on top of the
#: client's: on a small machine thread creation failed ("can't start new thread") and
#: the open-files limit ran out, and clients were dropped. The others wait in the
#: accept queue, as they would at a real server, and are served in turn.
MAX_CONNECTIONS = 1000
# A client that hangs up before its answer is written: not the server's fault.
_DISCONNECTS = (
    BrokenPipeError,
    ConnectionResetError,
    ConnectionAbortedError,
    TimeoutError,
)
_SKIES = ("clear", "cloudy", "rain", "fog", "snow", "wind")


class _Server(ThreadingHTTPServer):
    """A ThreadingHTTPServer that knows its `WeatherAPI`, at most *slots* connections.

    One daemon thread a connection. Before accepting a connection it waits for a free
    slot, so the connections beyond *slots* hold no thread and no socket here.
    """

    request_queue_size = _BACKLOG
    daemon_threads = True

    def __init__(self, api: WeatherAPI, slots: int) -> None:
        self.api = api
        self._slots = threading.BoundedSemaphore(slots)
        super().__init__(("127.0.0.1", 0), _Handler)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        self._slots.acquire()
        try:
            return cast("tuple[socket.socket, tuple[str, int]]", super().get_request())
        except BaseException:
            self._slots.release()
            raise

    def shutdown_request(self, request: object) -> None:
        # socketserver calls this exactly once for every accepted connection: after
        # its handler, after a failed handler, and after a failed thread start.
        try:
            super().shutdown_request(request)  # type: ignore[arg-type]
        finally:
            self._slots.release()

    def handle_error(self, request: object, client_address: object) -> None:  # noqa: ARG002 - socketserver's signature
        """Count the failure instead of printing its traceback on stderr."""
        self.api.errors.note(sys.exc_info()[1])


class _Handler(BaseHTTPRequestHandler):
    """Answer ``/weather?city=...`` after the API's latency; anything else is a 404."""

    server_version = "DemoWeatherAPI/1.0"

    def do_GET(self) -> None:
        api = cast("_Server", self.server).api
        url = urlsplit(self.path)
        if url.path != "/weather":
            self._reply(HTTPStatus.NOT_FOUND, {"error": f"no such path: {url.path}"})
            return
        city = parse_qs(url.query).get("city", [""])[0]
        # Counted on receipt: a request that its client gives up on still costs.
        call = api.count(city)
        time.sleep(api.latency)  # the slow, metered part of a real weather API
        if not city:
            self._reply(HTTPStatus.BAD_REQUEST, {"error": "give ?city=<name>"})
            return
        if api.fault is not None and api.fault(city, call):
            error: Weather = {"error": f"call {call} failed on purpose"}
            self._reply(HTTPStatus.SERVICE_UNAVAILABLE, error)
            return
        self._reply(HTTPStatus.OK, _forecast(city, call))

    def _reply(self, status: HTTPStatus, body: Weather) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        """Stay quiet: the demo prints its own report."""


def _forecast(city: str, call: int) -> Weather:
    """Return a made-up but stable forecast, and which call of the server produced it."""
    seed = sum(map(ord, city))
    return {
        "city": city,
        "temp_c": seed % 35 - 5,
        "sky": _SKIES[seed % len(_SKIES)],
        "call": call,  # lets every caller show which upstream call served it
    }


class ServerErrors:
    """What went wrong while serving, counted instead of printed (thread-safe).

    A *disconnect* is a client that hung up before its answer was written (a broken
    pipe, a reset connection, a timed-out read); any other exception is an *error*,
    kept by its type and message.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._disconnects = 0
        self._errors: collections.Counter[str] = collections.Counter()

    def note(self, exc: BaseException | None) -> None:
        """Count *exc*, raised while serving a connection."""
        with self._lock:
            if isinstance(exc, _DISCONNECTS):
                self._disconnects += 1
            else:
                self._errors[f"{type(exc).__name__}: {exc}"] += 1

    @property
    def disconnects(self) -> int:
        """Return how many clients hung up before their answer (since `reset`)."""
        with self._lock:
            return self._disconnects

    def errors(self) -> dict[str, int]:
        """Return the other failures, ``"Type: message"`` to how many (since `reset`)."""
        with self._lock:
            return dict(self._errors)

    def reset(self) -> None:
        """Set the counts back to zero."""
        with self._lock:
            self._disconnects = 0
            self._errors.clear()


class WeatherAPI:
    """A weather API on ``127.0.0.1`` (a free port) that counts the requests it receives.

    Use it as a context manager: the server runs in a daemon thread from ``__enter__``
    until ``__exit__``. What goes wrong while serving is counted in `errors`, never
    printed.

    Args:
        latency: Seconds each request takes before it is answered, as a slow upstream
            would. Requests are served concurrently, one thread each.
        max_connections: How many connections are served at once; the others wait
            in the accept queue until one ends.
        fault: Called for each request with its city and number; when it returns
            True the request is answered 503 Service Unavailable (still counted).
    """

    def __init__(
        self,
        latency: float,
        *,
        max_connections: int = MAX_CONNECTIONS,
        fault: Fault | None = None,
    ) -> None:
        self.latency = latency
        self.max_connections = max_connections
        self.fault = fault
        self.errors = ServerErrors()
        self._lock = threading.Lock()
        self._calls: collections.Counter[str] = collections.Counter()
        self._numbered = 0  # every request ever received, for the "call" field
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Self:
        self._server = _Server(self, self.max_connections)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="weather-api",
            daemon=True,
        )
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        self._server = self._thread = None

    @property
    def url(self) -> str:
        """Return the base URL, ``http://127.0.0.1:<port>``."""
        if self._server is None:
            msg = "the weather API is not running: use it as a context manager"
            raise RuntimeError(msg)
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def count(self, city: str) -> int:
        """Count one request for *city*; return its number among all requests so far."""
        with self._lock:
            self._calls[city] += 1
            self._numbered += 1
            return self._numbered

    def calls(self) -> dict[str, int]:
        """Return how many requests the server has received per city (since `reset`)."""
        with self._lock:
            return dict(self._calls)

    def total(self) -> int:
        """Return how many requests the server has received in all (since `reset`)."""
        with self._lock:
            return sum(self._calls.values())

    def reset(self) -> None:
        """Set the counts and `errors` back to zero; request numbers stay unique."""
        with self._lock:
            self._calls.clear()
        self.errors.reset()


class WeatherClient:
    """Call a `WeatherAPI` over HTTP: a new connection per call, and never a proxy.

    Args:
        base_url: The API's `WeatherAPI.url`.
        timeout: Seconds to wait for connecting and for each read.
    """

    def __init__(self, base_url: str, timeout: float = 30.0) -> None:
        self._base_url = base_url
        self._timeout = timeout
        # An http_proxy in the environment must not capture loopback traffic.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def get(self, city: str) -> Weather:
        """Return the forecast for *city*; raise `urllib.error.URLError` on failure."""
        url = f"{self._base_url}/weather?{urlencode({'city': city})}"
        try:
            with self._opener.open(url, timeout=self._timeout) as response:
                body: object = json.load(response)
        except urllib.error.HTTPError as exc:
            exc.close()  # it holds the error answer's connection open until closed
            raise
        if not isinstance(body, dict):
            msg = f"the weather API answered {body!r}, not a JSON object"
            raise TypeError(msg)
        return cast("Weather", body)
