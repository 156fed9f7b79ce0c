"""Which clients the Redis backends accept, and the client packages they come from.

Two client packages speak to Redis and Valkey alike: redis-py (``redis``, a
dependency) and its fork valkey-py (``valkey``, the ``stampede-guard[valkey]`` extra).
Their modules mirror each other under other class names (``Redis``/``Valkey``,
``RedisCluster``/``ValkeyCluster``, ``RedisError``/``ValkeyError``), so one table of
names serves both. Each accepts a plain client, a cluster client, and a client that
Sentinel made (a plain client over a Sentinel-managed pool).
"""

from __future__ import annotations

import importlib
import os
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeAlias

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster

if TYPE_CHECKING:
    import valkey
    import valkey.asyncio
    import valkey.asyncio.cluster
    import valkey.cluster

__all__ = [
    "REDIS",
    "VALKEY",
    "AsyncClient",
    "ClientErrors",
    "Family",
    "SyncClient",
    "check_client",
    "client_modules",
    "family_of",
    "pubsub_factory",
]

ClientErrors = tuple[type[Exception], ...]

# What `RedisBackend` and `AsyncRedisBackend` accept (valkey-py's only if installed).
SyncClient: TypeAlias = "redis.Redis | redis.cluster.RedisCluster | valkey.Valkey | valkey.cluster.ValkeyCluster"
AsyncClient: TypeAlias = "redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster | valkey.asyncio.Valkey | valkey.asyncio.cluster.ValkeyCluster"


@dataclass(frozen=True, slots=True)
class Family:
    """One client package: its name, the extra that installs it, its class names."""

    package: str
    extra: str
    client: str
    cluster: str
    error: str
    cluster_error: str
    schemes: tuple[str, ...]


REDIS = Family(
    "redis",
    "",
    "Redis",
    "RedisCluster",
    "RedisError",
    "RedisClusterException",
    ("redis://", "rediss://", "unix://"),
)
VALKEY = Family(
    "valkey",
    "stampede-guard[valkey]",
    "Valkey",
    "ValkeyCluster",
    "ValkeyError",
    "ValkeyClusterException",
    ("valkey://", "valkeys://"),
)


# Which master a cluster's listener starts on: the library's own draw, apart from the
# `random` module's shared state (see ``stampede_guard._context``).
_PICK = random.Random()  # noqa: S311 - spreading load, not security
os.register_at_fork(after_in_child=_PICK.seed)  # forked workers spread too


def client_modules(family: Family, *, asyncio: bool) -> tuple[ModuleType, ModuleType]:
    """Return the package's client module and cluster module, sync or asyncio."""
    try:
        importlib.import_module(family.package)
    except ImportError as exc:
        msg = f"the {family.package} client package is not installed; install {family.extra or family.package}"
        raise ImportError(msg) from exc
    base = f"{family.package}.asyncio" if asyncio else family.package
    return importlib.import_module(base), importlib.import_module(f"{base}.cluster")


def _errors(family: Family) -> ClientErrors:
    exceptions = importlib.import_module(f"{family.package}.exceptions")
    # A cluster client raises its cluster exception (no slot, all nodes down) outside
    # the package's error tree, so both are backend failures.
    return getattr(exceptions, family.error), getattr(exceptions, family.cluster_error)


def _accepted(*, asyncio: bool) -> dict[type[Any], ClientErrors]:
    """Return each accepted client class with the errors its calls may raise."""
    families = [REDIS]
    # A valkey client can only exist if valkey was imported: no need to import it.
    if VALKEY.package in sys.modules:
        families.append(VALKEY)
    accepted: dict[type[Any], ClientErrors] = {}
    for family in families:
        client_module, cluster_module = client_modules(family, asyncio=asyncio)
        errors = _errors(family)
        accepted[getattr(client_module, family.client)] = errors
        accepted[getattr(cluster_module, family.cluster)] = errors
    return accepted


def check_client(client: object, *, asyncio: bool, builder: str) -> ClientErrors:
    """Return the errors *client*'s calls raise; raise unless it is a bytes client.

    Accepted: ``redis.Redis``, ``redis.cluster.RedisCluster`` and their ``valkey``
    twins (``redis.asyncio``/``valkey.asyncio`` ones when *asyncio*), including the
    clients a ``Sentinel`` makes, with ``decode_responses=False``.
    """
    accepted = _accepted(asyncio=asyncio)
    errors = next(
        (errors for kind, errors in accepted.items() if isinstance(client, kind)), None
    )
    if errors is None:
        names = ", ".join(f"{kind.__module__}.{kind.__qualname__}" for kind in accepted)
        msg = f"client must be one of {names}, not {type(client).__qualname__}; use {builder}.from_url(url) to build one"
        raise TypeError(msg)
    if client.get_connection_kwargs().get("decode_responses"):  # type: ignore[attr-defined]
        msg = f"the Redis client has decode_responses=True; {builder} stores bytes, so pass a client created with decode_responses=False"
        raise ValueError(msg)
    return errors


# What a pub/sub connection to one cluster node takes from the cluster's options.
_PUBSUB_OPTIONS = frozenset(
    {
        "username",
        "password",
        "credential_provider",
        "client_name",
        "socket_timeout",
        "socket_connect_timeout",
        "socket_keepalive",
        "socket_keepalive_options",
        "ssl_keyfile",
        "ssl_certfile",
        "ssl_cert_reqs",
        "ssl_ca_certs",
        "ssl_ca_data",
        "ssl_ca_path",
        "ssl_check_hostname",
    }
)


def pubsub_factory(client: Any, *, asyncio: bool) -> Callable[[], Any] | None:
    """Return how the listener opens a pub/sub connection through *client*.

    A plain client's own ``pubsub()``. A cluster client's pub/sub objects are not
    used: redis-py's asyncio one shares connections with commands under load, and
    both pick a node by slot. A notice is a classic ``PUBLISH``, which a cluster
    delivers on every node, so the listener instead subscribes on one master picked
    at random, through a connection of its own, and on another after a failure.
    Returns None if there is no way to listen (valkey-py's asyncio cluster client).
    """
    if not hasattr(client, "get_primaries"):  # not a cluster client
        return getattr(client, "pubsub", None)
    kinds = type(client).__mro__
    family = VALKEY if any(k.__module__.startswith("valkey") for k in kinds) else REDIS
    plain = getattr(client_modules(family, asyncio=asyncio)[0], family.client)

    def open_on_a_master() -> Any:
        node = _PICK.choice(client.get_primaries())
        options = client.get_connection_kwargs()
        kept = {k: v for k, v in options.items() if k in _PUBSUB_OPTIONS}
        if "SSL" in getattr(options.get("connection_class"), "__name__", ""):
            kept["ssl"] = True
        return plain(host=node.host, port=node.port, **kept).pubsub()

    return open_on_a_master


def family_of(url: str) -> Family:
    if url.startswith(VALKEY.schemes):
        return VALKEY
    return REDIS
