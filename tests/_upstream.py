"""A counting upstream for the framework tests: a slow HTTP API on a loopback port.

`Upstream` serves ``GET /<anything>`` from daemon threads of the test process, on a free
port of 127.0.0.1, after a fixed latency, and counts every request it receives per path
(counted on receipt, so a request its client gave up on still counts). It answers
``{"path": <path>, "served": <n>}`` as JSON, *n* being the request's number for that path,
so a test can tell a cached answer from a second upstream call. `expected_body` is the
answer to a path's first request. It never prints a traceback: a client that hangs up
early is not the test's failure.

    with Upstream(latency=0.3) as upstream:
        ...  # point the app at upstream.url, e.g. f"{upstream.url}/weather/oslo"
        assert upstream.calls() == {"/weather/oslo": 1}
"""

from __future__ import annotations

import collections
import json
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Self, cast
from urllib.parse import urlsplit

__all__ = ["Upstream", "expected_body"]


def expected_body(path: str) -> dict[str, object]:
    """Return what `Upstream` answers to the first request for *path*."""
    return {"path": path, "served": 1}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # a stampede connects all at once

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        super().__init__(("127.0.0.1", 0), _Handler)

    def handle_error(self, request: object, client_address: object) -> None:
        """Stay quiet: a client that hung up is not a server error."""


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        upstream = cast("_Server", self.server).upstream
        path = urlsplit(self.path).path
        served = upstream.count(path)
        time.sleep(upstream.latency)  # the slow, metered part of a real API
        body = json.dumps({"path": path, "served": served}).encode()
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - http.server's name
        """Log nothing: the counts are the record."""


class Upstream:
    """A slow HTTP API on a free loopback port that counts its requests per path.

    Args:
        latency: Seconds each request takes before it is answered.
    """

    def __init__(self, latency: float = 0.3) -> None:
        self.latency = latency
        self._lock = threading.Lock()
        self._calls: collections.Counter[str] = collections.Counter()
        self._server = _Server(self)
        host, port = self._server.server_address[:2]
        self.url = f"http://{host!s}:{port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="upstream", daemon=True
        )

    def count(self, path: str) -> int:
        """Count a request for *path*; return its number among that path's requests."""
        with self._lock:
            self._calls[path] += 1
            return self._calls[path]

    def calls(self) -> dict[str, int]:
        """Return the requests received so far, per path."""
        with self._lock:
            return dict(self._calls)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
