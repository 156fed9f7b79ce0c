"""The near cache on real topologies: a 3-master Redis Cluster, Sentinel, and Valkey.

Each backend stands for a process: it has connections, a listener and a near cache
of its own. A reader fills its near cache; a writer on the same prefix stores or
invalidates; the reader must stop serving the old values within a bounded wait (the
invalidation message's trip) and serve the new ones. The writer itself must read its
own writes at once. Losing the listener's server (a Sentinel failover, the cluster
node the listener is subscribed on) must flush the near cache, so that nothing read
before the loss is served once the connection comes back. Two rules about reads in
flight are made to happen on purpose, by holding a read or a write at the right step.

redis-py reconnects the listener's pub/sub connection by itself (it retries once
and resubscribes) without the listener seeing the loss: the tests of a dropped
connection and of a planned failover prove that the near cache is flushed all the
same, on the new subscription's confirmation.

Valkey is a private ``valkey-server`` if one is on PATH, else valkey-py over the
session's redis-server (Debian 12 has no valkey-server): the test ids say which.
Servers are private loopback processes started here and stopped by pid (see
``_servers``). Every wait is bounded; no assertion is about time.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pytest
import redis
import valkey
from redis.crc import key_slot

from _servers import (
    Cluster,
    SentinelSet,
    Server,
    ServerError,
    start_cluster,
    start_data_server,
    start_sentinels,
    unavailable,
    wait_for,
)
from _waiting import until, until_async
from stampede_guard import (
    AsyncRedisBackend,
    BackendError,
    Entry,
    NearCache,
    RedisBackend,
    StampedeStats,
)
from stampede_guard._near import Near
from stampede_guard.backends.redis._codec import RedisCodec
from stampede_guard.backends.redis._scripts import SOURCES
from stampede_guard.metrics import NearEvent, NearFlush, NearInvalidation

pytestmark = [
    pytest.mark.redis,
    pytest.mark.timeout(60),
    pytest.mark.usefixtures("abandoned_connections_collected"),
]

T = TypeVar("T")

SERVICE = "sgnear"
TTL = 300.0  # seconds in Redis: nothing here may expire by itself
SETTLE = 30.0  # seconds for a failover, a reconnection or a message to come through
# A near entry outlives every wait here: only an invalidation message (or a flush)
# can make a near cache give up a value it holds.
NEAR_TTL = 600.0
VALKEY_SERVER = shutil.which("valkey-server")
VALKEY = "valkey-server" if VALKEY_SERVER else "valkey-py-on-redis-server-stand-in"


# --- Helpers -------------------------------------------------------------------------


def entry(value: object) -> Entry:
    """Return an entry of *value*, stamped now."""
    return Entry(value, created_at=time.time(), compute_seconds=0.01)


def near_settings(metrics: Recorder | None = None) -> NearCache:
    """Return the near cache settings of these tests (see `NEAR_TTL`)."""
    return NearCache(ttl=NEAR_TTL, metrics=metrics)


def value(found: Entry | None) -> object:
    """Return the value of *found*, or None for no entry."""
    return None if found is None else found.value


def near_of(backend: RedisBackend | AsyncRedisBackend) -> Near:
    """Return *backend*'s near cache (the tests make every backend with one)."""
    near = backend._near
    assert near is not None
    return near


class Recorder:
    """A metrics hook: StampedeStats, plus each flush and the invalidations per key."""

    def __init__(self) -> None:
        self.stats = StampedeStats()
        self.flushes: list[NearFlush] = []
        self._lock = threading.Lock()
        self._invalidated: Counter[str] = Counter()

    def __call__(self, event: NearEvent, /) -> None:
        self.stats(event)
        with self._lock:
            if isinstance(event, NearFlush):
                self.flushes.append(event)
            elif isinstance(event, NearInvalidation):
                self._invalidated[event.key] += 1

    def invalidated(self, key: str) -> int:
        """Return how many messages said *key* changed."""
        with self._lock:
            return self._invalidated[key]

    def heard(self, key: str, messages: int) -> Callable[[], bool]:
        """Return a check: have *messages* messages said *key* changed?"""
        return lambda: self.invalidated(key) >= messages


class Watch:
    """Reads of keys until each serves what is expected, and never anything else after."""

    def __init__(self, expected: dict[str, object]) -> None:
        self.expected = expected
        self.seen: set[str] = set()
        # Anything else served after the expected value was: an older value back.
        self.regressions: list[tuple[str, object]] = []

    def saw(self, key: str, found: object) -> None:
        if found == self.expected[key]:
            self.seen.add(key)
        elif key in self.seen:
            self.regressions.append((key, found))

    @property
    def done(self) -> bool:
        return self.seen == set(self.expected)


def fill(backend: RedisBackend, keys: list[str], within: float = 10.0) -> None:
    """Read *keys* until the near cache holds each (once its channel is confirmed)."""
    near = near_of(backend)

    def filled() -> bool:
        for key in keys:
            if near.lookup(key) is None:
                try:
                    backend.get(key)  # the first also asks the listener to subscribe
                except BackendError:
                    return False
        return near.live and all(near.lookup(key) is not None for key in keys)

    until("the near cache to hold every key", filled, within)


async def afill(
    backend: AsyncRedisBackend, keys: list[str], within: float = 10.0
) -> None:
    """`fill`, for an asyncio backend."""
    near = near_of(backend)
    deadline = time.monotonic() + within
    while True:
        for key in keys:
            if near.lookup(key) is None:
                try:
                    await backend.aget(key)
                except BackendError:
                    break
        if near.live and all(near.lookup(key) is not None for key in keys):
            return
        if time.monotonic() > deadline:
            msg = f"the near cache did not hold every key within {within} s"
            raise AssertionError(msg)
        await asyncio.sleep(0.01)


def watch(backend: RedisBackend, expected: dict[str, object]) -> Watch:
    """Read every key until it serves its expected value; record any regression."""
    seen = Watch(expected)

    def caught_up() -> bool:
        for key in expected:
            seen.saw(key, value(backend.get(key)))
        return seen.done

    until("the reader to serve the new values", caught_up, SETTLE)
    return seen


async def awatch(backend: AsyncRedisBackend, expected: dict[str, object]) -> Watch:
    """`watch`, for an asyncio backend."""
    seen = Watch(expected)
    deadline = time.monotonic() + SETTLE
    while True:
        for key in expected:
            seen.saw(key, value(await backend.aget(key)))
        if seen.done:
            return seen
        if time.monotonic() > deadline:
            msg = f"the reader did not serve the new values within {SETTLE} s"
            raise AssertionError(msg)
        await asyncio.sleep(0.005)


def settle(writer: RedisBackend, recorder: Recorder, barriers: list[str]) -> None:
    """Wait until the near cache *recorder* watches has heard every earlier message.

    On a cluster, a message reaches the listener's node over the cluster bus, a
    moment after the write on another node: a store made before the listener
    subscribed may still be announced after it. An invalidation of a barrier key
    on each master comes after everything that master published before it.
    """
    heard = {key: recorder.invalidated(key) + 1 for key in barriers}
    for key in barriers:
        writer.delete(key)
    for key in barriers:
        until("the barrier's message", recorder.heard(key, heard[key]), SETTLE)


async def asettle(
    writer: AsyncRedisBackend, recorder: Recorder, barriers: list[str]
) -> None:
    """`settle`, for an asyncio backend."""
    heard = {key: recorder.invalidated(key) + 1 for key in barriers}
    for key in barriers:
        await writer.adelete(key)
    for key in barriers:
        await until_async(
            "the barrier's message", recorder.heard(key, heard[key]), SETTLE
        )


def retrying(call: Callable[[], T], within: float = SETTLE) -> T:
    """Call *call* until it raises no BackendError (a failover under way)."""
    deadline = time.monotonic() + within
    while True:
        try:
            return call()
        except BackendError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


async def aretrying(call: Callable[[], Awaitable[T]], within: float = SETTLE) -> T:
    """`retrying`, for an asyncio call."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await call()
        except BackendError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


def assert_near_holds(
    backend: RedisBackend | AsyncRedisBackend, expected: dict[str, object]
) -> None:
    """The near cache holds each expected value (none where None is expected)."""
    near = near_of(backend)
    held = {key: value(near.lookup(key)) for key in expected}
    assert held == expected


# --- Topologies ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Topology:
    """How to make backends on one topology, and keys that cover its masters.

    *connect* and *aconnect* take the prefix, the near cache (or None) and any more
    options of ``from_url``/``from_sentinel`` (``client_name=``...).
    """

    name: str
    connect: Callable[..., RedisBackend]
    aconnect: Callable[..., AsyncRedisBackend]
    masters: list[Server] | None  # a cluster's masters; None for one master
    urls: list[str]  # ``redis://`` URLs of the masters, to look at them directly

    def keys(self, prefix: str, per_master: int = 2) -> list[str]:
        """Return cache keys, *per_master* on each master of a cluster (6 otherwise)."""
        if self.masters is None:
            return [f"k{n}" for n in range(3 * per_master)]
        return keys_on_every_master(self.masters, prefix, per_master)

    def barriers(self, prefix: str) -> list[str]:
        """Return a key on each master, to invalidate as a barrier (see `settle`)."""
        if self.masters is None:
            return ["barrier"]
        return keys_on_every_master(self.masters, prefix, 1, stem="barrier")

    def keys_on(self, url: str, keys: list[str], prefix: str) -> list[str]:
        """Return those of *keys* that live on the master at *url*."""
        if self.masters is None:
            return keys
        port = urlsplit(url).port
        codec, ranges = RedisCodec(prefix, None), slot_owners(self.masters)
        return [
            key
            for key in keys
            if any(
                first <= key_slot(codec.value_key(key).encode()) <= last and at == port
                for first, last, at in ranges
            )
        ]


def slot_owners(masters: list[Server]) -> list[tuple[int, int, int]]:
    """Return the cluster's slot ranges as (first, last, port of the master)."""
    live = next(server for server in masters if server.proc.poll() is None)
    with live.client() as client:
        return [
            (int(first), int(last), int(nodes[1]))
            for first, last, nodes, *_ in client.execute_command("CLUSTER SLOTS")
        ]


def keys_on_every_master(
    masters: list[Server], prefix: str, per_master: int, stem: str = "k"
) -> list[str]:
    """Return cache keys (*stem* and a number) whose slots lie *per_master* on each master."""
    codec = RedisCodec(prefix, None)
    ranges = slot_owners(masters)
    by_port: dict[int, list[str]] = {}
    n = 0
    while len(by_port) < len(masters) or min(map(len, by_port.values())) < per_master:
        key = f"{stem}{n}"
        n += 1
        slot = key_slot(codec.value_key(key).encode())
        port = next(port for first, last, port in ranges if first <= slot <= last)
        if len(by_port.setdefault(port, [])) < per_master:
            by_port[port].append(key)
    assert set(by_port) == {server.port for server in masters}
    return [key for keys in by_port.values() for key in keys]


def _start_cluster(workdir: Path, *, replicas: int = 0) -> Cluster:
    try:
        return start_cluster(workdir, replicas=replicas)
    except (OSError, ServerError) as exc:
        unavailable(f"could not start a Redis Cluster: {exc}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A 3-master cluster shared by this module's tests that do not break it."""
    started = _start_cluster(tmp_path_factory.mktemp("near-cluster"))
    yield started
    started.stop()


def _promote(replica: Server) -> None:
    """Make *replica* the master of its dead master's slots, now (``TAKEOVER``).

    Not the cluster's own failover, whose election waited out the 20 s bound on a
    loaded CI machine: these tests are about the near cache after a master's death,
    not about how long the cluster takes to notice it.
    """
    with replica.client() as client:
        try:
            client.execute_command("CLUSTER FAILOVER TAKEOVER")
        except redis.ResponseError:  # "send CLUSTER FAILOVER to a replica": promoted
            if not _is_master(replica):
                raise
    wait_for("the replica's promotion", lambda: _is_master(replica))


def _is_master(server: Server) -> bool:
    with server.client() as client:
        return bool(client.info("replication").get("role") == "master")


def _start_sentinels(workdir: Path) -> SentinelSet:
    return start_sentinels(workdir, SERVICE)


@pytest.fixture(scope="module")
def steady_sentinels(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelSet]:
    """A Sentinel set shared by this module's tests that do not break it."""
    watching = _start_sentinels(tmp_path_factory.mktemp("near-sentinels"))
    yield watching
    watching.stop()


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[SentinelSet]:
    """A Sentinel set of this test's own, which it may break."""
    watching = _start_sentinels(tmp_path)
    yield watching
    watching.stop()


@pytest.fixture(scope="module")
def server_url(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[str]:
    """A ``valkey://`` URL: a private valkey-server if installed, else the session's Redis."""
    if VALKEY_SERVER is None:
        url: str = request.getfixturevalue("redis_url")
        yield url.replace("redis://", "valkey://", 1)
        return
    try:
        server = start_data_server(VALKEY_SERVER, tmp_path_factory.mktemp("valkey"))
    except (OSError, ServerError) as exc:
        unavailable(f"could not start valkey-server: {exc}")
    yield server.url.replace("redis://", "valkey://", 1)
    server.stop()


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test's own."""
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture(params=["cluster-3-masters", "sentinel", VALKEY])
def topology(request: pytest.FixtureRequest, prefix: str) -> Iterator[Topology]:
    """Each topology in turn (its servers started on first use, once per module)."""
    name: str = request.param
    if name == "cluster-3-masters":
        started: Cluster = request.getfixturevalue("cluster")
        yield Topology(
            name,
            partial(RedisBackend.from_url, started.url, cluster=True),
            partial(AsyncRedisBackend.from_url, started.url, cluster=True),
            started.masters,
            [server.url for server in started.masters],
        )
        return
    if name == "sentinel":
        watching: SentinelSet = request.getfixturevalue("steady_sentinels")
        yield Topology(
            name,
            partial(RedisBackend.from_sentinel, [watching.address], SERVICE),
            partial(AsyncRedisBackend.from_sentinel, [watching.address], SERVICE),
            None,
            [watching.master.url],  # steady: never failed over
        )
        return
    url: str = request.getfixturevalue("server_url")
    yield Topology(
        name,
        partial(RedisBackend.from_url, url),
        partial(AsyncRedisBackend.from_url, url),
        None,
        [url.replace("valkey://", "redis://", 1)],
    )
    # The stand-in may be the session's shared server: delete this test's keys only.
    with valkey.Valkey.from_url(url) as client:
        stale = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if stale:
            client.delete(*stale)


def test_the_valkey_topology_uses_valkey_py_clients(
    server_url: str, prefix: str
) -> None:
    """The Valkey runs go through valkey-py (on valkey-server, or the stand-in)."""
    backend = RedisBackend.from_url(
        server_url, prefix=prefix, near_cache=near_settings()
    )
    try:
        assert isinstance(backend.client, valkey.Valkey)
    finally:
        backend.close()


# --- Coherence across processes ------------------------------------------------------


def test_a_change_by_another_process_reaches_this_processs_near_cache(
    topology: Topology, prefix: str
) -> None:
    """B stores or invalidates keys on every master: A stops serving its near copies."""
    recorder = Recorder()
    reader = topology.connect(prefix=prefix, near_cache=near_settings(metrics=recorder))
    writer = topology.connect(prefix=prefix, near_cache=near_settings())
    try:
        keys = topology.keys(prefix)
        for key in keys:
            writer.set(key, entry(f"old:{key}"), TTL)
        fill(reader, keys)
        settle(writer, recorder, topology.barriers(prefix))
        fill(reader, keys)
        assert_near_holds(reader, {key: f"old:{key}" for key in keys})
        # Half the keys get a new value, the other half are invalidated.
        stored, deleted = keys[::2], keys[1::2]
        for key in stored:
            writer.set(key, entry(f"new:{key}"), TTL)
        for key in deleted:
            writer.delete(key)
        expected: dict[str, object] = {key: f"new:{key}" for key in stored}
        expected.update(dict.fromkeys(deleted))
        seen = watch(reader, expected)
        assert seen.regressions == []
        for _ in range(3):
            assert {key: value(reader.get(key)) for key in keys} == expected
        # Served from the near cache again, the new values.
        assert_near_holds(reader, expected)
        assert all(recorder.invalidated(key) >= 1 for key in keys)
        assert recorder.stats.snapshot().near_flushes == 0
    finally:
        reader.close()
        writer.close()


def test_a_change_by_another_process_reaches_an_asyncio_near_cache(
    topology: Topology, prefix: str
) -> None:
    """The same with AsyncRedisBackend on both sides."""
    recorder = Recorder()

    async def main() -> None:
        reader = topology.aconnect(
            prefix=prefix, near_cache=near_settings(metrics=recorder)
        )
        writer = topology.aconnect(prefix=prefix, near_cache=near_settings())
        try:
            keys = topology.keys(prefix)
            for key in keys:
                await writer.aset(key, entry(f"old:{key}"), TTL)
            await afill(reader, keys)
            await asettle(writer, recorder, topology.barriers(prefix))
            await afill(reader, keys)
            assert_near_holds(reader, {key: f"old:{key}" for key in keys})
            stored, deleted = keys[::2], keys[1::2]
            for key in stored:
                await writer.aset(key, entry(f"new:{key}"), TTL)
            for key in deleted:
                await writer.adelete(key)
            expected: dict[str, object] = {key: f"new:{key}" for key in stored}
            expected.update(dict.fromkeys(deleted))
            seen = await awatch(reader, expected)
            assert seen.regressions == []
            for _ in range(3):
                assert {key: value(await reader.aget(key)) for key in keys} == expected
            assert_near_holds(reader, expected)
        finally:
            await reader.aclose()
            await writer.aclose()

    asyncio.run(main())
    assert recorder.stats.snapshot().near_invalidations >= 6


# --- Read your writes ----------------------------------------------------------------

ROUNDS = 5


class ReadingAlong:
    """A thread reading keys through a backend all along, checking each value's floor.

    *written* holds, per key, the value of the last write that returned: a read
    that begins after it must serve that value or a later one.
    """

    def __init__(self, backend: RedisBackend, keys: list[str]) -> None:
        self.backend, self.keys = backend, keys
        self.written = dict.fromkeys(keys, 0)
        self.older: list[tuple[str, object, int]] = []
        self.failures: list[BaseException] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        try:
            while not self.done.is_set():
                for key in self.keys:
                    floor = self.written[key]
                    found = value(self.backend.get(key))
                    if not isinstance(found, int) or found < floor:
                        self.older.append((key, found, floor))
        except BaseException as exc:
            self.failures.append(exc)

    def stop(self) -> None:
        self.done.set()
        if self.thread.ident is not None:
            self.thread.join(10)
        assert not self.thread.is_alive()


def test_the_writer_reads_its_own_writes_at_once(
    topology: Topology, prefix: str
) -> None:
    """With the old value in its near cache, a write or delete is read back at once.

    A thread of the same process reads all along: a read begun after a write
    returned never serves an older value.
    """
    recorder = Recorder()
    writer = topology.connect(prefix=prefix, near_cache=near_settings(metrics=recorder))
    keys = topology.keys(prefix)
    reading = ReadingAlong(writer, keys)
    try:
        for key in keys:
            writer.set(key, entry(0), TTL)
        fill(writer, keys)
        settle(writer, recorder, topology.barriers(prefix))
        base = {key: recorder.invalidated(key) for key in keys}
        reading.thread.start()
        for round_ in range(1, ROUNDS + 1):
            for key in keys:
                # Our previous write's message is back: the near copy read now
                # stays until the next write replaces it.
                until(
                    "our own write's message",
                    recorder.heard(key, base[key] + round_ - 1),
                )
                fill(writer, [key])
                assert value(near_of(writer).lookup(key)) == round_ - 1
                writer.set(key, entry(round_), TTL)
                assert value(writer.get(key)) == round_
                reading.written[key] = round_
        reading.stop()
        assert reading.failures == []
        assert reading.older == []
        for key in keys:
            until("our own write's message", recorder.heard(key, base[key] + ROUNDS))
            fill(writer, [key])
            writer.delete(key)
            assert writer.get(key) is None
        assert recorder.stats.snapshot().near_flushes == 0
    finally:
        reading.stop()
        writer.close()


def test_an_asyncio_writer_reads_its_own_writes_at_once(
    topology: Topology, prefix: str
) -> None:
    """The same with AsyncRedisBackend, a task reading all along."""
    recorder = Recorder()
    older: list[tuple[str, object, int]] = []

    async def main() -> None:
        writer = topology.aconnect(
            prefix=prefix, near_cache=near_settings(metrics=recorder)
        )
        keys = topology.keys(prefix)
        written = dict.fromkeys(keys, 0)
        done = asyncio.Event()

        async def read_all_along() -> None:
            while not done.is_set():
                for key in keys:
                    floor = written[key]
                    found = value(await writer.aget(key))
                    if not isinstance(found, int) or found < floor:
                        older.append((key, found, floor))
                await asyncio.sleep(0)

        try:
            for key in keys:
                await writer.aset(key, entry(0), TTL)
            await afill(writer, keys)
            await asettle(writer, recorder, topology.barriers(prefix))
            base = {key: recorder.invalidated(key) for key in keys}
            reading = asyncio.create_task(read_all_along())
            for round_ in range(1, ROUNDS + 1):
                for key in keys:
                    await until_async(
                        "our own write's message",
                        recorder.heard(key, base[key] + round_ - 1),
                    )
                    await afill(writer, [key])
                    assert value(near_of(writer).lookup(key)) == round_ - 1
                    await writer.aset(key, entry(round_), TTL)
                    assert value(await writer.aget(key)) == round_
                    written[key] = round_
            done.set()
            await asyncio.wait_for(reading, 10)
            for key in keys:
                await until_async(
                    "our own write's message", recorder.heard(key, base[key] + ROUNDS)
                )
                await afill(writer, [key])
                await writer.adelete(key)
                assert await writer.aget(key) is None
        finally:
            done.set()
            await writer.aclose()

    asyncio.run(main())
    assert older == []


# --- Reads overtaken by writes -------------------------------------------------------
# The two safety rules of ``_near`` about reads in flight, made to happen on purpose:
# the steps of a read and a write are held at the right points by wrapping the
# backend's script runner, its near cache's admit, and its listener's routing.


class HeldScripts:
    """A backend's scripts, a store held before it is sent until *go* is set."""

    def __init__(self, scripts: Any, reached: threading.Event, go: threading.Event):
        self.scripts, self.reached, self.go = scripts, reached, go

    def run(self, name: str, keys: tuple[str, ...], args: tuple[Any, ...]) -> Any:
        if name == "set_and_notify":
            self.reached.set()
            assert self.go.wait(10)
        return self.scripts.run(name, keys, args)


def hold_admit(
    monkeypatch: pytest.MonkeyPatch,
    near: Near,
    reached: threading.Event,
    go: Callable[[], bool],
) -> None:
    """Hold *near*'s next admits (a read's reply, read) until *go* says so."""
    admit = near.admit

    def held(*args: Any, **kwargs: Any) -> None:
        reached.set()
        until("the read's release", go)
        admit(*args, **kwargs)

    monkeypatch.setattr(near, "admit", held)


def hold_messages(
    monkeypatch: pytest.MonkeyPatch, backend: RedisBackend, go: threading.Event
) -> None:
    """Hold the messages of *backend*'s near channel until *go* is set."""
    hub = backend._listener._hub
    route, channel = hub.route, near_of(backend).channel.encode()

    def held(message: dict[str, Any]) -> None:
        if message["type"] == "message" and message["channel"] == channel:
            go.wait(10)
        route(message)

    monkeypatch.setattr(hub, "route", held)


def test_a_read_overtaken_by_its_own_processs_write_cannot_refill_the_old_value(
    topology: Topology, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read that read the old value mid-write cannot put it back in the writer's cache.

    The read begins after the write dropped the near copy, reads before the write
    is sent, and lands after the write returned; the write's message is held back
    meanwhile, so only the drop after the write keeps the old value out.
    """
    writer = topology.connect(prefix=prefix, near_cache=near_settings())
    try:
        key = topology.keys(prefix)[0]
        writer.set(key, entry("old"), TTL)
        fill(writer, [key])
        near = near_of(writer)
        dropped, read, returned, released = (threading.Event() for _ in range(4))
        monkeypatch.setattr(
            writer, "_scripts", HeldScripts(writer._scripts, dropped, read)
        )
        hold_admit(monkeypatch, near, read, returned.is_set)
        hold_messages(monkeypatch, writer, released)
        found: list[object] = []

        def reader() -> None:
            assert dropped.wait(10)  # the write dropped the near copy, sent nothing
            found.append(value(writer.get(key)))

        thread = threading.Thread(target=reader)
        thread.start()
        writer.set(key, entry("new"), TTL)  # sent once the read has read
        returned.set()  # the read's reply lands now
        thread.join(10)
        assert found == ["old"]  # it began before the write returned: fair
        assert value(near.lookup(key)) is None
        assert value(writer.get(key)) == "new"  # the write's message still held
    finally:
        released.set()
        writer.close()


def test_a_read_that_lands_after_another_processs_write_message_does_not_fill(
    topology: Topology, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read that lands after another process's write message does not fill the cache.

    A's read is sent before B's write; A handles its reply after B's message came:
    the reply is kept out of A's near cache, and A then serves B's value.
    """
    recorder = Recorder()
    reader = topology.connect(prefix=prefix, near_cache=near_settings(metrics=recorder))
    writer = topology.connect(prefix=prefix, near_cache=near_settings())
    try:
        keys = topology.keys(prefix)
        key, other = keys[0], keys[-1]
        writer.set(key, entry("old"), TTL)
        writer.set(other, entry("other"), TTL)
        fill(reader, [other])  # the near cache is live; *key* is not in it
        settle(writer, recorder, topology.barriers(prefix))
        read = threading.Event()
        heard = recorder.heard(key, recorder.invalidated(key) + 1)
        hold_admit(monkeypatch, near_of(reader), read, heard)
        found: list[object] = []
        thread = threading.Thread(target=lambda: found.append(value(reader.get(key))))
        thread.start()
        assert read.wait(10)  # A has read "old"; its reply waits
        writer.set(key, entry("new"), TTL)  # B's message releases A's reply
        thread.join(SETTLE)
        assert not thread.is_alive()
        assert found == ["old"]
        assert near_of(reader).lookup(key) is None
        assert value(reader.get(key)) == "new"
    finally:
        reader.close()
        writer.close()


# --- Losing the listener's server ----------------------------------------------------


def _write_around_the_library(
    server: Server, codec: RedisCodec, values: Mapping[str, object]
) -> None:
    """Store *values* on *server* directly: no message, no near cache can hear of it."""
    with server.client() as client:
        for key, new in values.items():
            data, _ = codec.encode(key, entry(new))
            client.set(codec.value_key(key), data, px=int(TTL * 1000))


def _replicated(replica: Server, codec: RedisCodec, keys: list[str]) -> bool:
    with replica.client() as client:
        return bool(client.exists(*map(codec.value_key, keys)) == len(keys))


def _listener_connection(url: str, name: str) -> str | None:
    """Return the id of the pub/sub connection named *name* on the server at *url*."""
    with redis.Redis.from_url(url, socket_timeout=5) as client:
        found = [
            str(c["id"])
            for c in client.client_list()
            if c.get("name") == name and int(c.get("sub", 0)) > 0
        ]
    return found[0] if len(found) == 1 else None


def _find_listener(urls: list[str], name: str) -> tuple[str, str]:
    """Return the server (URL) and id of the listener's connection named *name*."""
    found: list[tuple[str, str]] = []

    def look() -> bool:
        found.extend(
            (url, connection)
            for url in urls
            if (connection := _listener_connection(url, name)) is not None
        )
        return bool(found)

    until("the listener's connection", look)
    return found[0]


def _drop_and_store(
    url: str, connection: str, codec: RedisCodec, key: str, new: object
) -> None:
    """Drop *connection*, then store *new* the library's way, in one transaction.

    The store's message is published while the listener is away: it is missed.
    """
    call = codec.store(key, entry(new), TTL, None)
    with redis.Redis.from_url(url, socket_timeout=5) as client:
        pipe = client.pipeline(transaction=True)
        pipe.execute_command("CLIENT", "KILL", "ID", connection)
        pipe.eval(SOURCES[call.script], len(call.keys), *call.keys, *call.args)
        _, stored = pipe.execute()
    assert stored == 1


MISSED_WAIT = 5.0  # seconds; the near cache's ttl (30 s) is what would end it


@pytest.mark.slow
def test_a_listener_connection_dropped_and_reconnected_flushes_the_near_cache(
    topology: Topology, prefix: str, request: pytest.FixtureRequest
) -> None:
    """A change announced while the listener's connection was down is not missed."""
    name = f"near-{prefix}"
    recorder = Recorder()
    reader = topology.connect(
        prefix=prefix, near_cache=near_settings(metrics=recorder), client_name=name
    )
    writer = topology.connect(prefix=prefix, near_cache=None)
    try:
        keys = topology.keys(prefix)
        for key in keys:
            writer.set(key, entry("old"), TTL)
        fill(reader, keys)
        settle(writer, recorder, topology.barriers(prefix))
        fill(reader, keys)
        url, connection = _find_listener(topology.urls, name)
        key = topology.keys_on(url, keys, prefix)[0]
        _drop_and_store(url, connection, RedisCodec(prefix, None), key, "new")
        # The listener is back on a connection of its own (reconnected by redis-py).
        until(
            "the listener's new connection",
            lambda: _listener_connection(url, name) not in (None, connection),
        )
        until(
            "the reader to serve the value stored while its listener was away",
            lambda: value(reader.get(key)) == "new",
            MISSED_WAIT,
        )
    finally:
        reader.close()
        writer.close()


@pytest.mark.slow
def test_an_asyncio_listener_connection_dropped_and_reconnected_flushes_the_near_cache(
    topology: Topology, prefix: str, request: pytest.FixtureRequest
) -> None:
    """The same with AsyncRedisBackend."""
    name = f"near-{prefix}"
    recorder = Recorder()
    codec = RedisCodec(prefix, None)

    async def main() -> None:
        reader = topology.aconnect(
            prefix=prefix, near_cache=near_settings(metrics=recorder), client_name=name
        )
        writer = topology.aconnect(prefix=prefix, near_cache=None)
        try:
            keys = topology.keys(prefix)
            for key in keys:
                await writer.aset(key, entry("old"), TTL)
            await afill(reader, keys)
            await asettle(writer, recorder, topology.barriers(prefix))
            await afill(reader, keys)
            url, connection = await asyncio.to_thread(
                _find_listener, topology.urls, name
            )
            key = topology.keys_on(url, keys, prefix)[0]
            _drop_and_store(url, connection, codec, key, "new")
            await until_async(
                "the listener's new connection",
                lambda: _listener_connection(url, name) not in (None, connection),
            )
            deadline = time.monotonic() + MISSED_WAIT
            while value(await reader.aget(key)) != "new":
                if time.monotonic() > deadline:
                    msg = f"the reader still serves the old value after {MISSED_WAIT} s"
                    raise AssertionError(msg)
                await asyncio.sleep(0.05)
        finally:
            await reader.aclose()
            await writer.aclose()

    asyncio.run(main())


@pytest.mark.slow
def test_a_planned_sentinel_failover_leaves_no_near_copy_from_the_old_master(
    sentinels: SentinelSet, prefix: str
) -> None:
    """SENTINEL FAILOVER moves the listener to the new master: a loss, so a flush.

    The old master stays up and is demoted; the listener's connection to it is
    dropped and redis-py's Sentinel pool reconnects it to the new master at once.
    The new master is then given values no message announces (as if announced
    during the move): only a flushed near cache serves them.
    """
    reader = RedisBackend.from_sentinel(
        [sentinels.address], SERVICE, prefix=prefix, near_cache=near_settings()
    )
    writer = RedisBackend.from_sentinel([sentinels.address], SERVICE, prefix=prefix)
    codec = RedisCodec(prefix, None)
    keys = [f"k{n}" for n in range(4)]
    try:
        for key in keys:
            writer.set(key, entry(f"old:{key}"), TTL)
        wait_for(
            "the replica's copy", lambda: _replicated(sentinels.replica, codec, keys)
        )
        fill(reader, keys)
        with sentinels.sentinel.client() as client:
            # Refused (NOGOODSLAVE) until the sentinel has judged the replica fit.
            until("a failover accepted", partial(_fail_over, client), SETTLE)
        wait_for("the old master's demotion", lambda: not _is_master(sentinels.master))
        until(
            "the listener on the new master",
            lambda: _subscribers(sentinels.replica, codec.near_channel) == 1,
            SETTLE,
        )
        fresh = {key: f"fresh:{key}" for key in keys}
        _write_around_the_library(sentinels.replica, codec, fresh)
        until(
            "the reader to serve the new master's values",
            lambda: (
                {key: value(retrying(partial(reader.get, key))) for key in keys}
                == fresh
            ),
            MISSED_WAIT,
        )
    finally:
        reader.close()
        writer.close()


def _fail_over(client: Any) -> bool:
    """Ask the sentinel for a failover; False while it finds no replica fit yet."""
    try:
        return bool(client.execute_command("SENTINEL FAILOVER", SERVICE))
    except redis.ResponseError as exc:
        if "NOGOODSLAVE" in str(exc):
            return False
        raise


def _subscribers(server: Server, channel: str) -> int:
    with server.client() as client:
        [(_, count)] = client.pubsub_numsub(channel)
    return int(count)


@pytest.mark.slow
def test_a_sentinel_failover_flushes_the_near_cache_and_serves_the_new_master(
    sentinels: SentinelSet, prefix: str
) -> None:
    """The master dies: the near cache is flushed ("lost"), then serves the new master.

    The new master is given values that no message announces: a reader that had kept
    its near copies would serve the old ones for the near cache's whole ttl.
    """
    recorder = Recorder()
    reader = RedisBackend.from_sentinel(
        [sentinels.address],
        SERVICE,
        prefix=prefix,
        near_cache=near_settings(metrics=recorder),
    )
    writer = RedisBackend.from_sentinel(
        [sentinels.address], SERVICE, prefix=prefix, near_cache=near_settings()
    )
    codec = RedisCodec(prefix, None)
    keys = [f"k{n}" for n in range(4)]
    try:
        for key in keys:
            writer.set(key, entry(f"old:{key}"), TTL)
        wait_for(
            "the replica's copy", lambda: _replicated(sentinels.replica, codec, keys)
        )
        fill(reader, keys)
        assert recorder.flushes == []
        sentinels.master.kill()
        until("the near cache's flush", lambda: recorder.flushes, SETTLE)
        assert recorder.flushes[0] == NearFlush("lost", len(keys))
        assert recorder.stats.snapshot().near_flushes >= 1
        assert len(near_of(reader)) == 0
        wait_for("the replica's promotion", lambda: _is_master(sentinels.replica))
        fresh = {key: f"fresh:{key}" for key in keys}
        _write_around_the_library(sentinels.replica, codec, fresh)
        # Every read that answers serves the new master's value, none from before.
        answers: list[tuple[str, object]] = []

        def answered() -> bool:
            for key in keys:
                try:
                    answers.append((key, value(reader.get(key))))
                except BackendError:
                    return False  # the client is still finding the new master
            return True

        until("a read from the new master", answered, SETTLE)
        assert {found for _, found in answers} <= set(fresh.values())
        fill(reader, keys, SETTLE)  # the near cache is live again, on the new master
        assert_near_holds(reader, dict(fresh))
        # A store by another process after the failover reaches the reader.
        for key in keys:
            retrying(partial(writer.set, key, entry(f"new:{key}"), TTL))
            assert value(writer.get(key)) == f"new:{key}"
        seen = watch(reader, {key: f"new:{key}" for key in keys})
        assert seen.regressions == []
        assert {found for _, found in answers} <= set(fresh.values())
    finally:
        reader.close()
        writer.close()


@pytest.mark.slow
def test_a_sentinel_failover_flushes_an_asyncio_near_cache(
    sentinels: SentinelSet, prefix: str
) -> None:
    """The same with AsyncRedisBackend."""
    recorder = Recorder()
    codec = RedisCodec(prefix, None)
    keys = [f"k{n}" for n in range(4)]
    fresh = {key: f"fresh:{key}" for key in keys}
    answers: list[object] = []

    async def main() -> None:
        reader = AsyncRedisBackend.from_sentinel(
            [sentinels.address],
            SERVICE,
            prefix=prefix,
            near_cache=near_settings(metrics=recorder),
        )
        writer = AsyncRedisBackend.from_sentinel(
            [sentinels.address], SERVICE, prefix=prefix, near_cache=near_settings()
        )
        try:
            for key in keys:
                await writer.aset(key, entry(f"old:{key}"), TTL)
            await asyncio.to_thread(
                wait_for,
                "the replica's copy",
                lambda: _replicated(sentinels.replica, codec, keys),
            )
            await afill(reader, keys)
            assert recorder.flushes == []
            sentinels.master.kill()
            await until_async(
                "the near cache's flush", lambda: recorder.flushes, SETTLE
            )
            assert recorder.flushes[0] == NearFlush("lost", len(keys))
            assert len(near_of(reader)) == 0
            await asyncio.to_thread(
                wait_for,
                "the replica's promotion",
                lambda: _is_master(sentinels.replica),
            )
            _write_around_the_library(sentinels.replica, codec, fresh)
            answers.extend(
                [value(await aretrying(partial(reader.aget, key))) for key in keys]
            )
            await afill(reader, keys, SETTLE)
            assert_near_holds(reader, dict(fresh))
            for key in keys:
                await aretrying(partial(writer.aset, key, entry(f"new:{key}"), TTL))
                assert value(await writer.aget(key)) == f"new:{key}"
            seen = await awatch(reader, {key: f"new:{key}" for key in keys})
            assert seen.regressions == []
        finally:
            await reader.aclose()
            await writer.aclose()

    asyncio.run(main())
    assert answers == list(fresh.values())


@pytest.fixture
def breakable_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A cluster of this test's own, each of its 3 masters with a replica."""
    started = _start_cluster(tmp_path, replicas=3)
    yield started
    started.stop()


def _listening_master(masters: list[Server], channel: str) -> Server | None:
    """Return the one live master with a subscriber of *channel* (PUBSUB is per node)."""
    found = []
    for server in masters:
        if server.proc.poll() is not None:
            continue
        with server.client() as client:
            [(_, count)] = client.pubsub_numsub(channel)
        if count:
            found.append(server)
    return found[0] if len(found) == 1 else None


def _wait_for_listening_master(masters: list[Server], channel: str) -> Server:
    """Return the master the near cache's listener is subscribed on, once it is."""
    found: list[Server] = []

    def listening() -> bool:
        node = _listening_master(masters, channel)
        if node is not None:
            found.append(node)
        return node is not None

    until("the listener's subscription", listening)
    return found[-1]


@pytest.mark.slow
def test_killing_the_cluster_node_the_listener_is_on_flushes_the_near_cache(
    breakable_cluster: Cluster, prefix: str
) -> None:
    """The master under the near cache's subscription dies: flushed, then coherent again."""
    cluster = breakable_cluster
    recorder = Recorder()
    reader = RedisBackend.from_url(
        cluster.url,
        cluster=True,
        prefix=prefix,
        near_cache=near_settings(metrics=recorder),
    )
    # No near cache: the reader's listener is the near channel's only subscriber.
    writer = RedisBackend.from_url(cluster.url, cluster=True, prefix=prefix)
    codec = RedisCodec(prefix, None)
    try:
        keys = keys_on_every_master(cluster.masters, prefix, 2)
        barriers = keys_on_every_master(cluster.masters, prefix, 1, stem="barrier")
        for key in keys:
            writer.set(key, entry(f"old:{key}"), TTL)
        fill(reader, keys)
        settle(writer, recorder, barriers)
        fill(reader, keys)
        doomed = _wait_for_listening_master(cluster.masters, codec.near_channel)
        replica = cluster.replicas[cluster.masters.index(doomed)]
        assert recorder.flushes == []
        doomed.kill()
        until("the near cache's flush", lambda: recorder.flushes, SETTLE)
        assert recorder.flushes[0] == NearFlush("lost", len(keys))
        assert recorder.stats.snapshot().near_flushes >= 1
        assert len(near_of(reader)) == 0
        _promote(replica)
        wait_for("cluster_state:ok", cluster.state_ok)
        # Coherent again: once subscribed on a live master, a store on any master
        # reaches it. (Keys of the dead master may have died with it: written anew.)
        for key in keys:
            retrying(partial(writer.set, key, entry(f"mid:{key}"), TTL))
        fill(reader, keys, SETTLE)
        for key in keys:
            writer.set(key, entry(f"new:{key}"), TTL)
        seen = watch(reader, {key: f"new:{key}" for key in keys})
        assert seen.regressions == []
        survivors = [server for server in cluster.servers if server is not doomed]
        assert _listening_master(survivors, codec.near_channel) is not None
    finally:
        reader.close()
        writer.close()


@pytest.mark.slow
def test_killing_the_cluster_node_an_asyncio_listener_is_on_flushes_the_near_cache(
    breakable_cluster: Cluster, prefix: str
) -> None:
    """The same with AsyncRedisBackend."""
    cluster = breakable_cluster
    recorder = Recorder()
    codec = RedisCodec(prefix, None)
    keys = keys_on_every_master(cluster.masters, prefix, 2)
    barriers = keys_on_every_master(cluster.masters, prefix, 1, stem="barrier")

    async def main() -> None:
        reader = AsyncRedisBackend.from_url(
            cluster.url,
            cluster=True,
            prefix=prefix,
            near_cache=near_settings(metrics=recorder),
        )
        writer = AsyncRedisBackend.from_url(cluster.url, cluster=True, prefix=prefix)
        try:
            for key in keys:
                await writer.aset(key, entry(f"old:{key}"), TTL)
            await afill(reader, keys)
            await asettle(writer, recorder, barriers)
            await afill(reader, keys)
            doomed = await asyncio.to_thread(
                _wait_for_listening_master, cluster.masters, codec.near_channel
            )
            replica = cluster.replicas[cluster.masters.index(doomed)]
            assert recorder.flushes == []
            doomed.kill()
            await until_async(
                "the near cache's flush", lambda: recorder.flushes, SETTLE
            )
            assert recorder.flushes[0] == NearFlush("lost", len(keys))
            assert len(near_of(reader)) == 0
            await asyncio.to_thread(_promote, replica)
            await asyncio.to_thread(wait_for, "cluster_state:ok", cluster.state_ok)
            for key in keys:
                await aretrying(partial(writer.aset, key, entry(f"mid:{key}"), TTL))
            await afill(reader, keys, SETTLE)
            for key in keys:
                await writer.aset(key, entry(f"new:{key}"), TTL)
            seen = await awatch(reader, {key: f"new:{key}" for key in keys})
            assert seen.regressions == []
        finally:
            await reader.aclose()
            await writer.aclose()

    asyncio.run(main())
