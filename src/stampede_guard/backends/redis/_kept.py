"""Commands on kept connections, for the single-server pools that `from_url` builds.

A hit is the call this library makes most, and a GET through a redis-py client costs
about twice the round trip itself on loopback (redis-py 8.1: ~70 us, of which ~35 are
the pool's checkout and release, with a ``poll()`` of the socket and observability
counters, and the command's dispatch). So a backend built by `from_url` on one server
keeps a few connections of its pool aside and sends its commands (the GET of a hit
and the script calls of a miss) on them directly.

Why this stays safe:

* The kept connections are still the pool's: it counts them as in use, so its limit
  holds, and at most `keep_for` of them are idle aside at once, fewer than it has, so
  a caller waiting on the pool gets one as soon as the others are done.
* A connection whose send or read failed or was interrupted (a timeout, a
  cancellation, any exception but an error reply) is disconnected before it goes
  back, so a reply left unread can never be taken for the next command's.
* A dropped connection (the server restarted, or closed it while it sat idle) is
  retried once on a fresh one, as the client `from_url` builds would.
* A forked child never uses its parent's kept connections (checked by pid).

Sentinel and cluster clients choose a server per command; their backends keep using
the client.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

__all__ = ["AsyncKeptConnections", "KeptConnections", "keep_for"]

KEEP_MOST = 16  # idle connections kept aside, at most

Keys = Sequence[str]
Args = Sequence[object]


def keep_for(max_connections: int) -> int:
    """Return how many idle connections to keep aside from a pool of *max_connections*.

    A quarter of the pool (at most `KEEP_MOST`), so most of it stays with the pool
    for pub/sub and for callers of the client.
    """
    return min(KEEP_MOST, max_connections // 4)


def _never(_connection: Any) -> bool:
    return False


class _Kept:
    """What both kinds share: the idle connections, the errors, the checkout call."""

    def __init__(self, pool: Any, package: str, keep: int) -> None:
        exceptions = importlib.import_module(f"{package}.exceptions")
        self._pool = pool
        self._dropped: type[Exception] = exceptions.ConnectionError
        self._replied: type[Exception] = exceptions.ResponseError
        self._no_script: type[Exception] = exceptions.NoScriptError
        self._keep = keep
        self._idle: deque[Any] = deque()  # append and pop are atomic: no lock needed
        self._pid = os.getpid()
        # redis-py >= 6 flags a connection to reconnect (its server is moving, in
        # Redis Enterprise); the pool handles that on release, so it is not kept.
        self._should_reconnect: Callable[[Any], bool] = getattr(
            pool.connection_class, "should_reconnect", _never
        )
        # redis-py 5.3 made the command name optional and deprecated it; valkey-py
        # and older redis-py require it.
        param = inspect.signature(pool.get_connection).parameters.get("command_name")
        needs_name = param is not None and param.default is param.empty
        self._checkout: tuple[str, ...] = ("GET",) if needs_name else ()

    def _take(self) -> Any:
        """Return a kept connection, or None if none is idle."""
        if self._pid != os.getpid():
            # A forked child: the sockets are the parent's. Drop them unused (the
            # child's pool resets itself the same way).
            self._idle = deque()
            self._pid = os.getpid()
        try:
            return self._idle.pop()
        except IndexError:
            return None

    def _keeps(self, connection: Any) -> bool:
        """Keep *connection* if there is room and it is healthy; else it goes back."""
        # Two threads may both see room and both keep: the bound is loose by the few
        # threads racing, far from the pool's limit.
        if len(self._idle) >= self._keep or self._should_reconnect(connection):
            return False
        self._idle.append(connection)
        return True

    def _drain(self) -> list[Any]:
        taken = []
        while (connection := self._take()) is not None:
            taken.append(connection)
        return taken


class KeptConnections(_Kept):
    """Commands on kept connections of a redis-py (or valkey-py) sync pool."""

    def _execute(self, *command: object) -> Any:
        connection = self._take()
        if connection is None:
            connection = self._pool.get_connection(*self._checkout)
        try:
            try:
                connection.send_command(*command)
                reply = connection.read_response()
            except self._dropped:
                connection.disconnect()
                connection.send_command(*command)  # reconnects first
                reply = connection.read_response()
        except self._replied:  # an error reply, read whole: the connection is fine
            if not self._keeps(connection):
                self._pool.release(connection)
            raise
        except BaseException:
            connection.disconnect()  # a reply may be left unread: never reuse it
            self._pool.release(connection)
            raise
        if not self._keeps(connection):
            self._pool.release(connection)
        return reply

    def get(self, name: str) -> bytes | None:
        """Return the bytes at *name*: one GET."""
        reply: bytes | None = self._execute("GET", name)
        return reply

    def script(self, script: Any) -> Callable[[Keys, Args], Any]:
        """Return a caller of *script* (a registered ``Script``) by its digest."""

        def call(keys: Keys, args: Args) -> Any:
            try:
                return self._execute("EVALSHA", script.sha, len(keys), *keys, *args)
            except self._no_script:  # a new or flushed server: send it, then call
                self._execute("SCRIPT", "LOAD", script.script)
                return self._execute("EVALSHA", script.sha, len(keys), *keys, *args)

        return call

    def close(self) -> None:
        """Give every kept connection back to the pool."""
        for connection in self._drain():
            self._pool.release(connection)


class AsyncKeptConnections(_Kept):
    """`KeptConnections` for a ``redis.asyncio`` (or ``valkey.asyncio``) pool."""

    async def _execute(self, *command: object) -> Any:
        connection = self._take()
        if connection is None:
            connection = await self._pool.get_connection(*self._checkout)
        try:
            try:
                await connection.send_command(*command)
                reply = await connection.read_response()
            except self._dropped:
                await connection.disconnect(nowait=True)
                await connection.send_command(*command)  # reconnects first
                reply = await connection.read_response()
        except self._replied:  # an error reply, read whole: the connection is fine
            if not self._keeps(connection):
                await self._pool.release(connection)
            raise
        except BaseException:
            # A cancelled read included: its reply may still come. Never reuse it.
            await connection.disconnect(nowait=True)
            await self._pool.release(connection)
            raise
        if not self._keeps(connection):
            await self._pool.release(connection)
        return reply

    async def get(self, name: str) -> bytes | None:
        """Return the bytes at *name*: one GET."""
        reply: bytes | None = await self._execute("GET", name)
        return reply

    def script(self, script: Any) -> Callable[[Keys, Args], Awaitable[Any]]:
        """Return a caller of *script* (a registered ``Script``) by its digest."""

        async def call(keys: Keys, args: Args) -> Any:
            try:
                return await self._execute(
                    "EVALSHA", script.sha, len(keys), *keys, *args
                )
            except self._no_script:  # a new or flushed server: send it, then call
                await self._execute("SCRIPT", "LOAD", script.script)
                return await self._execute(
                    "EVALSHA", script.sha, len(keys), *keys, *args
                )

        return call

    async def close(self) -> None:
        """Give every kept connection back to the pool."""
        for connection in self._drain():
            await self._pool.release(connection)
