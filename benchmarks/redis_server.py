"""A private redis-server for one benchmark run: free loopback port, no persistence.

The benchmark never talks to any other Redis: it starts its own server, talks to it
only on 127.0.0.1, and stops exactly the process it started.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import redis

__all__ = ["RedisServer", "command_stats", "cpu_seconds"]

# Commands the harness itself sends around a measurement; never counted.
HARNESS_COMMANDS = frozenset({"config|resetstat", "info"})
_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 5.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """Start ``redis-server`` on a free 127.0.0.1 port; stop it on exit.

    Use as a context manager. ``url`` is where it listens, ``admin`` a client for the
    harness's own commands (FLUSHALL, CONFIG RESETSTAT, INFO).
    """

    def __init__(self, binary: str = "redis-server") -> None:
        found = shutil.which(binary)
        if found is None:
            msg = f"{binary} not found: install it (apt-get install redis-server)"
            raise RuntimeError(msg)
        self.binary = found
        self._workdir = tempfile.TemporaryDirectory(prefix="sg-bench-redis-")
        self._proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.url = ""
        self._admin: redis.Redis | None = None

    @property
    def admin(self) -> redis.Redis:
        """A client for the harness's own commands."""
        if self._admin is None:
            msg = "the server is not running"
            raise RuntimeError(msg)
        return self._admin

    def version(self) -> str:
        """Return the server's version, as INFO reports it."""
        return str(self.admin.info("server")["redis_version"])

    def start(self) -> None:
        """Start the server and wait until it answers PING."""
        workdir = Path(self._workdir.name)
        last_error = ""
        for _ in range(3):  # the port may be taken between the probe and the bind
            port = _free_port()
            log = (workdir / "redis.log").open("ab")
            proc = subprocess.Popen(  # noqa: S603 - our own binary, fixed arguments
                [
                    self.binary,
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(workdir),
                    "--maxclients",
                    "10000",
                    "--daemonize",
                    "no",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            log.close()
            client = redis.Redis(
                host="127.0.0.1", port=port, socket_timeout=30, socket_connect_timeout=1
            )
            deadline = time.monotonic() + _START_TIMEOUT
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    if (
                        client.ping()
                        and client.info("server")["process_id"] == proc.pid
                    ):
                        self._proc, self.port, self._admin = proc, port, client
                        self.url = f"redis://127.0.0.1:{port}/0"
                        return
                except redis.RedisError as exc:
                    last_error = repr(exc)
                time.sleep(0.05)
            client.close()
            self._kill(proc)
            last_error = last_error or (workdir / "redis.log").read_text()[-500:]
        msg = f"redis-server did not start: {last_error}"
        raise RuntimeError(msg)

    def stop(self) -> None:
        """Shut down the server this object started (and only that one)."""
        proc, self._proc = self._proc, None
        if self._admin is not None:
            try:
                if self._admin.info("server")["process_id"] == getattr(proc, "pid", -1):
                    self._admin.shutdown(nosave=True)
            except redis.RedisError:
                pass  # SHUTDOWN closes the connection under us
            finally:
                self._admin.close()
                self._admin = None
        if proc is not None:
            self._kill(proc)
        self._workdir.cleanup()

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes]) -> None:
        try:
            proc.wait(timeout=_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=_STOP_TIMEOUT)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def command_stats(client: redis.Redis) -> dict[str, int]:
    """Return calls per command from INFO commandstats, minus the harness's own.

    Commands run inside Lua scripts are counted too (Redis counts each
    ``redis.call``), and so is the EVAL/EVALSHA that ran them.
    """
    info = client.info("commandstats")
    calls: dict[str, int] = {}
    for name, stats in info.items():
        command = name.removeprefix("cmdstat_")
        if command in HARNESS_COMMANDS or not isinstance(stats, dict):
            continue
        calls[command] = int(stats["calls"])
    return calls


def cpu_seconds(client: redis.Redis) -> float:
    """Return the server's CPU time so far (user + system), in seconds."""
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
