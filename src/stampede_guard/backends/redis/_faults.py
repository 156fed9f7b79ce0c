"""What a Redis backend tells about its failures: where, why, and whether to stop asking.

* `Servers` names the server a key's commands go to (``host:port``, a socket path, or
  the cluster node owning the key's slot), for error messages and for the breakers.
  Never a password: only the address is read from the client.
* `refusal` tells a refused write (``READONLY`` from a replica, ``OOM`` under
  ``noeviction``...) from other failures: reads still work there, so the breaker must
  not take a successful read for a recovery.
* `Faults` holds the circuit breakers: one for a single server (or a Sentinel
  service), one per node for a cluster, shared by every function on the backend, so
  fifty functions on one hung server pay its timeout five times in all, not each.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from stampede_guard._breaker import CircuitBreaker
from stampede_guard._errors import BackendError

__all__ = ["Faults", "Servers", "refusal"]

# Error replies of a server that reads but will not write. redis-py maps the first two
# to their own classes (ReadOnlyError, OutOfMemoryError); the rest stay ResponseErrors.
_REFUSALS = ("READONLY", "OOM", "MISCONF", "NOREPLICAS", "NOTENOUGHREPLICAS")
_REFUSAL_CLASSES = {"ReadOnlyError": "READONLY", "OutOfMemoryError": "OOM"}


def refusal(error: BaseException | None) -> str | None:
    """Return the server's reason (``"READONLY: ..."``) if *error* refused a write."""
    if error is None:
        return None
    message = str(error)
    for kind in type(error).__mro__:
        code = _REFUSAL_CLASSES.get(kind.__name__)
        if code is not None:
            return f"{code} {message}"
    if type(error).__name__ == "ResponseError" and message.startswith(_REFUSALS):
        return message
    return None


_LONGEST_RESET = 3600.0


def _check_breaker(failures: object, reset_after: object) -> None:
    # Takes objects: for callers whose types mypy never saw.
    if isinstance(failures, bool) or not isinstance(failures, int) or failures < 1:
        msg = f"breaker_failures={failures!r} must be an int >= 1 (failures in a row that open the circuit)"
        raise ValueError(msg)
    if (
        isinstance(reset_after, bool)
        or not isinstance(reset_after, int | float)
        or not 0 < reset_after <= _LONGEST_RESET
    ):
        msg = f"breaker_reset={reset_after!r} must be seconds in (0, 3600] (how long an open circuit skips the server)"
        raise ValueError(msg)


def _node_of(client: Any) -> str:
    try:
        return str(client.get_default_node().name)
    except Exception:  # noqa: BLE001 - a name is a courtesy, never a new failure
        return "its nodes"


def _address(options: dict[str, Any]) -> str | None:
    if options.get("path"):
        return f"unix:{options['path']}"
    host, port = options.get("host"), options.get("port")
    if host is None:
        return None
    host = f"[{host}]" if ":" in str(host) else host
    return f"{host}:{port}"


class Servers:
    """Name the server that serves a key, for one client."""

    def __init__(self, client: Any) -> None:
        self._cluster = hasattr(client, "get_primaries")
        self._client = client
        self._name = "redis"
        self._described = "redis"
        if self._cluster:
            self._described = f"cluster at {_node_of(client)}"
        else:
            pool = getattr(client, "connection_pool", None)
            service = getattr(pool, "service_name", None)
            if service is not None:  # a Sentinel-managed pool: the master moves
                self._name = f"the master of sentinel service {service!r}"
                self._described = f"sentinel service {service!r}"
            else:
                self._name = _address(client.get_connection_kwargs()) or self._name
                self._described = self._name

    def describe(self) -> str:
        """Return where the client connects, for a repr: an address, never a password.

        ``127.0.0.1:6379``, ``unix:/run/redis.sock``, ``sentinel service 'main'`` or
        ``cluster at 10.0.0.1:7000`` (the node it started from).
        """
        return self._described

    @property
    def cluster(self) -> bool:
        """Whether each key has a server of its own (a cluster's node)."""
        return self._cluster

    def of(self, name: str) -> str:
        """Return the server that serves Redis key *name*."""
        if not self._cluster:
            return self._name
        try:
            slot = self._client.keyslot(name)
            node = self._client.nodes_manager.get_node_from_slot(slot)
        except Exception:  # noqa: BLE001 - a name is a courtesy, never a new failure
            return "a cluster node"
        return str(node.name)


class Faults:
    """Where one backend's commands go, and the circuit breakers of those servers.

    Args:
        client: The backend's client.
        name_of: Maps a cache key to the Redis key that places it (its slot).
        failures: Failures in a row that open a server's circuit.
        reset_after: Seconds an open circuit skips its server before a probe.
    """

    def __init__(
        self,
        client: Any,
        name_of: Callable[[str], str],
        *,
        failures: int,
        reset_after: float,
    ) -> None:
        _check_breaker(failures, reset_after)
        self._servers = Servers(client)
        self._name_of = name_of
        self._failures = failures
        self._reset_after = float(reset_after)
        self._one = self._new(self._servers.of(""))
        self._nodes: dict[str, CircuitBreaker] = {}
        self._mutex = threading.Lock()

    def use(self, client: Any) -> None:
        """Name servers through *client* from now on (a new event loop's), same breakers."""
        self._servers = Servers(client)

    @property
    def where(self) -> str:
        """Return where the client connects (see `Servers.describe`)."""
        return self._servers.describe()

    def _new(self, server: str) -> CircuitBreaker:
        return CircuitBreaker(self._failures, self._reset_after, server=server)

    def server(self, key: str) -> str:
        """Return the server that serves cache key *key*."""
        return self._servers.of(self._name_of(key))

    def breaker_for(self, key: str) -> CircuitBreaker:
        """Return the breaker of the server that serves cache key *key*."""
        if not self._servers.cluster:
            return self._one
        node = self.server(key)
        breaker = self._nodes.get(node)
        if breaker is None:
            with self._mutex:
                breaker = self._nodes.setdefault(node, self._new(node))
        return breaker

    def error(self, key: str, operation: str, cause: BaseException) -> BackendError:
        """Return the `BackendError` to raise from *cause* (naming server and reason)."""
        return BackendError(
            key, operation, server=self.server(key), refused=refusal(cause)
        )
