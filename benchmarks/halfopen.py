"""Wake-up latency of a waiter before, during and after its connections are black-holed.

The fault: once existing connections were black-holed (new ones still pass), waiters'
wake-up used to go from ~2 ms to ~750 ms and never recover. This script has one waiter
process (a `RedisBackend` through a TCP proxy) wait on a key that a leader (a backend
straight to the server) holds, again and again, and times from the leader's store to
the waiter's return. Halfway, every connection the proxy carries is black-holed: it
stays open and passes nothing. The table gives the medians by phase.

    uv run benchmarks/halfopen.py [--seconds 20]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import socket
import statistics
import sys
import threading
import time

from redis_server import RedisServer
from stampede_guard import RedisBackend, cached_stampede_safe
from stampede_guard.metrics import Event, Miss

BEFORE_S = 5.0  # seconds of rounds before the black hole
PHASES = ((-1e9, 0.0, "before"), (0.0, 5.0, "0-5 s after"), (5.0, 1e9, "5 s+ after"))


class Proxy:
    """A loopback TCP proxy to *port* whose open connections `blackhole` silences."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self._server.getsockname()[1]}/0"
        self._open: list[list[bool]] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def blackhole(self) -> int:
        """Black-hole every connection open now; return how many."""
        for flag in self._open:
            flag[0] = True
        return len(self._open)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self._port))
            flag = [False]
            self._open.append(flag)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(a, b, flag), daemon=True).start()

    def close(self) -> None:
        """Accept no more connections."""
        self._server.close()


def _pump(src: socket.socket, dst: socket.socket, flag: list[bool]) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            if not flag[0]:
                dst.sendall(data)


class _Count(logging.Handler):
    """Counts the log records it is given."""

    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        sys.stderr.write(f"logged: {record.getMessage()}\n")


def one_round(leader: RedisBackend, waiter: RedisBackend, key: str) -> float | None:
    """Return the seconds from the leader's store to the waiter's return.

    None if the waiter computed the value itself (its backend failed).
    """
    computed: list[bool] = []
    missed, release, stored = threading.Event(), threading.Event(), [0.0]

    @cached_stampede_safe(key=key, backend=leader, lock_timeout=30)
    def lead() -> str:
        release.wait(30)
        return "v"

    def hook(event: Event, /) -> None:
        if isinstance(event, Miss):
            missed.set()

    @cached_stampede_safe(key=key, backend=waiter, metrics=hook, lock_timeout=30)
    def wait() -> str:
        computed.append(True)
        return "v"

    leading = threading.Thread(
        target=lambda: (lead(), stored.__setitem__(0, time.monotonic()))
    )
    leading.start()
    time.sleep(0.02)  # the leader holds the lock
    woken = [0.0]
    waiting = threading.Thread(
        target=lambda: (wait(), woken.__setitem__(0, time.monotonic()))
    )
    waiting.start()
    while not missed.wait(0.005) and waiting.is_alive():
        pass  # until it waits, or returned without waiting (its backend failed)
    time.sleep(0.02)  # subscribed and waiting
    release.set()
    leading.join(30)
    waiting.join(30)
    return None if computed else woken[0] - stored[0]


def main() -> None:
    """Measure, then print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seconds", type=float, default=20.0, help="after the black hole"
    )
    args = parser.parse_args()
    warnings = _Count(logging.WARNING)
    logging.getLogger("stampede_guard").addHandler(warnings)
    server = RedisServer()
    server.start()
    proxy = Proxy(server.port)
    leader = RedisBackend.from_url(server.url, prefix="hb")
    waiter = RedisBackend.from_url(proxy.url, prefix="hb")
    # (seconds from the black hole to the round's start, latency or None)
    samples: list[tuple[float, float | None]] = []
    try:
        start, n = time.monotonic(), 0
        while time.monotonic() - start < BEFORE_S:
            samples.append((-1.0, one_round(leader, waiter, f"k{n}")))
            n += 1
        holed_at, holed = time.monotonic(), proxy.blackhole()
        while time.monotonic() - holed_at < args.seconds:
            began = time.monotonic() - holed_at
            samples.append((began, one_round(leader, waiter, f"k{n}")))
            n += 1
    finally:
        waiter.close()
        leader.close()
        proxy.close()
        server.stop()
    out(f"black-holed {holed} connections; warnings logged: {warnings.count}")
    out("| phase | rounds | waiter computed | median wake ms | max wake ms |")
    out("|---|---:|---:|---:|---:|")
    for low, high, name in PHASES:
        phase = [lat for at, lat in samples if low <= at < high]
        got = [lat * 1000 for lat in phase if lat is not None]
        median = f"{statistics.median(got):.1f}" if got else "-"
        most = f"{max(got):.1f}" if got else "-"
        out(f"| {name} | {len(phase)} | {len(phase) - len(got)} | {median} | {most} |")


def out(line: str) -> None:
    """Print *line* on stdout."""
    sys.stdout.write(line + "\n")


if __name__ == "__main__":
    main()
