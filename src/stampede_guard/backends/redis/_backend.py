"""What both Redis backends are, written once: how they are built, and what they hold.

`RedisBackend` and `AsyncRedisBackend` differ only in how they send a command: each
of their methods sends one `Call` that the codec prepared (see ``_codec``), with or
without ``await``, and reads the reply with it. Their constructors, the codec, the
scripts, the circuit breakers and the translation of a client's error into a
`BackendError` are here, for both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Generic, Self, TypeVar

from stampede_guard._breaker import CircuitBreaker
from stampede_guard._near import Near, NearCache, Writing, check_near_cache
from stampede_guard._tags import check_tag
from stampede_guard.backends.redis._clients import check_client, pubsub_factory
from stampede_guard.backends.redis._codec import Call, RedisCodec
from stampede_guard.backends.redis._connect import (
    Connect,
    Connection,
    sentinel_connector,
    url_connector,
)
from stampede_guard.backends.redis._faults import Faults
from stampede_guard.backends.redis._hub import DEAD, QUIET
from stampede_guard.backends.redis._many import Batches
from stampede_guard.backends.redis._scripts import Scripts
from stampede_guard.serializers import JsonSerializer, Serializer

__all__ = ["RedisBase"]

ClientT = TypeVar("ClientT")


class RedisBase(Generic[ClientT]):
    """The parts of a Redis backend that do no I/O of their own (see the module)."""

    _asyncio: ClassVar[bool]  # whether the client is a ``redis.asyncio`` one

    def __init__(
        self,
        client: ClientT,
        *,
        serializer: Serializer | None = None,
        prefix: str = "sg",
        breaker_failures: int = 5,
        breaker_reset: float = 5.0,
        near_cache: NearCache | None = None,
    ) -> None:
        builder = type(self).__name__
        self._errors = check_client(client, asyncio=self._asyncio, builder=builder)
        cluster = hasattr(client, "get_primaries")
        self._codec = RedisCodec(prefix, serializer, cluster=cluster)
        # The batch methods' calls: grouped by slot on a cluster (see ``_many``).
        self._batches = Batches(self._codec, cluster=cluster)
        self._near = _near_of(
            near_cache,
            self._codec.near_channel,
            client,
            asyncio=self._asyncio,
            builder=builder,
        )
        #: The near cache's lookup (no I/O), which the decorator tries first.
        self.local_read = None if self._near is None else self._near.lookup
        self.near_lookup = self.local_read  # the same, by the near cache's name
        #: Registers a decorated function's in-process flights with the near cache,
        #: which forgets a key's when another process changes it (see `Near.watch`).
        self.near_watch = None if self._near is None else self._near.watch
        # Outlives the clients an asyncio backend makes per event loop: the servers
        # stay the same.
        self._faults = Faults(
            client,
            self._codec.value_key,
            failures=breaker_failures,
            reset_after=breaker_reset,
        )
        # How from_url and from_sentinel connect, to connect again in a new event loop.
        self._connect: Connect | None = None
        self._prepare()
        self._attach(client)

    def _prepare(self) -> None:
        """Set up what a backend keeps across clients (see `AsyncRedisBackend`)."""

    def _attach(self, client: ClientT) -> None:
        """Talk through *client* (the one given, or one made for a new event loop)."""
        self._client = client
        self._faults.use(client)
        self._sentinels: list[Any] = []  # clients of the sentinels, if from_sentinel
        self._kept: Any = None  # kept connections, if from_url built the pool
        # A hit's GET: through the client, or on a kept connection.
        self._read: Callable[[str], Any] = client.get  # type: ignore[attr-defined]
        self._scripts = Scripts(client)
        self._listen(client)

    def _listen(self, client: ClientT) -> None:
        """Make the notice listener for *client* (a thread's, or a task's)."""
        raise NotImplementedError

    def _near_read(
        self, keep: Callable[[Near], None]
    ) -> tuple[Near, int | None, float]:
        """Before a near cache's read from Redis: the read's start, its time sent.

        Asks the listener to subscribe the near cache's channel (*keep*) the first
        time, and again after it stopped: until it has, the start is None and
        nothing read fills the near cache.
        """
        near = self._near
        assert near is not None  # noqa: S101 - only called with one
        start = near.begin()
        if start is None and not near.wanted:
            near.wanted = True
            keep(near)
        return near, start, near.clock()

    def _tagging(self, tag: object) -> Call[object]:
        """Return the call invalidating *tag*, after checking the tag."""
        return self._codec.invalidate_tag(check_tag(tag))

    def _tag_done(self, tag: str) -> None:
        """After *tag*'s invalidation: this process's near cache drops its entries.

        At once, for read-your-writes; the message does it in every other process
        (and here again). Reads begun before that bring one back are refused.
        """
        if self._near is not None:
            self._near.tag_invalidated(tag)

    def _writing(self, call: Call[Any]) -> Writing | None:
        """What a write must do around itself for the near cache, if anything."""
        if self._near is None or not call.changes:
            return None
        return Writing(self._near, call.key)

    def _adopt(self, connection: Connection) -> None:
        """Talk through what `from_url` or `from_sentinel` made."""
        if connection.client is not self._client:
            self._attach(connection.client)
        self._sentinels = connection.sentinels
        if connection.kept is not None:
            # GET and the scripts go on kept connections instead of through the client.
            self._kept = connection.kept
            self._read = connection.kept.get
            self._scripts.send_on(connection.kept)

    @classmethod
    def _connected(
        cls,
        connect: Connect,
        serializer: Serializer | None,
        prefix: str,
        breaker_failures: int,
        breaker_reset: float,
        *,
        near_cache: NearCache | None,
    ) -> Self:
        """Return a backend on what *connect* makes (called again per event loop)."""
        # Checked before connecting: a bad option is the caller's to fix first.
        check_near_cache(near_cache, cls.__name__)
        connection = connect()
        backend = cls(
            connection.client,
            serializer=serializer,
            prefix=prefix,
            breaker_failures=breaker_failures,
            breaker_reset=breaker_reset,
            near_cache=near_cache,
        )
        backend._connect = connect
        backend._adopt(connection)
        return backend

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        serializer: Serializer | None = None,
        prefix: str = "sg",
        breaker_failures: int = 5,
        breaker_reset: float = 5.0,
        near_cache: NearCache | None = None,
        cluster: bool = False,
        seed_nodes: Sequence[str] = (),
        socket_timeout: float = 1.0,
        connect_timeout: float = 1.0,
        max_connections: int = 100,
        pool_timeout: float = 10.0,
        **client_kwargs: Any,
    ) -> Self:
        """Connect to the Redis at *url* (``redis://``, ``rediss://`` or ``unix://``).

        The client it builds fails fast instead of inheriting redis-py's defaults (a
        5 s socket timeout retried 10 times: close to a minute against a hung server).
        A ``valkey://`` or ``valkeys://`` URL builds a valkey-py client instead (the
        ``stampede-guard[valkey]`` extra), with the same options. For
        `AsyncRedisBackend`, a ``redis.asyncio`` (or ``valkey.asyncio``) client.

        Args:
            url: Where Redis is; credentials in it are never logged. With *cluster*,
                any node of the cluster: the client discovers the others.
            serializer: See the class.
            prefix: See the class.
            breaker_failures: See the class.
            breaker_reset: See the class.
            near_cache: See the class.
            cluster: Build a Redis Cluster client. It routes each call to the node
                that owns the key's slot and follows slot moves and failovers,
                retrying a failed call 3 times (after 0.1, 0.2 and 0.4 s) with a
                fresh slot map before it fails with `BackendError`.
            seed_nodes: More ``"host:port"`` nodes to discover the cluster from, if
                the one in *url* does not answer (cluster only).
            socket_timeout: Seconds to wait for a reply; then the call fails with
                `BackendError` (after one immediate retry on a dropped connection).
            connect_timeout: Seconds to wait for a TCP connection.
            max_connections: Connections in the pool (per node, on a cluster).
                Threads (or tasks) beyond it wait for a free connection instead of
                failing with "Too many connections", except on an asyncio cluster:
                redis-py's asyncio cluster client has no blocking pool, so a call
                beyond it fails with `BackendError`. On one server, the backend keeps
                up to a quarter of them (16 at most) aside for its own commands,
                which skip the client's per-call pool checkout: a hit is then cheaper
                than a ``GET`` through the client.
            pool_timeout: Seconds a caller waits for a free connection, then fails.
                Generous on purpose: among a thousand threads of one process, a thread
                holding a connection may wait long for the GIL before giving it back.
            **client_kwargs: Passed on to the connection pool (``ssl_ca_certs``...).
        """
        connect = url_connector(
            url,
            asyncio=cls._asyncio,
            cluster=cluster,
            seed_nodes=seed_nodes,
            socket_timeout=socket_timeout,
            connect_timeout=connect_timeout,
            max_connections=max_connections,
            pool_timeout=pool_timeout,
            client_kwargs=client_kwargs,
        )
        return cls._connected(
            connect,
            serializer,
            prefix,
            breaker_failures,
            breaker_reset,
            near_cache=near_cache,
        )

    @classmethod
    def from_sentinel(
        cls,
        sentinels: Sequence[str | tuple[str, int]],
        service_name: str,
        *,
        serializer: Serializer | None = None,
        prefix: str = "sg",
        breaker_failures: int = 5,
        breaker_reset: float = 5.0,
        near_cache: NearCache | None = None,
        socket_timeout: float = 1.0,
        connect_timeout: float = 1.0,
        max_connections: int = 100,
        sentinel_kwargs: dict[str, Any] | None = None,
        **client_kwargs: Any,
    ) -> Self:
        """Connect to the master that Redis Sentinel names *service_name*.

        The client asks the sentinels where the master is, and asks again when a
        connection fails or the server it reaches has become a replica (a failover):
        the call is then retried once, on the new master. Until the sentinels have
        promoted one, calls fail with `BackendError`. A failover can lose a lock,
        so a value may be computed twice; never a wrong value (docs/deployment.md).

        Args:
            sentinels: The sentinels, as ``"host:port"`` or ``(host, port)``.
            service_name: The master's name in the sentinels' configuration.
            serializer: See the class.
            prefix: See the class.
            breaker_failures: See the class.
            breaker_reset: See the class.
            near_cache: See the class.
            socket_timeout: Seconds to wait for a reply, from a sentinel or the
                master; then the call fails (see `from_url`).
            connect_timeout: Seconds to wait for a TCP connection.
            max_connections: Connections to the master; a call beyond them fails
                with `BackendError` (redis-py has no blocking Sentinel pool).
            sentinel_kwargs: More options for the connections to the sentinels
                (``password``, ``ssl``...).
            **client_kwargs: Passed on to the master's connection pool.
        """
        connect = sentinel_connector(
            sentinels,
            service_name,
            asyncio=cls._asyncio,
            socket_timeout=socket_timeout,
            connect_timeout=connect_timeout,
            max_connections=max_connections,
            sentinel_kwargs=sentinel_kwargs,
            client_kwargs=client_kwargs,
        )
        return cls._connected(
            connect,
            serializer,
            prefix,
            breaker_failures,
            breaker_reset,
            near_cache=near_cache,
        )

    @property
    def client(self) -> ClientT:
        """The client this backend talks through.

        An `AsyncRedisBackend` made by `from_url` or `from_sentinel` makes a new one
        for each new event loop: this is the one of the loop it last ran in.
        """
        return self._client

    def __repr__(self) -> str:
        # Short enough for an error message, and never a password: the address only
        # (redis-py's client repr runs to hundreds of characters).
        serializer = self._codec.serializer
        shown = (
            "" if type(serializer) is JsonSerializer else f", serializer={serializer!r}"
        )
        return f"{type(self).__name__}({self._faults.where}, prefix={self._codec.prefix!r}{shown})"

    def breaker_for(self, key: str) -> CircuitBreaker:
        """Return the circuit breaker of the server that serves *key* (see the class)."""
        return self._faults.breaker_for(key)

    @property
    def near_cache(self) -> NearCache | None:
        """The near cache's settings, or None without one (see `NearCache`)."""
        return None if self._near is None else self._near.config

    def now(self) -> float:
        """Return the server's time (Unix seconds), learned from its replies.

        Entries are stamped and judged fresh by it, so a host's clock step or skew
        changes no freshness decision (see ``stampede_guard._clock``).
        """
        return self._codec.clock()


def _near_of(
    config: object, channel: str, client: object, *, asyncio: bool, builder: str
) -> Near | None:
    """Return the near cache for *config*, after checking the client can keep it."""
    near_cache = check_near_cache(config, builder)
    if near_cache is None:
        return None
    if pubsub_factory(client, asyncio=asyncio) is None:
        msg = f"{builder}: near_cache needs a pub/sub connection to hear of changes, and this client has none (valkey-py's asyncio cluster client); use redis-py's, or no near cache"
        raise TypeError(msg)
    # Silent longer than the listener's own bound for a dead connection: not trusted.
    return Near(near_cache, channel, silence=QUIET + DEAD)
