"""Which clients the Redis backends accept, and how their constructors build one.

Two client packages speak to Redis and Valkey alike: redis-py (``redis``, a
dependency) and its fork valkey-py (``valkey``, the ``stampede-guard[valkey]`` extra).
Their modules mirror each other under other class names (``Redis``/``Valkey``,
``RedisCluster``/``ValkeyCluster``, ``RedisError``/``ValkeyError``), so one table of
names serves both. Each accepts a plain client, a cluster client, and a client that
Sentinel made (a plain client over a Sentinel-managed pool).
"""

from __future__ import annotations

import importlib
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, overload

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster

from stampede_guard.backends._kept import (
    AsyncKeptConnections,
    KeptConnections,
    keep_for,
)

if TYPE_CHECKING:
    import valkey
    import valkey.asyncio
    import valkey.asyncio.cluster
    import valkey.cluster

__all__ = [
    "AsyncClient",
    "ClientErrors",
    "SyncClient",
    "build_client",
    "build_sentinel_client",
    "check_client",
    "kept_connections",
    "pool_options",
    "pubsub_factory",
]

ClientErrors = tuple[type[Exception], ...]

# What `RedisBackend` and `AsyncRedisBackend` accept (valkey-py's only if installed).
SyncClient: TypeAlias = "redis.Redis | redis.cluster.RedisCluster | valkey.Valkey | valkey.cluster.ValkeyCluster"
AsyncClient: TypeAlias = "redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster | valkey.asyncio.Valkey | valkey.asyncio.cluster.ValkeyCluster"

# Retries of a cluster client after a connection error, a timeout or CLUSTERDOWN:
# each refreshes the slot map first, so a request follows a failover or a moved slot.
# Fewer and shorter than redis-py's (3 from 1 s up to 10 s): against a hung node, a
# call still fails within a few seconds instead of half a minute.
CLUSTER_RETRIES = 3
CLUSTER_BACKOFF = (0.05, 0.5)  # first and longest pause between them, in seconds


@dataclass(frozen=True, slots=True)
class _Family:
    """One client package: its name, the extra that installs it, its class names."""

    package: str
    extra: str
    client: str
    cluster: str
    error: str
    cluster_error: str
    schemes: tuple[str, ...]


_REDIS = _Family(
    "redis",
    "",
    "Redis",
    "RedisCluster",
    "RedisError",
    "RedisClusterException",
    ("redis://", "rediss://", "unix://"),
)
_VALKEY = _Family(
    "valkey",
    "stampede-guard[valkey]",
    "Valkey",
    "ValkeyCluster",
    "ValkeyError",
    "ValkeyClusterException",
    ("valkey://", "valkeys://"),
)


def _modules(family: _Family, *, asyncio: bool) -> tuple[ModuleType, ModuleType]:
    """Return the package's client module and cluster module, sync or asyncio."""
    try:
        importlib.import_module(family.package)
    except ImportError as exc:
        msg = f"the {family.package} client package is not installed; install {family.extra or family.package}"
        raise ImportError(msg) from exc
    base = f"{family.package}.asyncio" if asyncio else family.package
    return importlib.import_module(base), importlib.import_module(f"{base}.cluster")


def _errors(family: _Family) -> ClientErrors:
    exceptions = importlib.import_module(f"{family.package}.exceptions")
    # A cluster client raises its cluster exception (no slot, all nodes down) outside
    # the package's error tree, so both are backend failures.
    return getattr(exceptions, family.error), getattr(exceptions, family.cluster_error)


def _accepted(*, asyncio: bool) -> dict[type[Any], ClientErrors]:
    """Return each accepted client class with the errors its calls may raise."""
    families = [_REDIS]
    # A valkey client can only exist if valkey was imported: no need to import it.
    if _VALKEY.package in sys.modules:
        families.append(_VALKEY)
    accepted: dict[type[Any], ClientErrors] = {}
    for family in families:
        client_module, cluster_module = _modules(family, asyncio=asyncio)
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
    family = (
        _VALKEY if any(k.__module__.startswith("valkey") for k in kinds) else _REDIS
    )
    plain = getattr(_modules(family, asyncio=asyncio)[0], family.client)

    def open_on_a_master() -> Any:
        node = random.choice(client.get_primaries())  # noqa: S311 - not security
        options = client.get_connection_kwargs()
        kept = {k: v for k, v in options.items() if k in _PUBSUB_OPTIONS}
        if "SSL" in getattr(options.get("connection_class"), "__name__", ""):
            kept["ssl"] = True
        return plain(host=node.host, port=node.port, **kept).pubsub()

    return open_on_a_master


def pool_options(
    *,
    socket_timeout: float,
    connect_timeout: float,
    max_connections: int,
    pool_timeout: float,
) -> dict[str, Any]:
    """Return connection-pool options that fail fast instead of redis-py's defaults.

    redis-py's defaults (a 5 s socket timeout, retried 10 times) keep one call waiting
    close to a minute against a hung server; its default pool fails with "Too many
    connections" past 100 threads. The blocking pool makes callers queue instead.
    """
    return {
        "max_connections": max_connections,
        "timeout": pool_timeout,
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
        "socket_keepalive": True,
        "health_check_interval": 30,
    }


def _family_of(url: str) -> _Family:
    if url.startswith(_VALKEY.schemes):
        return _VALKEY
    return _REDIS


def _retry(
    family: _Family, *, asyncio: bool, retries: int, backoff: tuple[float, float] | None
) -> Any:
    """Return the package's ``Retry``: *retries* times, at once or backing off."""
    backoffs = importlib.import_module(f"{family.package}.backoff")
    retry_module = "asyncio.retry" if asyncio else "retry"
    retry = importlib.import_module(f"{family.package}.{retry_module}").Retry
    if backoff is None:
        # Only a dropped connection: a timeout means a hung server, and retrying it
        # would double the wait.
        dropped = importlib.import_module(
            f"{family.package}.exceptions"
        ).ConnectionError
        return retry(backoffs.NoBackoff(), retries, supported_errors=(dropped,))
    first, longest = backoff
    return retry(backoffs.ExponentialBackoff(cap=longest, base=first), retries)


def build_client(
    url: str,
    *,
    asyncio: bool,
    cluster: bool,
    seed_nodes: Sequence[str],
    options: dict[str, Any],
    client_kwargs: dict[str, Any],
) -> Any:
    """Build the client `from_url` promises, from the package the scheme names.

    *options* are those of `pool_options`. A single server gets a blocking pool and one
    immediate retry on a dropped connection. A cluster client keeps a pool per node
    (blocking too for sync code; redis-py has none for asyncio) and retries
    `CLUSTER_RETRIES` times with a refreshed slot map.
    """
    family = _family_of(url)
    client_module, cluster_module = _modules(family, asyncio=asyncio)
    if not cluster:
        if seed_nodes:
            msg = "seed_nodes= only applies with cluster=True"
            raise ValueError(msg)
        retry = _retry(family, asyncio=asyncio, retries=1, backoff=None)
        pool = client_module.BlockingConnectionPool.from_url(
            url, **options, retry=retry, **client_kwargs
        )
        # from_pool: the client owns the pool, so closing it disconnects the pool too.
        return getattr(client_module, family.client).from_pool(pool)
    cluster_options = dict(options)
    pool_timeout = cluster_options.pop("timeout")
    if not asyncio:
        cluster_options["connection_pool_class"] = client_module.BlockingConnectionPool
        cluster_options["timeout"] = pool_timeout
    startup = [cluster_module.ClusterNode(*_host_port(node)) for node in seed_nodes]
    retry = _retry(
        family, asyncio=asyncio, retries=CLUSTER_RETRIES, backoff=CLUSTER_BACKOFF
    )
    return getattr(cluster_module, family.cluster).from_url(
        url,
        startup_nodes=startup or None,
        **{**cluster_options, "retry": retry},
        **client_kwargs,
    )


@overload
def kept_connections(
    client: Any, *, asyncio: Literal[False], max_connections: int
) -> KeptConnections | None: ...
@overload
def kept_connections(
    client: Any, *, asyncio: Literal[True], max_connections: int
) -> AsyncKeptConnections | None: ...
def kept_connections(
    client: Any, *, asyncio: bool, max_connections: int
) -> KeptConnections | AsyncKeptConnections | None:
    """Return commands on kept connections of the pool `build_client` gave *client*.

    Only a single server's blocking pool qualifies (a cluster client routes each
    command itself), and only one with room to keep a connection aside.
    """
    keep = keep_for(max_connections)
    package = type(client).__module__.partition(".")[0]
    family = _VALKEY if package == _VALKEY.package else _REDIS
    client_module, _ = _modules(family, asyncio=asyncio)
    pool = getattr(client, "connection_pool", None)
    if keep < 1 or type(pool) is not client_module.BlockingConnectionPool:
        return None
    kind = AsyncKeptConnections if asyncio else KeptConnections
    return kind(pool, family.package, keep)


def _host_port(node: str) -> tuple[str, int]:
    host, sep, port = node.rpartition(":")
    if not sep or not host or not port.isdigit():
        msg = f"seed node {node!r} is not 'host:port'"
        raise ValueError(msg)
    return host.strip("[]"), int(port)


def build_sentinel_client(
    sentinels: Sequence[str | tuple[str, int]],
    service_name: str,
    *,
    asyncio: bool,
    options: dict[str, Any],
    sentinel_kwargs: dict[str, Any] | None,
    client_kwargs: dict[str, Any],
) -> tuple[Any, list[Any]]:
    """Build a client of the master that *sentinels* name *service_name*.

    Returns it with the clients of the sentinels, which the backend closes too.

    The sentinels are asked with the same short timeouts as the servers. On a
    failover the pool asks them again and reconnects to the new master; a connection
    to a master turned replica (READONLY) is dropped and retried once, on the new one.
    """
    client_module, _ = _modules(_REDIS, asyncio=asyncio)
    sentinel_module = importlib.import_module(f"{client_module.__name__}.sentinel")
    addresses = [
        _host_port(node) if isinstance(node, str) else node for node in sentinels
    ]
    if not addresses:
        msg = "sentinels= needs at least one 'host:port' or (host, port)"
        raise ValueError(msg)
    asking = {
        "socket_timeout": options["socket_timeout"],
        "socket_connect_timeout": options["socket_connect_timeout"],
        **(sentinel_kwargs or {}),
    }
    connection = {k: v for k, v in options.items() if k != "timeout"}
    connection["retry"] = _retry(_REDIS, asyncio=asyncio, retries=1, backoff=None)
    manager = sentinel_module.Sentinel(
        addresses, sentinel_kwargs=asking, **connection, **client_kwargs
    )
    master = manager.master_for(service_name, redis_class=client_module.Redis)
    return master, manager.sentinels
