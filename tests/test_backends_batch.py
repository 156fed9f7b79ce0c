"""The batch methods of the backends: each key decided as its single twin decides it.

What is proved, and how:

- Agreement: two twins in the same state (two memory backends, or two prefixes on one
  Redis), one served by a batch method, the other by its single twin key after key,
  give the same results (entries, holders, fenced and refused stores), leave the same
  state, and announce the same notices to subscribers. On every backend: memory (sync
  and asyncio faces), a single redis-server (sync and asyncio) and a Redis Cluster.
- The near cache: a batch read fills it only as `get` does (never with what a read
  begun before an invalidation brought back), a batch write drops the writer's copies,
  and another process's batch write drops them everywhere.
- Round trips: the server's own command statistics count one EVALSHA per batch of 50
  keys on one server; on a cluster one per slot, in one pipeline per node.
- A property test: random sequences of batch calls on a memory backend, replayed key
  by key on a twin, on one fake clock, give the very same results, tickets included.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any, cast

import pytest
import redis
import redis.asyncio.cluster
import redis.cluster
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.crc import key_slot

from _servers import Cluster, ServerError, free_port, start_cluster, unavailable
from _waiting import until
from stampede_guard import (
    AsyncRedisBackend,
    BackendError,
    Entry,
    MemoryBackend,
    NearCache,
    RedisBackend,
    SerializationError,
)
from stampede_guard._near import Near
from stampede_guard.backends import (
    RELEASED,
    AsyncBatchBackend,
    BatchBackend,
    Claim,
    Notice,
)
from stampede_guard.backends.redis import _many
from stampede_guard.backends.redis._codec import Call, RedisCodec
from stampede_guard.backends.redis._scripts import MANY, SOURCES
from stampede_guard.metrics import NearInvalidation

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.usefixtures("abandoned_connections_collected"),
]

LONG = 60.0  # seconds: a value or lock that outlives the test
BOUND = 10.0  # seconds any wait of these tests may take before it fails
KINDS = ["memory", "async-memory", "redis", "async-redis", "cluster", "async-cluster"]

Item = tuple[str, Entry, float, int | None]


def entry(value: object) -> Entry:
    # Binary fractions: every serializer round-trips them exactly.
    return Entry(value, created_at=1_700_000_000.25, compute_seconds=0.125)


def shape(result: object) -> object:
    """What two twins must agree on in a result: not the tickets' clock readings."""
    if isinstance(result, Entry):
        return ("entry", result.value)
    if isinstance(result, Claim):
        assert isinstance(result.ticket, int)
        assert result.ticket > 0
        return ("claim", str(result))
    if result is RELEASED:
        return "released"
    return result


# --- Faces: every kind of backend, called from plain code ------------------------------


class Heard:
    """A subscription to one key, waited on from plain code."""

    def __init__(self, subscription: Any, face: Face) -> None:
        self._subscription, self._face = subscription, face

    def wait(self, seconds: float) -> Notice | None:
        return cast("Notice | None", self._face.run(self._subscription.wait, seconds))

    def close(self) -> None:
        self._face.run(self._subscription.close)


class Face:
    """One backend's single and batch methods, sync or asyncio, called from plain code.

    An asyncio backend's calls run on the test's one event loop (*runner*).
    """

    def __init__(self, backend: Any, runner: asyncio.Runner | None) -> None:
        self.backend = backend
        self.runner = runner

    def run(self, method: Callable[..., Any], *args: Any) -> Any:
        result = method(*args)
        if self.runner is None:
            return result
        return self.runner.run(cast("Coroutine[Any, Any, object]", result))

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        prefix = "" if self.runner is None else "a"
        method = getattr(self.backend, f"{prefix}{name}")
        return self.run(lambda *a: method(*a, **kwargs), *args)

    def get(self, key: str) -> Entry | None:
        return cast("Entry | None", self.call("get", key))

    def get_or_lock(self, key: str, token: str) -> Entry | Claim:
        return cast("Entry | Claim", self.call("get_or_lock", key, token, LONG))

    def lock(self, key: str, token: str) -> Claim:
        return cast("Claim", self.call("lock", key, token, LONG))

    def set(self, key: str, value: Entry, *, ticket: int | None = None) -> object:
        return self.call("set", key, value, LONG, ticket=ticket)

    def set_and_unlock(self, item: Item, token: str) -> Entry | None:
        key, value, ttl, ticket = item
        found = self.call("set_and_unlock", key, value, ttl, token, ticket=ticket)
        return cast("Entry | None", found)

    def unlock(self, key: str, token: str) -> bool:
        return cast("bool", self.call("unlock", key, token))

    def delete(self, key: str) -> None:
        self.call("delete", key)

    def get_many(self, keys: Sequence[str]) -> list[Entry | None]:
        return cast("list[Entry | None]", self.call("get_many", keys))

    def get_or_lock_many(self, keys: Sequence[str], token: str) -> list[Entry | Claim]:
        found = self.call("get_or_lock_many", keys, token, LONG)
        return cast("list[Entry | Claim]", found)

    def set_and_unlock_many(
        self, items: Sequence[Item], token: str
    ) -> list[Entry | None]:
        return cast(
            "list[Entry | None]", self.call("set_and_unlock_many", items, token)
        )

    def unlock_many(self, keys: Sequence[str], token: str) -> list[bool]:
        return cast("list[bool]", self.call("unlock_many", keys, token))

    def subscribe(self, key: str) -> Heard:
        return Heard(self.call("subscribe", key), self)

    def sleep(self, seconds: float) -> None:
        if self.runner is None:
            time.sleep(seconds)
        else:
            self.runner.run(asyncio.sleep(seconds))


Make = Callable[..., Face]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A 3-master cluster of this module's own."""
    try:
        started = start_cluster(tmp_path_factory.mktemp("cluster"))
    except (OSError, ServerError) as exc:
        unavailable(f"could not start a Redis Cluster: {exc}")
    yield started
    started.stop()


@pytest.fixture(params=KINDS)
def make(request: pytest.FixtureRequest) -> Iterator[Make]:
    """Make faces of one kind of backend: ``make(store=None, near_cache=None)``.

    Faces made with the same *store* share it (two processes of one application);
    without one, each face has a store of its own (a twin).
    """
    kind: str = request.param
    runner = asyncio.Runner() if kind.startswith("async") else None
    made: list[Any] = []
    memories: dict[str, MemoryBackend] = {}
    if kind.endswith("memory"):
        url, cluster = "", False
    elif kind.endswith("cluster"):
        url, cluster = request.getfixturevalue("cluster").url, True
    else:
        url, cluster = request.getfixturevalue("redis_url"), False
    base = (
        request.getfixturevalue("redis_prefix")
        if url and not cluster
        else f"t{uuid.uuid4().hex[:8]}"
    )

    def build(store: str | None = None, near_cache: NearCache | None = None) -> Face:
        store = store or uuid.uuid4().hex[:8]
        backend: Any
        if not url:
            backend = memories.setdefault(store, MemoryBackend())
        else:
            kind_of = AsyncRedisBackend if runner is not None else RedisBackend
            backend = kind_of.from_url(
                url, cluster=cluster, prefix=f"{base}:{store}", near_cache=near_cache
            )
            made.append(backend)
        return Face(backend, runner)

    yield build
    for backend in made:
        if runner is None:
            backend.close()
        else:
            runner.run(backend.aclose())
    if runner is not None:
        runner.close()


def twins(make: Make, **options: Any) -> tuple[Face, Face]:
    """Two backends of one kind with stores of their own: batch, and single."""
    return make(**options), make(**options)


# --- The capability -------------------------------------------------------------------


def test_every_backend_has_the_batch_capability_of_its_kind() -> None:
    """Memory serves both kinds of code; each Redis backend its own kind only."""
    memory = MemoryBackend()
    assert isinstance(memory, BatchBackend)
    assert isinstance(memory, AsyncBatchBackend)
    sync = RedisBackend(redis.Redis())
    assert isinstance(sync, BatchBackend)
    assert not isinstance(sync, AsyncBatchBackend)
    asynchronous = AsyncRedisBackend(redis.asyncio.Redis())
    assert isinstance(asynchronous, AsyncBatchBackend)
    assert not isinstance(asynchronous, BatchBackend)


def test_batch_scripts_run_the_single_scripts_own_per_key_function() -> None:
    """Each batch script holds its single twin's decision verbatim, and loops over it."""
    for single, (many, keys, args) in MANY.items():
        function = SOURCES[single].split("\nreturn ", 1)[0]
        assert "local function" in function
        assert SOURCES[many].startswith(function)
        assert f"for i = 0, #KEYS / {keys} - 1 do" in SOURCES[many]
        assert f"i * {keys}, i * {args}" in SOURCES[many]


def test_every_single_call_has_the_arity_its_batch_script_expects() -> None:
    """The KEYS and ARGV of each key's single call are what the batch loop steps by."""
    codec = RedisCodec("sg", None)
    calls: list[Call[Any]] = [
        codec.get_or_lock("k", "t", 1.0),
        codec.lock("k", "t", 1.0),
        codec.near_read("k"),
        codec.store_and_unlock("k", entry(1), 1.0, "t", 7),
        codec.store_and_unlock("k", entry(1), 1.0, "t", None),
        codec.unlock("k", "t"),
    ]
    for call in calls:
        _, keys, args = MANY[call.script]
        assert (len(call.keys), len(call.args)) == (keys, args), call.script


def test_empty_batches_send_nothing_and_return_empty_lists(make: Make) -> None:
    """No keys, no round trip, no error."""
    face = make()
    assert face.get_many([]) == []
    assert face.get_or_lock_many([], "me") == []
    assert face.set_and_unlock_many([], "me") == []
    assert face.unlock_many([], "me") == []


# --- Agreement with the single methods ------------------------------------------------


def test_get_many_returns_what_get_returns_for_each_key(make: Make) -> None:
    """Stored, missing, repeated and None values: one get per key would say the same."""
    batch, single = twins(make)
    keys = ["stored", "missing", "none", "stored", "other"]
    for face in (batch, single):
        face.set("stored", entry({"a": [1, 2]}))
        face.set("none", entry(None))
        face.set("other", entry("x"))
    many = batch.get_many(keys)
    one_by_one = [single.get(key) for key in keys]
    assert [shape(r) for r in many] == [shape(r) for r in one_by_one]
    assert many[1] is None
    assert many[2] == entry(None)


def stage_looks(face: Face) -> None:
    """A value, a lock held by another, both, and a free key."""
    face.set("stored", entry(1))
    face.lock("held", "other")
    face.set("both", entry(2))
    face.lock("both", "other")


LOOKED = ["stored", "held", "free", "both", "free", "held"]


def test_get_or_lock_many_returns_and_locks_what_get_or_lock_would(make: Make) -> None:
    """Entries, other holders, locks taken for the one token (a repeat sees its own)."""
    batch, single = twins(make)
    for face in (batch, single):
        stage_looks(face)
    many = batch.get_or_lock_many(LOOKED, "me")
    one_by_one = [single.get_or_lock(key, "me") for key in LOOKED]
    assert [shape(r) for r in many] == [shape(r) for r in one_by_one]
    assert [shape(r) for r in many] == [
        ("entry", 1),
        ("claim", "other"),
        ("claim", "me"),
        ("entry", 2),
        ("claim", "me"),
        ("claim", "other"),
    ]
    # The state left behind: the same holders, seen by a third caller.
    after = [
        [shape(f.get_or_lock(k, "probe")) for k in LOOKED] for f in (batch, single)
    ]
    assert after[0] == after[1]


def stage_stores(face: Face) -> dict[str, int]:
    """Keys in every state a store can meet; return the tickets of this caller's looks.

    mine: locked by us. taken: locked by another since. free: no lock, no ticket.
    deleted: locked by us, then invalidated. overtaken: locked by us, then a newer
    computation (a later look) stored its value around our lock.
    """
    tickets: dict[str, int] = {}
    for key in ("mine", "deleted", "overtaken", "mine2"):
        claim = face.get_or_lock(key, "me")
        assert isinstance(claim, Claim)
        tickets[key] = claim.ticket
    face.lock("taken", "other")
    face.delete("deleted")
    newer = face.lock("overtaken", "other")  # held by us: a look, not a lock
    face.set("overtaken", entry("newer"), ticket=newer.ticket)
    return tickets


def store_items(tickets: dict[str, int]) -> list[Item]:
    return [
        ("mine", entry("m"), LONG, tickets["mine"]),
        ("taken", entry("t"), LONG, None),
        ("free", entry("f"), LONG, None),
        ("deleted", entry("d"), LONG, tickets["deleted"]),
        ("overtaken", entry("o"), LONG, tickets["overtaken"]),
        ("mine2", entry("m2"), LONG, tickets["mine2"]),
        ("mine2", entry("again"), LONG, tickets["mine2"]),
    ]


STORED = ["mine", "taken", "free", "deleted", "overtaken", "mine2"]


def state(face: Face) -> list[object]:
    """Each stored key's value and lock holder, as a third caller finds them."""
    values = [shape(face.get(key)) for key in STORED]
    holders = [str(face.lock(key, "probe")) for key in STORED]
    return [*values, *holders]


def test_set_and_unlock_many_stores_fences_and_releases_as_set_and_unlock(
    make: Make,
) -> None:
    """Stored, fenced by a holder, refused for a ticket: key by key as the single does."""
    batch, single = twins(make)
    items = [store_items(stage_stores(face)) for face in (batch, single)]
    many = batch.set_and_unlock_many(items[0], "me")
    one_by_one = [single.set_and_unlock(item, "me") for item in items[1]]
    assert [shape(r) for r in many] == [shape(r) for r in one_by_one]
    assert [shape(r) for r in many] == [
        ("entry", "m"),
        ("entry", "t"),  # returned, not stored: another holds the lock
        ("entry", "f"),
        None,  # invalidated after the look
        None,  # a newer computation stored first
        ("entry", "m2"),
        ("entry", "again"),  # the lock is free by then: stored too
    ]
    assert state(batch) == state(single)
    assert state(batch)[:6] == [
        ("entry", "m"),
        None,
        ("entry", "f"),
        None,
        ("entry", "newer"),
        ("entry", "again"),
    ]


def test_unlock_many_releases_only_what_the_token_holds(make: Make) -> None:
    """Own locks released (once), others' kept, free keys refused: as unlock does."""
    batch, single = twins(make)
    keys = ["mine", "theirs", "free", "mine"]
    for face in (batch, single):
        face.lock("mine", "me")
        face.lock("theirs", "other")
    many = batch.unlock_many(keys, "me")
    assert many == [single.unlock(key, "me") for key in keys]
    assert many == [True, False, False, False]
    holders = [[str(f.lock(k, "probe")) for k in keys] for f in (batch, single)]
    assert holders[0] == holders[1] == ["probe", "other", "probe", "probe"]


MARK = entry("end-of-test")


def heard(face: Face, subscriptions: dict[str, Heard]) -> dict[str, list[object]]:
    """What each subscriber heard, up to a marker stored on every key afterwards."""
    for key in subscriptions:
        face.set(key, MARK)
    notices: dict[str, list[object]] = {}
    for key, subscription in subscriptions.items():
        got: list[object] = []
        deadline = time.monotonic() + BOUND
        while (notice := subscription.wait(0.2)) != MARK:
            if notice is not None:
                got.append(shape(notice))
            assert time.monotonic() < deadline, f"no marker on {key!r}: {got}"
        notices[key] = got
        subscription.close()
    return notices


def subscribed(face: Face, keys: Sequence[str]) -> dict[str, Heard]:
    # A subscription hears whatever is sent after it returns (see `Notifier`).
    return {key: face.subscribe(key) for key in dict.fromkeys(keys)}


def test_batch_writes_announce_what_the_single_writes_announce(make: Make) -> None:
    """Subscribers hear the same notices, key by key, from a batch and from singles."""
    batch, single = twins(make)
    items = [store_items(stage_stores(face)) for face in (batch, single)]
    for face in (batch, single):
        face.lock("unlocked", "me")
    keys = [*STORED, "unlocked"]
    listening = [subscribed(face, keys) for face in (batch, single)]
    batch.set_and_unlock_many(items[0], "me")
    batch.unlock_many(["unlocked", "taken"], "me")
    for item in items[1]:
        single.set_and_unlock(item, "me")
    for key in ("unlocked", "taken"):
        single.unlock(key, "me")
    notices = [
        heard(face, subs) for face, subs in zip((batch, single), listening, strict=True)
    ]
    assert notices[0] == notices[1]
    assert notices[0] == {
        "mine": [("entry", "m")],
        "taken": [("entry", "t")],  # announced to the holder's waiters, not stored
        "free": [("entry", "f")],
        "deleted": [],  # refused, and its lock was revoked already: nothing to say
        "overtaken": ["released"],  # refused, but our lock is let go: look again
        "mine2": [("entry", "m2"), ("entry", "again")],
        "unlocked": ["released"],
    }


# --- The near cache -------------------------------------------------------------------

NEAR_KINDS = ["redis", "async-redis", "cluster", "async-cluster"]


@pytest.fixture
def near_make(make: Make, request: pytest.FixtureRequest) -> Make:
    """`make`, for the kinds with a near cache (Redis) only."""
    if request.node.callspec.params["make"] not in NEAR_KINDS:
        pytest.skip("a near cache is a Redis backend's")
    return make


def near_of(face: Face) -> Any:
    near = face.backend._near
    assert near is not None
    return near


def near_face(make: Make, store: str | None = None) -> tuple[Face, list[str]]:
    """A face with a near cache, live, and the keys its listener hears changed."""
    heard: list[str] = []

    def hear(event: object) -> None:
        if isinstance(event, NearInvalidation):
            heard.append(event.key)

    face = make(store, near_cache=NearCache(ttl=LONG, metrics=hear))
    near = near_of(face)

    def live() -> bool:
        face.get_many(["-"])  # the first read asks the listener to subscribe
        face.sleep(0.005)
        return bool(near.live)

    until("the near cache's listener to subscribe", live, BOUND)
    return face, heard


def store_heard(face: Face, heard: list[str], values: dict[str, object]) -> None:
    """Store *values*, and wait until the near cache has heard of every store.

    Each store's message reaches the writer too, and may come after a read filled
    the near cache, dropping what it put there: a test that then expects it would
    fail, now and then. Heard, they can no longer drop anything.
    """
    for key, value in values.items():
        face.set(key, entry(value))

    def all_heard() -> bool:
        face.sleep(0.005)  # the asyncio listener runs while the loop does
        return set(values) <= set(heard)

    until("the near cache to hear of the stores", all_heard, BOUND)


def warm(face: Face, keys: Sequence[str]) -> list[Entry | None]:
    """Read until the near cache holds every key (it fills once its listener is live)."""
    near = near_of(face)
    found: list[list[Entry | None]] = []

    def filled() -> bool:
        found.append(face.get_many(keys))
        face.sleep(0.005)
        return all(near.lookup(key) is not None for key in keys)

    until("the near cache to hold every key", filled, BOUND)
    return found[-1]


def test_get_many_fills_the_near_cache_and_is_then_served_from_it(
    near_make: Make,
) -> None:
    """After a batch read fills it, the next one costs no round trip and agrees."""
    face, heard = near_face(near_make)
    keys = [f"k{n}" for n in range(20)]
    store_heard(face, heard, {key: key for key in keys[:10]})
    values = warm(face, keys[:10])
    assert [shape(v) for v in values] == [("entry", k) for k in keys[:10]]
    near = near_of(face)
    sent: list[object] = []
    batches = face.backend._batches
    face.backend._batches = Spy(batches, sent)
    try:
        again = face.get_many(keys[:10])
        mixed = face.get_many(keys)
    finally:
        face.backend._batches = batches
    assert again == values
    assert [shape(v) for v in mixed] == [("entry", k) for k in keys[:10]] + [None] * 10
    assert sent == [keys[10:]], "only the near cache's misses are read from Redis"
    assert all(near.lookup(key) is not None for key in keys[:10])


class Spy:
    """A backend's `Batches`, recording the keys of every batch read."""

    def __init__(self, batches: _many.Batches, sent: list[object]) -> None:
        self._batches, self._sent = batches, sent

    def read(self, keys: Sequence[str]) -> Any:
        self._sent.append(list(keys))
        return self._batches.read(keys)


def test_batch_writes_drop_the_writers_near_copies(near_make: Make) -> None:
    """Once set_and_unlock_many returns, the writer reads its writes, not its copies."""
    face, heard = near_face(near_make)
    keys = ["a", "b", "c"]
    store_heard(face, heard, dict.fromkeys(keys, "old"))
    warm(face, keys)
    claims = face.get_or_lock_many(["a", "b"], "me")  # entries: no lock taken
    assert [shape(c) for c in claims] == [("entry", "old")] * 2
    near = near_of(face)
    stored = face.set_and_unlock_many(
        [("a", entry("new"), LONG, None), ("b", entry("new"), LONG, None)], "me"
    )
    assert [shape(s) for s in stored] == [("entry", "new")] * 2
    assert near.lookup("a") is None
    assert near.lookup("b") is None
    assert near.lookup("c") is not None, "a key not written keeps its copy"
    assert [shape(v) for v in face.get_many(keys)] == [
        ("entry", "new"),
        ("entry", "new"),
        ("entry", "old"),
    ]


def test_another_processs_batch_write_drops_every_near_copy(near_make: Make) -> None:
    """A write by another backend on the same store reaches this one's near cache."""
    store = uuid.uuid4().hex[:8]
    reader = near_make(store, near_cache=NearCache(ttl=LONG))
    writer = near_make(store)
    keys = ["a", "b"]
    for key in keys:
        writer.set(key, entry("old"))
    warm(reader, keys)
    writer.set_and_unlock_many([(k, entry("new"), LONG, None) for k in keys], "w")
    near = near_of(reader)

    def dropped() -> bool:
        reader.sleep(0.005)  # the asyncio listener runs while the loop does
        return all(near.lookup(key) is None for key in keys)

    until("the writes to drop the near copies", dropped, BOUND)
    assert [shape(v) for v in reader.get_many(keys)] == [("entry", "new")] * 2


def test_a_batch_read_never_fills_a_key_invalidated_while_it_was_in_flight() -> None:
    """The flow notes the read's start before sending it: a drop during it wins."""
    near = Near(NearCache(ttl=LONG), "sg:near")
    near.subscribed()
    batches = _many.Batches(RedisCodec("sg", None), cluster=False)

    def begin() -> tuple[Near, int | None, float]:
        return near, near.begin(), near.clock()

    flow = _many.get_many(batches, ["a", "b"], near, begin)
    read = next(flow)
    assert read.keys == ("a", "b")
    near.drop("b")  # another process's write of b, heard while the read is out
    with pytest.raises(StopIteration) as done:
        flow.send([(entry("a"), 10.0, 5), (entry("b"), 10.0, 5)])
    assert done.value.value == [entry("a"), entry("b")]
    assert near.lookup("a") == entry("a")
    assert near.lookup("b") is None


# --- Round trips ----------------------------------------------------------------------


def evalsha_calls(client: redis.Redis) -> Counter[str]:
    """The server's count of script calls (EVALSHA, EVAL) and loads since a reset."""
    stats = cast("dict[str, dict[str, int]]", client.info("commandstats"))
    names = ("cmdstat_evalsha", "cmdstat_eval", "cmdstat_script|load")
    return Counter(
        {n.removeprefix("cmdstat_"): stats[n]["calls"] for n in names if n in stats}
    )


def all_four(face: Face, keys: Sequence[str]) -> Iterator[Callable[[], object]]:
    """Each batch method over *keys*, as a call to count."""
    yield lambda: face.get_many(keys)
    yield lambda: face.get_or_lock_many(keys, "me")
    yield lambda: face.set_and_unlock_many(
        [(k, entry(k), LONG, None) for k in keys], "me"
    )
    yield lambda: face.unlock_many(keys, "me")


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "asyncio"])
def test_each_batch_of_fifty_keys_is_one_script_call_on_one_server(
    redis_url: str,
    redis_prefix: str,
    private_redis_client: redis.Redis,
    *,
    asynchronous: bool,
) -> None:
    """INFO commandstats: one EVALSHA per batch method call, whatever the key count."""
    runner = asyncio.Runner() if asynchronous else None
    kind = AsyncRedisBackend if asynchronous else RedisBackend
    face = Face(kind.from_url(redis_url, prefix=redis_prefix), runner)
    keys = [f"key:{n}" for n in range(50)]
    try:
        for call in all_four(face, keys):
            call()  # the scripts are loaded by now
        for call in all_four(face, keys):
            private_redis_client.config_resetstat()
            call()
            assert evalsha_calls(private_redis_client) == {"evalsha": 1}
    finally:
        if runner is None:
            face.backend.close()
        else:
            runner.run(face.backend.aclose())
            runner.close()


def test_a_batch_on_a_fresh_server_loads_its_script_and_is_served(
    redis_backend: RedisBackend, private_redis_client: redis.Redis
) -> None:
    """After SCRIPT FLUSH (a restarted server), the batch loads its script once."""
    face = Face(redis_backend, None)
    face.get_or_lock_many(["warm"], "me")
    private_redis_client.script_flush()
    private_redis_client.config_resetstat()
    found = face.get_or_lock_many(["a", "b"], "me")
    assert [shape(f) for f in found] == [("claim", "me")] * 2
    assert evalsha_calls(private_redis_client)["script|load"] == 1


def cluster_faces(cluster: Cluster, runner: asyncio.Runner | None) -> Face:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    if runner is None:
        return Face(
            RedisBackend.from_url(cluster.url, cluster=True, prefix=prefix), None
        )
    backend = AsyncRedisBackend.from_url(cluster.url, cluster=True, prefix=prefix)
    return Face(backend, runner)


def close(face: Face) -> None:
    if face.runner is None:
        face.backend.close()
    else:
        face.runner.run(face.backend.aclose())
        face.runner.close()


def per_master(cluster: Cluster) -> dict[int, Counter[str]]:
    counted = {}
    for server in cluster.masters:
        with server.client() as client:
            counted[server.port] = evalsha_calls(client)
    return counted


def reset_masters(cluster: Cluster) -> None:
    for server in cluster.masters:
        with server.client() as client:
            client.config_resetstat()


def slot_owners(cluster: Cluster) -> dict[int, int]:
    """Every slot's master's port."""
    owners: dict[int, int] = {}
    with cluster.masters[0].client() as client:
        for start, end, *nodes in client.execute_command("CLUSTER SLOTS"):
            for slot in range(start, end + 1):
                owners[slot] = int(nodes[0][1])
    return owners


@pytest.fixture
def pipelines(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Count the pipelines each cluster node is sent (sync and asyncio clients)."""
    sent: Counter[str] = Counter()
    write: Callable[[Any], None] = redis.cluster.NodeCommands.write

    def counted_write(self: Any) -> None:
        sent[f"{self.connection.host}:{self.connection.port}"] += 1
        write(self)

    execute = redis.asyncio.cluster.ClusterNode.execute_pipeline

    async def counted_execute(self: Any, commands: Any) -> bool:
        sent[self.name] += 1
        return await execute(self, commands)

    monkeypatch.setattr(redis.cluster.NodeCommands, "write", counted_write)
    monkeypatch.setattr(
        redis.asyncio.cluster.ClusterNode, "execute_pipeline", counted_execute
    )
    return sent


@pytest.mark.slow
@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "asyncio"])
def test_a_batch_on_a_cluster_is_one_pipeline_per_master_and_one_call_per_slot(
    cluster: Cluster, pipelines: Counter[str], *, asynchronous: bool
) -> None:
    """90 keys on every master: each master gets one pipeline of one call per slot."""
    face = cluster_faces(cluster, asyncio.Runner() if asynchronous else None)
    codec = face.backend._codec
    keys = [f"key:{n}" for n in range(90)]
    owners = slot_owners(cluster)
    slots = {key_slot(codec.value_key(key).encode()) for key in keys}
    expected = Counter(owners[slot] for slot in slots)
    try:
        for call in all_four(face, keys):
            call()  # the scripts are loaded, the cluster discovered
        for call in all_four(face, keys):
            reset_masters(cluster)
            pipelines.clear()
            call()
            counted = per_master(cluster)
            assert {port: c["evalsha"] for port, c in counted.items()} == expected
            assert sorted(pipelines.values()) == [1, 1, 1], pipelines
    finally:
        close(face)


@pytest.mark.slow
def test_a_batch_of_keys_sharing_a_slot_is_one_script_call_on_a_cluster(
    cluster: Cluster,
) -> None:
    """Keys whose names hash to one slot: one EVALSHA on one master, no pipeline."""
    face = cluster_faces(cluster, None)
    codec = face.backend._codec
    slot = key_slot(codec.value_key("k0").encode())
    named = (f"k{n}" for n in range(100_000))  # about 6 of them share k0's slot
    keys = [k for k in named if key_slot(codec.value_key(k).encode()) == slot]
    assert len(keys) > 3
    try:
        face.get_or_lock_many(keys, "warm")
        reset_masters(cluster)
        found = face.get_or_lock_many(keys, "me")
        assert [shape(f) for f in found] == [("claim", "warm")] * len(keys)
        assert sum(c["evalsha"] for c in per_master(cluster).values()) == 1
    finally:
        close(face)


@pytest.mark.slow
@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "asyncio"])
def test_a_batch_on_a_freshly_flushed_cluster_loads_its_script_and_is_served(
    cluster: Cluster, *, asynchronous: bool
) -> None:
    """NOSCRIPT answered in a pipeline: the script is loaded and those calls sent again."""
    face = cluster_faces(cluster, asyncio.Runner() if asynchronous else None)
    keys = [f"key:{n}" for n in range(30)]
    try:
        face.get_many(["warm"])
        for server in cluster.masters:
            with server.client() as client:
                client.script_flush()
        reset_masters(cluster)
        found = face.get_or_lock_many(keys, "me")
        assert [shape(f) for f in found] == [("claim", "me")] * 30
        loads = [c["script|load"] for c in per_master(cluster).values()]
        assert loads == [1, 1, 1]
    finally:
        close(face)


# --- Failures -------------------------------------------------------------------------


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "asyncio"])
def test_a_failed_batch_raises_backend_error_naming_its_first_key_and_method(
    *, asynchronous: bool
) -> None:
    """Nobody listening: BackendError for the first key and the batch method's name."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    runner = asyncio.Runner() if asynchronous else None
    kind = AsyncRedisBackend if asynchronous else RedisBackend
    face = Face(kind.from_url(url, socket_timeout=0.2, connect_timeout=0.2), runner)
    calls: dict[str, Callable[[], object]] = {
        "get_many": lambda: face.get_many(["a", "b"]),
        "get_or_lock_many": lambda: face.get_or_lock_many(["a", "b"], "me"),
        "set_and_unlock_many": lambda: face.set_and_unlock_many(
            [("a", entry(1), LONG, None), ("b", entry(2), LONG, None)], "me"
        ),
        "unlock_many": lambda: face.unlock_many(["a", "b"], "me"),
    }
    try:
        for operation, call in calls.items():
            with pytest.raises(BackendError) as raised:
                call()
            assert (raised.value.key, raised.value.operation) == ("a", operation)
            assert isinstance(raised.value.__cause__, redis.ConnectionError)
    finally:
        if runner is not None:
            runner.close()


@pytest.mark.slow
def test_a_failing_slot_group_on_a_cluster_names_its_own_key(cluster: Cluster) -> None:
    """A script error in one node's reply names a key of that group, not the first."""
    face = cluster_faces(cluster, None)
    codec = face.backend._codec
    keys = [f"key:{n}" for n in range(30)]
    culprit = keys[17]
    _, lock = codec.both_keys(culprit)
    with redis.cluster.RedisCluster.from_url(cluster.url) as client:
        client.hset(lock, "not", "a string")  # SET NX GET on it: WRONGTYPE
    slot = key_slot(lock.encode())
    first_of_group = next(
        k for k in keys if key_slot(codec.value_key(k).encode()) == slot
    )
    try:
        with pytest.raises(BackendError) as raised:
            face.get_or_lock_many(keys, "me")
        assert raised.value.key == first_of_group
        assert raised.value.operation == "get_or_lock_many"
        assert "WRONGTYPE" in str(raised.value.__cause__)
    finally:
        close(face)


def test_an_unencodable_entry_fails_the_batch_before_anything_is_stored(
    redis_backend: RedisBackend,
) -> None:
    """SerializationError before sending: no key of the batch is stored or unlocked."""
    face = Face(redis_backend, None)
    face.get_or_lock_many(["a", "b"], "me")
    items: list[Item] = [("a", entry(1), LONG, None), ("b", entry({1, 2}), LONG, None)]
    with pytest.raises(SerializationError):
        face.set_and_unlock_many(items, "me")
    assert face.get_many(["a", "b"]) == [None, None]
    assert [str(face.lock(k, "probe")) for k in ("a", "b")] == ["me", "me"]


def test_an_unreadable_entry_is_locked_as_if_there_were_none(
    redis_backend: RedisBackend, redis_client: redis.Redis
) -> None:
    """Foreign bytes under a key: get_or_lock_many takes its lock, as get_or_lock does."""
    face = Face(redis_backend, None)
    face.set("good", entry("g"))
    face.set("bad", entry("b"))
    redis_client.set(redis_backend._codec.value_key("bad"), b"SG\x01damaged")
    found = face.get_or_lock_many(["good", "bad", "free"], "me")
    assert [shape(f) for f in found] == [
        ("entry", "g"),
        ("claim", "me"),
        ("claim", "me"),
    ]


# --- A property: batches are their single twins, key by key -------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


KEYS = st.sampled_from(["a", "b", "c", "d"])
TOKENS = st.sampled_from(["t1", "t2"])
Op = tuple[Any, ...]
OPS: st.SearchStrategy[Op] = st.one_of(
    st.tuples(st.just("get_many"), st.lists(KEYS, max_size=5)),
    st.tuples(st.just("get_or_lock_many"), st.lists(KEYS, max_size=5), TOKENS),
    st.tuples(
        st.just("set_and_unlock_many"),
        st.lists(
            st.tuples(
                KEYS, st.integers(0, 9), st.sampled_from([0.5, 5.0]), st.booleans()
            ),
            max_size=5,
        ),
        TOKENS,
    ),
    st.tuples(st.just("unlock_many"), st.lists(KEYS, max_size=5), TOKENS),
    st.tuples(st.just("delete"), KEYS),
    st.tuples(st.just("sleep"), st.sampled_from([0.1, 1.0, 40.0])),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(OPS, max_size=25))
def test_batches_on_memory_are_their_single_twins_key_by_key(ops: list[Op]) -> None:
    """Any sequence of batch calls gives what the single calls give, tickets included."""
    clock = FakeClock()
    batch, single = MemoryBackend(clock=clock), MemoryBackend(clock=clock)
    heard = [batch.subscribe(k) for k in "abcd"], [single.subscribe(k) for k in "abcd"]
    tickets: dict[str, int] = {}  # the last ticket each key's look gave
    for op in ops:
        name = op[0]
        if name == "get_many":
            assert batch.get_many(op[1]) == [single.get(k) for k in op[1]]
        elif name == "get_or_lock_many":
            many = batch.get_or_lock_many(op[1], op[2], 30.0)
            one = [single.get_or_lock(k, op[2], 30.0) for k in op[1]]
            assert [(r, getattr(r, "ticket", None)) for r in many] == [
                (r, getattr(r, "ticket", None)) for r in one
            ]
            tickets.update(
                (k, r.ticket)
                for k, r in zip(op[1], one, strict=True)
                if isinstance(r, Claim)
            )
        elif name == "set_and_unlock_many":
            items: list[Item] = [
                (k, entry(v), ttl, tickets.get(k) if fenced else None)
                for k, v, ttl, fenced in op[1]
            ]
            many_stored = batch.set_and_unlock_many(items, op[2])
            assert many_stored == [
                single.set_and_unlock(k, e, t, op[2], ticket=n) for k, e, t, n in items
            ]
        elif name == "unlock_many":
            assert batch.unlock_many(op[1], op[2]) == [
                single.unlock(k, op[2]) for k in op[1]
            ]
        elif name == "delete":
            batch.delete(op[1])
            single.delete(op[1])
        else:
            clock.now += op[1]
    for key in "abcd":
        assert batch.get(key) == single.get(key)
        assert batch.lock(key, "probe", 1.0) == single.lock(key, "probe", 1.0)
    for a, b in zip(*heard, strict=True):
        assert drain(a) == drain(b)


def drain(subscription: Any) -> list[object]:
    notices = []
    while (notice := subscription.wait(0)) is not None:
        notices.append(notice)
    return notices
