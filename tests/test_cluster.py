"""Redis Cluster: the backends on a real 3-master cluster of private redis-servers.

The cluster is started by this module (``redis-server --cluster-enabled yes`` three
times, then ``redis-cli --cluster create``) on free loopback ports, and stopped by pid.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio.cluster
import redis.cluster
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.crc import key_slot

from _load import Load, async_stampede, stampede
from _servers import (
    Cluster,
    Server,
    ServerError,
    free_port,
    start_cluster,
    unavailable,
    wait_for,
)
from _waiting import Waiting
from stampede_guard import AsyncRedisBackend, RedisBackend, cached_stampede_safe
from stampede_guard.backends import Claim, Entry
from stampede_guard.backends.redis import _many
from stampede_guard.backends.redis._codec import RedisCodec
from stampede_guard.testing import AsyncBackendContract, BackendContract

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(60)]

KEYS = 90  # cache keys per stampede: about 30 on each master


def _start(workdir: Path, *, replicas: int = 0) -> Cluster:
    try:
        return start_cluster(workdir, replicas=replicas)
    except (OSError, ServerError) as exc:
        unavailable(f"could not start a Redis Cluster: {exc}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Return a 3-master cluster shared by this module's tests that do not break it."""
    started = _start(tmp_path_factory.mktemp("cluster"))
    yield started
    started.stop()


@pytest.fixture
def prefix() -> str:
    """Return a key prefix of this test's own (the cluster is this module's alone)."""
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
def backends(cluster: Cluster, prefix: str) -> Iterator[Callable[[], RedisBackend]]:
    """Make cluster RedisBackends on one prefix (each stands for a process)."""
    made: list[RedisBackend] = []

    def make() -> RedisBackend:
        backend = RedisBackend.from_url(cluster.url, cluster=True, prefix=prefix)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


def owner(cluster: Cluster, key: str) -> Server:
    """Return the master that serves the slot of Redis key *key* now."""
    slot = key_slot(key.encode())
    for server in cluster.masters:
        if server.proc.poll() is not None:
            continue
        with server.client() as client:
            for start, end, *nodes in client.execute_command("CLUSTER SLOTS"):
                if start <= slot <= end:
                    port = int(nodes[0][1])
                    return next(s for s in cluster.servers if s.port == port)
    raise AssertionError(f"no node serves slot {slot}")


def keys_in_slot(codec: RedisCodec, slot: int, count: int) -> list[str]:
    """Return *count* cache keys whose Redis keys all hash to *slot*."""
    found: list[str] = []
    n = 0
    while len(found) < count:
        key = f"k{n}"
        n += 1
        if key_slot(codec.value_key(key).encode()) == slot:
            found.append(key)
    return found


# --- Slots ------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=0, max_size=60))
def test_value_lock_and_channel_of_any_key_share_one_slot(key: str) -> None:
    """Braces, empty and unicode keys alike: the three names of a key share one slot."""
    codec = RedisCodec("sg", None)
    slots = {
        key_slot(name.encode()) for name in (*codec.both_keys(key), codec.channel(key))
    }
    assert len(slots) == 1


class TestClusterBackendContract(BackendContract):
    """The backend contract, on a cluster."""

    @pytest.fixture
    def backend(self, backends: Callable[[], RedisBackend]) -> RedisBackend:
        return backends()


class TestAsyncClusterBackendContract(AsyncBackendContract):
    """The async backend contract, on a cluster (the contract closes the backend)."""

    @pytest.fixture
    def backend(self, cluster: Cluster, prefix: str) -> AsyncRedisBackend:
        return AsyncRedisBackend.from_url(cluster.url, cluster=True, prefix=prefix)


# --- Stampedes -----------------------------------------------------------------------


def test_stampede_over_keys_on_every_master_computes_each_key_once(
    cluster: Cluster, backends: Callable[[], RedisBackend], prefix: str
) -> None:
    """Three backends, 90 keys spread over the 3 masters, 540 callers: 1 computation a key."""
    keys = [f"key:{n}" for n in range(KEYS)]
    tally = stampede([backends() for _ in range(3)], keys)
    assert tally.errors == {}
    assert tally.wrong == []
    assert tally.served == 3 * 2 * KEYS
    assert tally.computations == dict.fromkeys(keys, 1)
    per_master = []
    for server in cluster.masters:
        with server.client() as client:
            per_master.append(len(list(client.scan_iter(match=f"{prefix}:*:v:*"))))
    assert sum(per_master) == KEYS
    assert min(per_master) > 0, per_master


def test_async_stampede_over_keys_on_every_master_computes_each_key_once(
    cluster: Cluster, prefix: str
) -> None:
    """The same with AsyncRedisBackend over redis.asyncio's cluster client."""
    keys = [f"key:{n}" for n in range(KEYS)]

    async def main() -> Any:
        made = [
            AsyncRedisBackend.from_url(cluster.url, cluster=True, prefix=prefix)
            for _ in range(3)
        ]
        try:
            return await async_stampede(made, keys)
        finally:
            for backend in made:
                await backend.aclose()

    tally = asyncio.run(main())
    assert tally.errors == {}
    assert tally.wrong == []
    assert tally.computations == dict.fromkeys(keys, 1)


def test_a_waiter_on_another_node_wakes_on_the_cluster_notice(
    backends: Callable[[], RedisBackend],
) -> None:
    """A waiter that would poll only every 30 s is served as soon as the value is stored."""
    release = threading.Event()
    computed: list[str] = []
    leading, waiting = Waiting(), Waiting()

    @cached_stampede_safe(
        key="{key}", backend=backends(), metrics=leading, ttl=60, lock_timeout=60
    )
    def lead(key: str) -> str:
        release.wait(10)
        computed.append(key)
        return f"from-leader:{key}"

    @cached_stampede_safe(
        key="{key}",
        backend=backends(),
        metrics=waiting,
        base_delay=30,
        max_delay=30,
        wait_timeout=60,
        lock_timeout=60,
    )
    def wait(key: str) -> str:
        raise AssertionError("the waiter must not compute")

    # Several keys, so that some live on another node than the listener's connection.
    keys = [f"w{n}" for n in range(6)]
    results: list[str] = []
    leaders = [threading.Thread(target=lead, args=(key,)) for key in keys]
    for thread in leaders:
        thread.start()
    leading.until_missed(len(keys))  # a leader's Miss comes once it holds the lock
    waiters = [
        threading.Thread(target=lambda k=key: results.append(wait(k))) for key in keys
    ]
    for thread in waiters:
        thread.start()
    waiting.until_missed(len(keys))
    started = time.monotonic()
    release.set()
    for thread in [*leaders, *waiters]:
        thread.join(20)
    assert sorted(results) == sorted(f"from-leader:{key}" for key in keys)
    assert sorted(computed) == sorted(keys)
    assert time.monotonic() - started < 10  # well before any waiter's first poll
    assert waiting.waited("value") == len(keys)


def test_async_waiter_wakes_on_the_cluster_notice(
    cluster: Cluster, prefix: str
) -> None:
    """An asyncio waiter over the cluster is served by the notice, not by its 30 s poll."""

    async def main() -> list[str]:
        leader_backend = AsyncRedisBackend.from_url(
            cluster.url, cluster=True, prefix=prefix
        )
        waiter_backend = AsyncRedisBackend.from_url(
            cluster.url, cluster=True, prefix=prefix
        )
        release = asyncio.Event()

        @cached_stampede_safe(
            key="k", backend=leader_backend, metrics=leader, ttl=60, lock_timeout=60
        )
        async def lead() -> str:
            await release.wait()
            return "from-leader"

        @cached_stampede_safe(
            key="k",
            backend=waiter_backend,
            metrics=waiter,
            base_delay=30,
            max_delay=30,
            wait_timeout=60,
            lock_timeout=60,
        )
        async def wait() -> str:
            raise AssertionError("the waiter must not compute")

        try:
            leading = asyncio.create_task(lead())
            await leader.until_missed_async()  # it holds the lock
            waiting = asyncio.create_task(wait())
            await waiter.until_missed_async()
            release.set()
            return list(await asyncio.wait_for(asyncio.gather(leading, waiting), 10))
        finally:
            await leader_backend.aclose()
            await waiter_backend.aclose()

    leader, waiter = Waiting(), Waiting()
    assert asyncio.run(main()) == ["from-leader", "from-leader"]
    assert waiter.waited("value") == 1


# --- Clients -------------------------------------------------------------------------


def test_from_url_with_cluster_builds_a_cluster_client_with_short_timeouts(
    cluster: Cluster,
) -> None:
    """from_url(cluster=True) makes a RedisCluster with from_url's timeouts."""
    backend = RedisBackend.from_url(cluster.url, cluster=True, socket_timeout=0.3)
    try:
        client = backend.client
        assert isinstance(client, redis.cluster.RedisCluster)
        options = client.get_connection_kwargs()  # type: ignore[no-untyped-call]
        assert options["socket_timeout"] == 0.3
        assert options["socket_connect_timeout"] == 1.0
        assert options["max_connections"] == 100
        node = client.get_default_node()  # type: ignore[no-untyped-call]
        assert repr(backend) == f"RedisBackend(cluster at {node.name}, prefix='sg')"
    finally:
        backend.close()


def test_seed_nodes_let_from_url_find_the_cluster_past_a_dead_node(
    cluster: Cluster,
) -> None:
    """With the URL's node down, the client discovers the cluster from a seed node."""
    dead = f"redis://127.0.0.1:{free_port()}"  # nothing listens there
    seeds = [f"127.0.0.1:{server.port}" for server in cluster.masters]
    backend = RedisBackend.from_url(dead, cluster=True, seed_nodes=seeds)
    try:
        assert backend.get("absent") is None
    finally:
        backend.close()


def test_each_node_has_its_own_circuit_breaker(
    cluster: Cluster, backends: Callable[[], RedisBackend]
) -> None:
    """Keys on one master share its breaker; a master's failures open no other's."""
    backend = backends()
    codec = RedisCodec(backend._codec.prefix, None)
    by_node: dict[int, list[str]] = {}
    n = 0
    while len(by_node) < len(cluster.masters) or min(map(len, by_node.values())) < 2:
        key = f"k{n}"
        n += 1
        by_node.setdefault(owner(cluster, codec.value_key(key)).port, []).append(key)
    groups = [keys[:2] for keys in by_node.values()]
    for first, second in groups:
        assert backend.breaker_for(first) is backend.breaker_for(second)
    breakers = [backend.breaker_for(keys[0]) for keys in groups]
    assert len({id(b) for b in breakers}) == len(cluster.masters)
    for port, keys in by_node.items():
        assert f":{port}" in str(backend.breaker_for(keys[0])._server)
    for _ in range(5):
        breakers[0].failed()
    assert breakers[0].open
    assert not any(b.open for b in breakers[1:])


def test_a_user_made_cluster_client_is_accepted(cluster: Cluster, prefix: str) -> None:
    """RedisBackend takes a RedisCluster built by the user, AsyncRedisBackend its twin."""
    client = redis.cluster.RedisCluster.from_url(cluster.url)
    backend = RedisBackend(client, prefix=prefix)
    try:
        assert backend.get_or_lock("k", "token", 5) == "token"
    finally:
        backend.close()
    asyncio_client = redis.asyncio.cluster.RedisCluster.from_url(cluster.url)
    async_backend = AsyncRedisBackend(asyncio_client, prefix=prefix)

    async def check() -> None:
        try:
            assert await async_backend.aget_or_lock("k", "other", 5) == "token"
        finally:
            await async_backend.aclose()

    asyncio.run(check())


def test_a_decoding_cluster_client_is_refused(cluster: Cluster) -> None:
    """A cluster client with decode_responses=True is refused like a plain one."""
    client = redis.cluster.RedisCluster.from_url(cluster.url, decode_responses=True)
    try:
        with pytest.raises(ValueError, match="decode_responses"):
            RedisBackend(client)
    finally:
        client.close()


# --- Moving slots and failing over, under load -------------------------------------


def _migrate(
    cluster: Cluster,
    slot: int,
    source: Server,
    target: Server,
    meanwhile: Callable[[], None],
) -> None:
    """Move *slot* from *source* to *target*, a key at a time, as redis-cli reshard does.

    *meanwhile* runs after each key moved, while the slot is half-moved.
    """
    source_id, target_id = cluster.node_id(source), cluster.node_id(target)
    with source.client() as src, target.client() as dst:
        dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", source_id)
        src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", target_id)
        while True:
            keys = src.execute_command("CLUSTER GETKEYSINSLOT", slot, 1)
            if not keys:
                break
            src.execute_command(
                "MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys
            )
            meanwhile()  # keep the slot half-moved for a while, under load
        for server in cluster.masters:
            with server.client() as client:
                client.execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)


def test_moving_a_slot_under_load_serves_no_wrong_value(
    cluster: Cluster, backends: Callable[[], RedisBackend], prefix: str
) -> None:
    """Keys of a slot being resharded serve no wrong value and no error.

    While keys of one slot sit on two nodes, a two-key script can be refused (TRYAGAIN,
    ASK): with the default on_backend_error="compute" that call computes without the
    lock, so a key may be computed twice at once then, never more.
    """
    codec = RedisCodec(prefix, None)
    slot = key_slot(codec.value_key("anchor").encode())
    keys = keys_in_slot(codec, slot, 4)
    source = owner(cluster, codec.value_key(keys[0]))
    target = next(server for server in cluster.masters if server is not source)
    with Load([backends(), backends()], keys, threads=3) as load:
        load.until_more(served=50)  # under way
        _migrate(cluster, slot, source, target, lambda: load.until_more(served=10))
        load.until_more(served=50, computed=len(keys))  # and on after the move
    assert owner(cluster, codec.value_key(keys[0])) is target
    tally = load.tally
    assert tally.wrong == []
    assert tally.errors == {}
    assert tally.served > 0
    assert max(tally.most_at_once.values()) <= 2  # a refused script computes unlocked


def test_a_master_failover_under_load_serves_no_wrong_value(
    tmp_path: Path,
) -> None:
    """A killed master's replica takes over: callers get errors or right values, never wrong ones."""
    cluster = _start(tmp_path, replicas=1)
    try:
        prefix = "fo"
        codec = RedisCodec(prefix, None)
        doomed, replica = cluster.masters[0], cluster.replicas[0]
        with doomed.client() as client:
            start, *_ = next(
                s
                for s in client.execute_command("CLUSTER SLOTS")
                if int(s[2][1]) == doomed.port
            )
        keys = keys_in_slot(codec, int(start), 4)
        made = [
            RedisBackend.from_url(cluster.url, cluster=True, prefix=prefix)
            for _ in range(2)
        ]
        try:
            with Load(made, keys, threads=3) as load:
                load.until_more(served=50)  # under way
                doomed.kill()
                wait_for("the replica's promotion", lambda: _is_master(replica))
                wait_for("cluster_state:ok", cluster.state_ok)
                errors_at_promotion = sum(load.tally.errors.values())
                served_at_promotion = load.tally.served
                # Values served, and every key computed again, after the promotion.
                load.until_more(served=50, computed=len(keys))
            tally = load.tally
            assert tally.wrong == []
            assert set(tally.errors) <= {"BackendError"}
            assert tally.served > served_at_promotion  # served again after the failover
            # Once the cluster is whole again, the client has followed the failover.
            after = Load(made, keys, threads=1)
            with after:
                after.until_more(served=50)
            assert after.tally.errors == {}
            assert after.tally.wrong == []
            assert after.tally.served > 0
            # A lock lost with the master can cost one duplicate computation, no more.
            assert max(tally.most_at_once.values()) <= 2
            print(
                f"failover: {errors_at_promotion} errors until promotion, "
                f"{sum(tally.errors.values())} in all, {tally.served} values served"
            )
        finally:
            for backend in made:
                backend.close()
    finally:
        cluster.stop()


def _is_master(server: Server) -> bool:
    with server.client() as client:
        return bool(client.info("replication").get("role") == "master")


def tagged(value: object, *tags: str) -> Entry:
    return Entry(value, 1.0, 0.0, tags)


def store(backend: RedisBackend, key: str, entry: Entry) -> Entry | None:
    claim = backend.get_or_lock(key, "leader", 10)
    assert isinstance(claim, Claim)
    return backend.set_and_unlock(key, entry, 60, "leader", ticket=claim.ticket)


def test_tags_hold_across_slots_and_an_invalidation_is_final(
    backends: Callable[[], RedisBackend],
) -> None:
    """Values on every master, tags in other slots: checked by a second round trip."""
    writer, reader = backends(), backends()
    keys = [f"k{i}" for i in range(12)]  # spread over the three masters' slots
    for i, key in enumerate(keys):
        assert store(writer, key, tagged(i, "team", f"user:{i % 3}")) is not None
    assert [reader.get(key) for key in keys] == [
        tagged(i, "team", f"user:{i % 3}") for i in range(12)
    ]
    reader.invalidate_tag("user:1")
    for i, key in enumerate(keys):
        expected = None if i % 3 == 1 else tagged(i, "team", f"user:{i % 3}")
        assert writer.get(key) == expected
        assert reader.get(key) == expected
    # The look-or-lock of an invalidated value takes the lock at once.
    assert writer.get_or_lock("k1", "next", 10) == "next"
    assert writer.get_or_lock("k0", "next", 10) == tagged(0, "team", "user:0")
    # Batches check them too, in one more round trip.
    assert writer.get_many(keys[:3]) == [
        tagged(0, "team", "user:0"),
        None,
        tagged(2, "team", "user:2"),
    ]
    writer.invalidate_tag("team")
    assert reader.get_many(keys) == [None] * 12
    found = reader.get_or_lock_many(keys[3:6], "batch", 10)
    assert found == ["batch", "batch", "batch"]


def test_a_store_begun_before_a_tags_invalidation_is_refused_on_a_cluster(
    backends: Callable[[], RedisBackend],
) -> None:
    """The tag's stamp refuses the ticket; the lock is released; nothing stored."""
    backend, other = backends(), backends()
    claim = backend.get_or_lock("k", "leader", 10)
    assert isinstance(claim, Claim)
    other.invalidate_tag("t")
    assert (
        backend.set_and_unlock("k", tagged(1, "t"), 60, "leader", ticket=claim.ticket)
        is None
    )
    assert other.get("k") is None
    assert other.get_or_lock("k", "next", 10) == "next"  # released
    claim = other.lock("j", "t2", 10)
    other.invalidate_tag("u")
    assert other.set("j", tagged(1, "u"), 60, ticket=claim.ticket) is None
    items = [
        ("a", tagged(1, "u"), 60.0, claim.ticket),
        ("b", tagged(2, "v"), 60.0, claim.ticket),
    ]
    for key in ("a", "b"):
        assert other.lock(key, "many", 10) == "many"
    assert other.set_and_unlock_many(items, "many") == [None, tagged(2, "v")]
    assert other.get_or_lock("a", "after", 10) == "after"  # refused, and released


def test_a_tag_invalidated_between_its_stamp_and_the_store_is_still_final(
    backends: Callable[[], RedisBackend],
) -> None:
    """The race the two steps leave: the store lands with the old stamp, read as none."""
    backend, other = backends(), backends()
    claim = backend.get_or_lock("k", "leader", 10)
    assert isinstance(claim, Claim)
    anyone: Any = backend
    flow = _many.stored(
        anyone._batches, [("k", tagged(1, "t"), 60.0, claim.ticket)], "leader"
    )
    stamping = next(flow)  # the tags' stamps, first
    stamps = anyone._send_many(stamping)
    other.invalidate_tag("t")  # between the two steps
    storing = flow.send(stamps)
    with pytest.raises(StopIteration) as done:
        flow.send(anyone._send_many(storing))
    assert done.value.value == [tagged(1, "t")]  # stored, but with the older stamp
    assert other.get("k") is None
    assert backend.get("k") is None
    assert other.get_or_lock("k", "next", 10) == "next"


def test_a_tagged_function_on_a_cluster_computes_once_per_invalidation(
    backends: Callable[[], RedisBackend],
) -> None:
    backend = backends()
    calls: list[int] = []

    @cached_stampede_safe(key="u:{user_id}", tags=("user:{user_id}",), backend=backend)
    def user(user_id: int) -> int:
        calls.append(user_id)
        return len(calls)

    assert [user(1), user(1), user(2)] == [1, 1, 2]
    backend.invalidate_tag("user:1")
    assert [user(1), user(1), user(2)] == [3, 3, 2]
    assert calls == [1, 2, 1]
