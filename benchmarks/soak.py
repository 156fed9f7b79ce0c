"""Soak: steady load with faults injected, per fault: served, computed, errors, wrong values.

    uv run benchmarks/soak.py                 # about a minute
    uv run benchmarks/soak.py --phase-seconds 3

A private redis-server on a free loopback port (stopped at the end). Threads call one
decorated function over a few keys whose right value is known (it is derived from the
key), so a wrong value would show. Phases, each bounded in time: normal load; the
server paused (SIGSTOP) then resumed; the server's pub/sub connections killed; the
server killed and restarted on the same port (the cache empties); a function that
fails for a while. Prints one row per phase.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import redis

from stampede_guard import (
    RedisBackend,
    StampedeStats,
    StatsSnapshot,
    cached_stampede_safe,
)

KEYS = 20


class Server:
    """A private redis-server on a free loopback port, which the soak may pause or kill."""

    def __init__(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = self._start()

    def _start(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(  # noqa: S603 - our own server, fixed arguments
            [
                shutil.which("redis-server") or "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
        )
        admin = redis.Redis(port=self.port, socket_timeout=1)
        for _ in range(200):
            try:
                if admin.info("server")["process_id"] == proc.pid:
                    return proc
            except redis.RedisError:
                time.sleep(0.05)
        msg = "redis-server did not start"
        raise RuntimeError(msg)

    def admin(self) -> redis.Redis:
        """A client of our own for the soak's commands."""
        return redis.Redis(port=self.port, socket_timeout=1)

    def restart(self) -> None:
        """Kill the server (SIGKILL: its data is gone) and start a new one on the port."""
        self.proc.kill()
        self.proc.wait(5)
        self.proc = self._start()

    def stop(self) -> None:
        """Stop the server we started."""
        os.kill(self.proc.pid, signal.SIGCONT)
        self.proc.terminate()
        self.proc.wait(5)


def out(line: str = "", *, progress: bool = False) -> None:
    """Write a report line (stdout) or a progress line (stderr)."""
    (sys.stderr if progress else sys.stdout).write(line + "\n")


@dataclass
class Tally:
    """What the callers saw during one phase."""

    calls: int = 0
    errors: int = 0
    wrong: int = 0
    slowest: float = 0.0


class Load:
    """Threads calling the cached function until told to stop; counts what they see."""

    def __init__(self, call: Callable[[int], str], threads: int) -> None:
        self._call = call
        self._threads = threads
        self._tally = Tally()
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []

    def start(self) -> None:
        """Start the threads."""
        self._stop.clear()
        self._workers = [
            threading.Thread(target=self._run, daemon=True)
            for _ in range(self._threads)
        ]
        for worker in self._workers:
            worker.start()

    def stop(self) -> Tally:
        """Stop the threads (bounded) and return the phase's tally."""
        self._stop.set()
        for worker in self._workers:
            worker.join(30)
        with self._guard:
            tally, self._tally = self._tally, Tally()
        return tally

    def _run(self) -> None:
        rng = random.Random()  # noqa: S311 - picks keys, not secrets
        while not self._stop.is_set():
            key = rng.randrange(KEYS)
            started = time.monotonic()
            try:
                value = self._call(key)
                wrong = not value.startswith(f"value-{key}:")
                error = False
            except Exception:  # noqa: BLE001 - counted: the soak reports every failure
                wrong, error = False, True
            elapsed = time.monotonic() - started
            with self._guard:
                self._tally.calls += 1
                self._tally.errors += error
                self._tally.wrong += wrong
                self._tally.slowest = max(self._tally.slowest, elapsed)
            time.sleep(0.002)


def main() -> int:  # noqa: PLR0915 - one linear script of phases
    """Run every phase and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase-seconds", type=float, default=8.0)
    parser.add_argument("--threads", type=int, default=16)
    args = parser.parse_args()

    failing = threading.Event()
    computations: Counter[str] = Counter()
    guard = threading.Lock()
    rows: list[tuple[str, Tally, int, StatsSnapshot]] = []

    server = Server()
    try:
        backend = RedisBackend.from_url(
            server.url, socket_timeout=0.5, connect_timeout=0.5
        )
        stats = StampedeStats()

        @cached_stampede_safe(
            key="soak:{key}",
            backend=backend,
            ttl=2,
            lock_timeout=1,
            stale_ttl=5,
            metrics=stats,
        )
        def value_of(key: int) -> str:
            with guard:
                computations["n"] += 1
            time.sleep(0.05)
            if failing.is_set():
                msg = "upstream down"
                raise RuntimeError(msg)
            return f"value-{key}:{time.time():.3f}"

        load = Load(value_of, args.threads)

        def pid() -> int:
            return server.proc.pid

        def phase(
            name: str, fault: Callable[[], None], heal: Callable[[], None]
        ) -> None:
            out(f"phase: {name}", progress=True)
            before = computations["n"]
            stats.reset()
            load.start()
            time.sleep(args.phase_seconds / 3)
            fault()
            time.sleep(args.phase_seconds / 3)
            heal()
            time.sleep(args.phase_seconds / 3)
            rows.append(
                (name, load.stop(), computations["n"] - before, stats.snapshot())
            )

        def nothing() -> None:
            pass

        def kill_pubsub() -> None:
            server.admin().client_kill_filter(_type="pubsub")

        def restart() -> None:
            server.restart()

        phase("normal load", nothing, nothing)
        phase(
            "server paused 1/3 of the phase",
            lambda: os.kill(pid(), signal.SIGSTOP),
            lambda: os.kill(pid(), signal.SIGCONT),
        )
        phase("pub/sub connections killed", kill_pubsub, nothing)
        phase("server killed and restarted (empty)", restart, nothing)
        phase("function failing 1/3 of the phase", failing.set, failing.clear)
        backend.close()
    finally:
        server.stop()

    out(
        f"\nSoak: {args.threads} threads over {KEYS} keys, {args.phase_seconds} s per phase, ttl 2 s, stale_ttl 5 s, lock_timeout 1 s\n"
    )
    header = (
        "phase",
        "calls",
        "errors",
        "wrong values",
        "computations",
        "backend errors",
        "stale served",
        "slowest call s",
    )
    out("| " + " | ".join(header) + " |")
    out("|---|" + "---:|" * (len(header) - 1))
    for name, tally, computed, snap in rows:
        cells = (
            name,
            f"{tally.calls:,}",
            str(tally.errors),
            str(tally.wrong),
            str(computed),
            str(snap.backend_errors),
            str(snap.stale_served),
            f"{tally.slowest:.2f}",
        )
        out("| " + " | ".join(cells) + " |")
    return 1 if any(t.wrong for _, t, _, _ in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
