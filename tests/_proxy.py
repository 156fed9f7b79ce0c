"""A black-holing TCP proxy for real-server tests: a connection that stops answering.

A black-holed connection stays open at both ends and passes nothing in either
direction, which is what a half-open connection (a firewall or a NAT that forgot it)
looks like to its client. New connections pass as usual.
"""

from __future__ import annotations

import contextlib
import socket
import threading

__all__ = ["Proxy"]


class _Pair:
    """One proxied connection: the client's socket and ours to the server."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client, self.upstream = client, upstream
        self.port: int = upstream.getsockname()[1]  # the client's port, to the server
        self.blackholed = False

    def pump(self, src: socket.socket, dst: socket.socket) -> None:
        """Copy *src* to *dst* until either closes; drop everything once black-holed."""
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if not self.blackholed:
                    dst.sendall(data)
            if not self.blackholed:  # a black hole does not pass a FIN on either
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.close()


class Proxy:
    """A TCP proxy on loopback to *host*:*port*; `blackhole` silences open connections.

    A black-holed connection stays open at both ends and passes nothing in either
    direction: what a half-open connection looks like to its client. New connections
    pass as usual.
    """

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._server.getsockname()[1]
        self._pairs: list[_Pair] = []
        self._mutex = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def blackhole(self, ports: set[int] | None = None) -> int:
        """Black-hole the open connections whose port, as the server sees it, is in
        *ports* (every open connection if None); return how many."""
        with self._mutex:
            chosen = [p for p in self._pairs if ports is None or p.port in ports]
        for pair in chosen:
            pair.blackholed = True
        return len(chosen)

    def close(self) -> None:
        self._server.close()
        with self._mutex:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            pair.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
                upstream = socket.create_connection(self._target, timeout=5)
            except OSError:
                return  # closed
            upstream.settimeout(None)
            pair = _Pair(client, upstream)
            with self._mutex:
                self._pairs.append(pair)
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=pair.pump, args=(src, dst), daemon=True).start()
