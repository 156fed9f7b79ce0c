"""How `from_url` and `from_sentinel` connect: a client that fails fast, and its pool.

Both Redis backends build through the same connectors; the asyncio backend calls its
connector again for each new event loop (a ``redis.asyncio`` client belongs to one).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from stampede_guard.backends.redis._clients import (
    REDIS,
    VALKEY,
    Family,
    client_modules,
    family_of,
)
from stampede_guard.backends.redis._kept import (
    AsyncKeptConnections,
    KeptConnections,
    keep_for,
)

__all__ = ["Connect", "Connection", "sentinel_connector", "url_connector"]

# Retries of a cluster client after a connection error, a timeout or CLUSTERDOWN:
# each refreshes the slot map first, so a request follows a failover or a moved slot.
# Fewer and shorter than redis-py's (3 from 1 s up to 10 s): against a hung node, a
# call still fails within a few seconds instead of half a minute.
CLUSTER_RETRIES = 3
CLUSTER_BACKOFF = (0.05, 0.5)  # first and longest pause between them, in seconds


@dataclass(frozen=True, slots=True)
class Connection:
    """What a connector made: the client, its sentinels' clients, its kept connections.

    The backend closes all of them; the kept ones (see ``_kept``) only for a pool that
    the connector built, on one server.
    """

    client: Any
    sentinels: list[Any] = field(default_factory=list)
    kept: KeptConnections | AsyncKeptConnections | None = None


Connect: TypeAlias = Callable[[], Connection]


def url_connector(
    url: str,
    *,
    asyncio: bool,
    cluster: bool,
    seed_nodes: Sequence[str],
    socket_timeout: float,
    connect_timeout: float,
    max_connections: int,
    pool_timeout: float,
    client_kwargs: dict[str, Any],
) -> Connect:
    """Return what connects to *url* as `RedisBackend.from_url` says, when called."""
    options = _pool_options(
        socket_timeout, connect_timeout, max_connections, pool_timeout
    )

    def connect() -> Connection:
        client = _build_client(
            url,
            asyncio=asyncio,
            cluster=cluster,
            seed_nodes=seed_nodes,
            options=options,
            client_kwargs=client_kwargs,
        )
        kept = _kept_connections(
            client, asyncio=asyncio, max_connections=max_connections
        )
        return Connection(client, [], kept)

    return connect


def sentinel_connector(
    sentinels: Sequence[str | tuple[str, int]],
    service_name: str,
    *,
    asyncio: bool,
    socket_timeout: float,
    connect_timeout: float,
    max_connections: int,
    sentinel_kwargs: dict[str, Any] | None,
    client_kwargs: dict[str, Any],
) -> Connect:
    """Return what connects as `RedisBackend.from_sentinel` says, when called."""
    # No pool timeout: redis-py has no blocking Sentinel pool.
    options = _pool_options(socket_timeout, connect_timeout, max_connections, 0.0)

    def connect() -> Connection:
        client, asking = _build_sentinel_client(
            sentinels,
            service_name,
            asyncio=asyncio,
            options=options,
            sentinel_kwargs=sentinel_kwargs,
            client_kwargs=client_kwargs,
        )
        return Connection(client, asking)

    return connect


def _pool_options(
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


def _retry(
    family: Family, *, asyncio: bool, retries: int, backoff: tuple[float, float] | None
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


def _build_client(
    url: str,
    *,
    asyncio: bool,
    cluster: bool,
    seed_nodes: Sequence[str],
    options: dict[str, Any],
    client_kwargs: dict[str, Any],
) -> Any:
    """Build the client `from_url` promises, from the package the scheme names.

    *options* are those of `_pool_options`. A single server gets a blocking pool and one
    immediate retry on a dropped connection. A cluster client keeps a pool per node
    (blocking too for sync code; redis-py has none for asyncio) and retries
    `CLUSTER_RETRIES` times with a refreshed slot map.
    """
    family = family_of(url)
    client_module, cluster_module = client_modules(family, asyncio=asyncio)
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


def _kept_connections(
    client: Any, *, asyncio: bool, max_connections: int
) -> KeptConnections | AsyncKeptConnections | None:
    """Return commands on kept connections of the pool `_build_client` gave *client*.

    Only a single server's blocking pool qualifies (a cluster client routes each
    command itself), and only one with room to keep a connection aside.
    """
    keep = keep_for(max_connections)
    package = type(client).__module__.partition(".")[0]
    family = VALKEY if package == VALKEY.package else REDIS
    client_module, _ = client_modules(family, asyncio=asyncio)
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


def _build_sentinel_client(
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
    client_module, _ = client_modules(REDIS, asyncio=asyncio)
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
    connection["retry"] = _retry(REDIS, asyncio=asyncio, retries=1, backoff=None)
    manager = sentinel_module.Sentinel(
        addresses, sentinel_kwargs=asking, **connection, **client_kwargs
    )
    master = manager.master_for(service_name, redis_class=client_module.Redis)
    return master, manager.sentinels
