"""The near cache: hits from process memory that never serve a value Redis has replaced.

What is proved, and how:

- A hit costs no round trip: counted in the server's own command statistics, and as
  ``Hit(near=True)`` events.
- Coherence: a store, refresh or invalidation in another backend (with connections of
  its own) or another process drops the near copy, and the next call returns the new
  value; the writing process never returns the old value once its write returned.
- The sequence numbers that refuse a read begun before an invalidation, a
  (re)subscription or a flush: stepped by hand on `Near`, and as a property.
- Bounds in time (Redis's remaining TTL, the near ttl), in size (LRU by entries and by
  bytes), and what a lost, killed or black-holed invalidation connection, a fork and
  the end of an event loop do to it.

The near cache fills only once its listener's SUBSCRIBE is confirmed, and a process's
own write announces itself to its own listener too: a read begun before that message
arrived is refused. So a test never expects the very next read to fill it; it reads
until the near cache holds the key (`warm`), within a bounded wait.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import json
import multiprocessing
import os
import threading
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

import _near_worker  # on sys.path (pytest's pythonpath), so in a spawned child too
from _proxy import Proxy
from _servers import Server
from _waiting import until, until_async
from stampede_guard import (
    AsyncRedisBackend,
    Entry,
    NearCache,
    RedisBackend,
    StampedeStats,
    cached_stampede_safe,
)
from stampede_guard._near import _REMEMBERED, FlushReason, Near
from stampede_guard.backends.redis._hub import DEAD, QUIET
from stampede_guard.metrics import (
    Event,
    Hit,
    NearEvent,
    NearEviction,
    NearFlush,
    NearInvalidation,
)

BOUND = 10.0  # seconds any wait of these tests may take before it fails
HELD = 30.0  # a near ttl longer than any test: what drops an entry is not its age

AnyRedisBackend = RedisBackend | AsyncRedisBackend


def near_of(backend: AnyRedisBackend) -> Near:
    """The backend's near cache runtime (every backend here is made with one)."""
    near = backend._near
    assert near is not None
    return near


def holds(backend: AnyRedisBackend, key: str) -> bool:
    """Whether the near cache holds *key*, live or not, without marking it used."""
    return near_of(backend)._store.peek(key) is not None


def warm(backend: RedisBackend, call: Callable[[], object], key: str) -> object:
    """Call until the near cache holds *key* (see the module); return the last value."""
    near = near_of(backend)
    values: list[object] = []

    def filled() -> bool:
        values.append(call())
        return near.lookup(key) is not None

    until(f"{key!r} in the near cache", filled, BOUND)
    return values[-1]


async def warm_async(
    backend: AsyncRedisBackend, call: Callable[[], Awaitable[object]], key: str
) -> object:
    """`warm` on an event loop: the listener's task runs between the reads."""
    near = near_of(backend)
    deadline = time.monotonic() + BOUND
    while True:
        value = await call()
        if near.lookup(key) is not None:
            return value
        assert time.monotonic() < deadline, f"{key!r} not in the near cache in time"
        await asyncio.sleep(0.005)


def flushes(events: list[NearEvent], reason: str) -> list[NearFlush]:
    return [e for e in events if isinstance(e, NearFlush) and e.reason == reason]


def near_hits(events: list[Event]) -> int:
    return sum(isinstance(e, Hit) and e.near for e in events)


def data_commands(client: redis.Redis) -> int:
    """Commands that read or write entries, as the server counts them (scripts too)."""
    stats: dict[str, Any] = client.info("commandstats")
    names = ("get", "evalsha", "eval", "pttl", "set", "del", "publish")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in names)


def acl_default(client: redis.Redis, rule: str) -> None:
    """Apply one ACL *rule* to the default user (which every connection here is)."""
    client.execute_command("ACL", "SETUSER", "default", rule)  # type: ignore[no-untyped-call]


def pubsub_ports(client: redis.Redis) -> set[int]:
    """The client ports of the server's pub/sub connections."""
    return {
        int(c["addr"].rsplit(":", 1)[1]) for c in client.client_list(_type="pubsub")
    }


@pytest.fixture
def make_near(
    redis_url: str, redis_prefix: str
) -> Iterator[Callable[..., RedisBackend]]:
    """Make `RedisBackend`s on the session's Redis and this test's prefix; closed after.

    Keyword arguments go to `NearCache`; ``near_cache=None`` makes one without.
    """
    made: list[RedisBackend] = []

    def make(url: str = redis_url, **near: Any) -> RedisBackend:
        config = near.pop("near_cache") if "near_cache" in near else NearCache(**near)
        made.append(RedisBackend.from_url(url, prefix=redis_prefix, near_cache=config))
        return made[-1]

    yield make
    for backend in made:
        backend.close()


# --- A hit with no round trip ---------------------------------------------------------


def test_a_second_read_in_the_process_is_served_from_memory_with_no_redis_command(
    make_near: Callable[..., RedisBackend], private_redis_client: redis.Redis
) -> None:
    """Once the near cache holds a key, 100 calls send no command and are near Hits."""
    backend = make_near(ttl=HELD)
    events: list[Event] = []
    stats = StampedeStats()
    computations = [0]

    def hook(event: Event, /) -> None:
        events.append(event)
        stats(event)

    @cached_stampede_safe(key="doc:{x}", backend=backend, ttl=60, metrics=hook)
    def doc(x: int) -> dict[str, int]:
        computations[0] += 1
        return {"x": x}

    assert warm(backend, lambda: doc(1), "doc:1") == {"x": 1}
    events.clear()
    before = data_commands(private_redis_client)
    assert [doc(1) for _ in range(100)] == [{"x": 1}] * 100
    after = data_commands(private_redis_client)
    assert after - before == 0
    assert events == [Hit("doc:1", near=True)] * 100
    assert stats.snapshot().near_hits == 100
    assert computations == [1]


def test_without_a_near_cache_every_hit_is_a_redis_read(
    make_near: Callable[..., RedisBackend], private_redis_client: redis.Redis
) -> None:
    """The control: the same calls on a backend without one each read Redis."""
    backend = make_near(near_cache=None)
    events: list[Event] = []

    @cached_stampede_safe(key="doc", backend=backend, ttl=60, metrics=events.append)
    def doc() -> int:
        return 1

    doc()
    events.clear()
    before = data_commands(private_redis_client)
    for _ in range(100):
        doc()
    assert data_commands(private_redis_client) - before >= 100
    assert events == [Hit("doc", near=False)] * 100
    assert backend.near_lookup is None
    assert backend.near_cache is None


def test_the_backend_reports_its_near_cache_settings(
    make_near: Callable[..., RedisBackend],
) -> None:
    """near_cache returns the NearCache given, and near_lookup reads it with no I/O."""
    config = NearCache(maxsize=7, ttl=3, maxbytes=4096)
    backend = make_near(near_cache=config)
    assert backend.near_cache is config
    assert backend.near_lookup is not None
    assert backend.near_lookup("nothing") is None


# --- Coherence ------------------------------------------------------------------------

# How another backend (or process) changes "doc" after setting its source to 2:
# "refresh": refresh(); "invalidate": invalidate() (the holder then computes 2 itself);
# "recompute": the value went stale (ttl 2 s, stale_ttl 60 s) and a stampede of ten
# callers recomputes it once. A plain expiry also ends the near copy, by Redis's own
# TTL (see the TTL tests below); a stale value stays in Redis, and in the near caches,
# until a message says it changed.
WRITES = ["refresh", "invalidate", "recompute"]
STALE_OPTIONS: dict[str, Any] = {
    "ttl": 2,
    "lock_timeout": 2,
    "stale_ttl": 60,
    "background_refresh": False,
}
PLAIN_OPTIONS: dict[str, Any] = {"ttl": 60}


def options_for(write: str) -> dict[str, Any]:
    return STALE_OPTIONS if write == "recompute" else PLAIN_OPTIONS


def change(write: str, doc: Any, backend: RedisBackend) -> None:
    """Change "doc" through *doc*, a function on *backend*, the way *write* says."""
    if write == "refresh":
        assert doc.refresh() == 2
    elif write == "invalidate":
        doc.invalidate()
    else:
        entry = backend.get("doc")
        assert entry is not None
        # Past the value's ttl by the clock that judges it: the server's.
        stale_at = entry.created_at + STALE_OPTIONS["ttl"] + 0.2
        until("the value going stale", lambda: backend.now() > stale_at)
        results: list[int] = []
        callers = [
            threading.Thread(target=lambda: results.append(doc())) for _ in range(10)
        ]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join(BOUND)
        # Served at once: the stale value, or (the one refreshing inline) the new one.
        assert sorted(set(results)) in ([1, 2], [2])
        assert len(results) == 10


@pytest.mark.parametrize("write", WRITES)
def test_a_write_through_another_backend_drops_the_near_copy_and_the_next_call_sees_it(
    write: str, make_near: Callable[..., RedisBackend]
) -> None:
    """Backend A holds "doc"; backend B (its own connections) changes it; A follows."""
    holder, writer = make_near(ttl=HELD), make_near(near_cache=None)
    source = [1]
    computed = {"holder": 0, "writer": 0}
    options = options_for(write)

    def compute(who: str) -> int:
        computed[who] += 1
        return source[0]

    @cached_stampede_safe(key="doc", backend=holder, **options)
    def held() -> int:
        return compute("holder")

    @cached_stampede_safe(key="doc", backend=writer, **options)
    def written() -> int:
        return compute("writer")

    assert written() == 1
    assert warm(holder, held, "doc") == 1
    assert computed == {"holder": 0, "writer": 1}
    source[0] = 2
    change(write, written, writer)
    until("the holder dropping its copy", lambda: not holds(holder, "doc"), BOUND)
    assert held() == 2
    # After an invalidation the holder computes 2; else the writer did, once.
    if write == "invalidate":
        assert computed == {"holder": 1, "writer": 1}
    else:
        assert computed == {"holder": 0, "writer": 2}


def test_a_store_announces_keys_with_any_characters(
    make_near: Callable[..., RedisBackend],
) -> None:
    """A key of non-ASCII text and spaces is announced and dropped like any other."""
    holder, writer = make_near(ttl=HELD), make_near(near_cache=None)
    source = [1]
    key = "città: ключ {1} 🔑"

    @cached_stampede_safe(key=lambda: key, backend=holder, ttl=60)
    def held() -> int:
        return source[0]

    @cached_stampede_safe(key=lambda: key, backend=writer, ttl=60)
    def written() -> int:
        return source[0]

    assert warm(holder, held, key) == 1
    source[0] = 2
    assert written.refresh() == 2
    until("the holder dropping its copy", lambda: not holds(holder, key), BOUND)
    assert held() == 2


@pytest.mark.slow
@pytest.mark.parametrize("write", WRITES)
def test_a_write_in_this_process_reaches_the_near_cache_of_a_spawned_process(
    write: str,
    make_near: Callable[..., RedisBackend],
    redis_url: str,
    redis_prefix: str,
    redis_client: redis.Redis,
) -> None:
    """A spawned child holds "doc"; this process changes it; the child drops and follows."""
    options = options_for(write)
    source = _near_worker.source_key(redis_prefix)
    redis_client.set(source, 1)
    backend = make_near(near_cache=None)
    computations = [0]

    @cached_stampede_safe(key=_near_worker.KEY, backend=backend, **options)
    def doc() -> int:
        computations[0] += 1
        return int(redis_client.get(source) or 0)

    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    child = ctx.Process(
        target=_near_worker.serve, args=(redis_url, redis_prefix, options, theirs)
    )
    child.start()
    theirs.close()

    def ask(command: str) -> tuple[object, int, int]:
        ours.send(command)
        assert ours.poll(BOUND * 2), f"the child did not answer {command!r}"
        status, value, hits, computed = ours.recv()
        assert status == "ok", value
        return value, hits, computed

    try:
        # The child is up before the value is stored: a stale-ttl value then has its
        # whole ttl ahead of the child's reads, so the child never refreshes it itself.
        assert ask("ping") == (None, 0, 0)
        assert doc() == 1
        value, hits, computed = ask("warm")
        assert (value, computed) == (1, 0)  # the parent's value, from the child's near
        assert hits >= 1
        redis_client.set(source, 2)
        change(write, doc, backend)
        assert ask("watch")[0] is True
        value, _, computed = ask("read")
        assert value == 2
        # After an invalidation the child computes 2; else this process did, once.
        assert (computed, computations[0]) == (
            (1, 1) if write == "invalidate" else (0, 2)
        )
    finally:
        if child.is_alive():
            ours.send("stop")
        child.join(BOUND)
        if child.is_alive():
            child.kill()
            child.join(BOUND)
        ours.close()
    assert child.exitcode == 0


# --- Read your writes -----------------------------------------------------------------

ROUNDS = 100


@pytest.mark.parametrize("write", ["refresh", "invalidate"])
def test_after_a_write_returns_no_thread_of_the_process_reads_the_old_value(
    write: str, make_near: Callable[..., RedisBackend]
) -> None:
    """Readers race every write; no read begun after a write returned gets an older value."""
    backend = make_near(ttl=HELD)
    stats = StampedeStats()
    source = [0]

    @cached_stampede_safe(key="doc", backend=backend, ttl=60, metrics=stats)
    def doc() -> int:
        return source[0]

    written = [0]  # the last value whose write has returned
    stale: list[tuple[int, int]] = []  # (written before the read, read)
    errors: list[BaseException] = []
    stop = threading.Event()

    def read() -> None:
        try:
            while not stop.is_set():
                floor = written[0]
                value = doc()
                if value < floor:
                    stale.append((floor, value))
        except BaseException as exc:
            errors.append(exc)

    assert warm(backend, doc, "doc") == 0
    readers = [threading.Thread(target=read) for _ in range(3)]
    for reader in readers:
        reader.start()
    try:
        for value in range(1, ROUNDS + 1):
            # Each write races a near copy of the value it replaces.
            until("the readers refilling the near cache", lambda: holds(backend, "doc"))
            source[0] = value
            if write == "refresh":
                assert doc.refresh() == value
            else:
                doc.invalidate()
            written[0] = value
            assert doc() >= value  # the writer itself
    finally:
        stop.set()
        for reader in readers:
            reader.join(BOUND)
    assert errors == []
    assert stale == []
    assert stats.snapshot().near_hits > ROUNDS  # the near cache was in play


# --- The sequence numbers, by hand --------------------------------------------------


def entry(value: object = "v") -> Entry:
    return Entry(value, 1.0e9, 0.0)


def admit(near: Near, key: str, start: int, value: object = "v") -> bool:
    """Offer *key*'s read begun at *start*; return whether the near cache kept it."""
    near.admit(key, entry(value), start, began=near.clock(), remote_ttl=None, weight=1)
    found = near.lookup(key)
    return found is not None and found.value == value


def live_near(**config: Any) -> Near:
    near = Near(NearCache(**config), "channel")
    near.subscribed()
    return near


def test_nothing_fills_the_near_cache_before_its_channel_is_subscribed() -> None:
    """begin() gives no start before subscribed(): reads then cannot fill it."""
    near = Near(NearCache(), "channel")
    assert near.begin() is None
    near.subscribed()
    start = near.begin()
    assert start is not None
    assert admit(near, "k", start)


def test_a_read_begun_before_an_invalidation_of_its_key_is_refused() -> None:
    """The read may have seen the value before the change: its entry must not stay."""
    near = live_near()
    start = near.begin()
    assert start is not None
    near.invalidated("k")
    assert not admit(near, "k", start)
    assert len(near) == 0


def test_a_read_begun_after_an_invalidation_is_admitted() -> None:
    """It was sent after the change, so it read the new value."""
    near = live_near()
    near.invalidated("k")
    start = near.begin()
    assert start is not None
    assert admit(near, "k", start)


def test_an_invalidation_of_another_key_refuses_nothing() -> None:
    """Refusals are by key: a change to "other" does not cost "k" its entry."""
    near = live_near()
    start = near.begin()
    assert start is not None
    near.invalidated("other")
    assert admit(near, "k", start)


def test_an_invalidation_drops_the_held_copy_and_reports_it() -> None:
    """invalidated() drops the key's entry and emits NearInvalidation."""
    events: list[NearEvent] = []
    near = live_near(metrics=events.append)
    start = near.begin()
    assert start is not None
    assert admit(near, "k", start)
    near.invalidated("k")
    assert near.lookup("k") is None
    assert events == [NearInvalidation("k")]


def test_a_read_begun_before_a_resubscription_is_refused() -> None:
    """Messages may have been missed before the new subscription: the read is refused."""
    near = live_near()
    start = near.begin()
    assert start is not None
    near.subscribed()  # a reconnection confirmed meanwhile
    assert not admit(near, "k", start)
    later = near.begin()
    assert later is not None
    assert admit(near, "k", later)


@pytest.mark.parametrize("reason", ["lost", "stopped"])
def test_a_read_begun_before_a_flush_is_refused_even_after_resubscribing(
    reason: FlushReason,
) -> None:
    """A flush empties the near cache, refuses entries while not live, and after."""
    events: list[NearEvent] = []
    near = live_near(metrics=events.append)
    first = near.begin()
    assert first is not None
    assert admit(near, "held", first)
    start = near.begin()
    assert start is not None
    if reason == "lost":
        near.flush("lost")
    else:
        near.stopped()
    assert len(near) == 0
    assert near.begin() is None
    assert not admit(near, "k", start)  # not live
    near.subscribed()
    assert not admit(near, "k", start)  # live again, but the read began before
    assert events == [NearFlush(reason, 1)]


def test_a_flush_while_not_live_and_empty_reports_nothing() -> None:
    """One NearFlush per outage: retries of a lost connection do not report again."""
    events: list[NearEvent] = []
    near = live_near(metrics=events.append)
    near.flush("lost")
    near.flush("lost")
    near.flush("lost")
    assert events == [NearFlush("lost", 0)]


def test_reads_older_than_the_remembered_invalidations_are_refused_never_admitted() -> (
    None
):
    """Once "k"'s invalidation is forgotten, a read begun before it is still refused."""
    near = live_near()
    start = near.begin()
    assert start is not None
    near.invalidated("k")
    for n in range(_REMEMBERED):  # push "k" out of the remembered invalidations
        near.invalidated(f"other-{n}")
    assert "k" not in near._recent
    assert len(near._recent) == _REMEMBERED
    assert not admit(near, "k", start)
    # So is any read begun before the oldest one forgotten, of any key at all.
    assert not admit(near, "never-invalidated", start)
    later = near.begin()
    assert later is not None
    assert admit(near, "k", later)


def test_the_near_entry_never_outlives_redis_s_ttl_nor_its_own() -> None:
    """The deadline is the read's start plus the shorter of the two; none if expired."""
    near = live_near(ttl=30)
    start = near.begin()
    assert start is not None
    began = near.clock()
    near.admit("short", entry(), start, began=began, remote_ttl=2.5, weight=1)
    near.admit("long", entry(), start, began=began, remote_ttl=300.0, weight=1)
    near.admit("forever", entry(), start, began=began, remote_ttl=None, weight=1)
    near.admit("gone", entry(), start, began=began, remote_ttl=0.0, weight=1)
    deadlines = {k: near._store.peek(k) for k in ("short", "long", "forever", "gone")}
    assert deadlines["gone"] is None
    # began + ttl - began is ttl up to the rounding of a large clock reading.
    assert {k: v[1] - began for k, v in deadlines.items() if v is not None} == {
        "short": pytest.approx(2.5),
        "long": pytest.approx(30.0),
        "forever": pytest.approx(30.0),
    }


# Steps of the property test: ("begin", read), ("invalidate", key), ("subscribe",),
# ("flush",), ("admit", read, key).
_KEYS = st.sampled_from(["a", "b"])
_READS = st.integers(min_value=0, max_value=3)
_STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("begin"), _READS),
        st.tuples(st.just("invalidate"), _KEYS),
        st.tuples(st.just("subscribe")),
        st.tuples(st.just("flush")),
        st.tuples(st.just("admit"), _READS, _KEYS),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(_STEPS)
def test_an_entry_is_admitted_exactly_when_nothing_changed_since_its_read_began(  # noqa: C901 - one case per step
    steps: list[tuple[Any, ...]],
) -> None:
    """Against a model: admitted iff live, and no flush, subscription or invalidation
    of its key came after its read began."""
    near = Near(NearCache(), "channel")
    live = False
    # read -> (its start, events since: keys invalidated, or "*" for everything)
    reads: dict[int, tuple[int, set[str]]] = {}
    for step in steps:
        match step:
            case ("begin", read):
                start = near.begin()
                assert (start is None) == (not live)
                if start is None:
                    reads.pop(read, None)
                else:
                    reads[read] = (start, set())
            case ("invalidate", key):
                near.invalidated(key)
                for _, since in reads.values():
                    since.add(key)
            case ("subscribe",) | ("flush",):
                if step[0] == "subscribe":
                    near.subscribed()
                    live = True
                else:
                    near.flush("lost")
                    live = False
                for _, since in reads.values():
                    since.add("*")
            case ("admit", read, key):
                if read not in reads:
                    continue
                start, since = reads[read]
                near._store.pop(key)
                kept = admit(near, key, start, value=(read, start))
                assert kept == (live and not since & {key, "*"})
            case _:
                raise AssertionError(step)


# --- Bounded in time ------------------------------------------------------------------


def test_a_near_entry_is_not_served_after_redis_expired_the_value(
    make_near: Callable[..., RedisBackend], redis_client: redis.Redis
) -> None:
    """ttl 1 s in Redis, 30 s near: once Redis has expired it, the function recomputes."""
    backend = make_near(ttl=HELD)
    events: list[Event] = []
    computations = [0]

    @cached_stampede_safe(
        key="doc", backend=backend, ttl=1, lock_timeout=1, metrics=events.append
    )
    def doc() -> int:
        computations[0] += 1
        return computations[0]

    assert warm(backend, doc, "doc") == 1
    near = near_of(backend)
    held = near._store.peek("doc")
    assert held is not None
    assert held[1] <= near.clock() + 1.0  # bounded by PTTL, not by the 30 s
    value_key = backend._codec.value_key("doc")
    until("Redis expiring the value", lambda: not redis_client.exists(value_key))
    assert near.lookup("doc") is None
    events.clear()
    assert doc() == 2
    assert near_hits(events) == 0
    assert computations == [2]


def test_a_write_around_the_library_is_seen_once_the_near_ttl_has_passed(
    make_near: Callable[..., RedisBackend], redis_client: redis.Redis
) -> None:
    """A raw SET of the value key sends no message: only the near ttl bounds it.

    Writes made around the library (by hand, another program, FLUSHALL, an eviction)
    announce nothing, so the near copy is served until its own ttl (here 1 s, shorter
    than Redis's 60 s) runs out; then the next call reads the new value from Redis.
    """
    backend = make_near(ttl=1.0)
    near = near_of(backend)

    @cached_stampede_safe(key="doc", backend=backend, ttl=60)
    def doc() -> str:
        return "old"

    warm(backend, doc, "doc")
    data, _ = backend._codec.encode("doc", Entry("new", backend.now(), 0.0))
    redis_client.set(backend._codec.value_key("doc"), data, px=60_000)
    # No call since: the near copy is the old value, whatever its age.
    held = near._store.peek("doc")
    assert held is not None
    assert held[0].value == "old"
    deadline = held[1]
    seen: list[tuple[float, str, float]] = []  # (before the call, value, after it)

    def sees_new() -> bool:
        before = near.clock()
        value = doc()
        seen.append((before, value, near.clock()))
        return value == "new"

    until("the new value", sees_new, BOUND)
    # The old value only ever came from calls begun before the near deadline; the new
    # one only from calls that ended after it (served from Redis, not from near).
    assert all(before < deadline for before, value, _ in seen if value == "old")
    assert all(after >= deadline for _, value, after in seen if value == "new")
    assert redis_client.pttl(backend._codec.value_key("doc")) > 1000


# --- The invalidation connection lost, silent, forked -----------------------------------


@pytest.mark.parametrize("kept_out", [True, False], ids=["kept-out", "let-back"])
def test_a_killed_invalidation_connection_flushes_and_reads_go_to_redis_until_it_is_back(
    kept_out: bool, own_server: Server
) -> None:
    """CLIENT KILL TYPE pubsub: NearFlush("lost") of all 3 entries; then it refills.

    "kept-out": the ACL forbids SUBSCRIBE until the test lets the listener back, so
    "until it is back" is a state, not a race: meanwhile the near cache is empty and
    off, every read goes to Redis, and a write whose message nobody hears is read at
    once. "let-back": the connection comes back at once (redis-py may reconnect and
    resubscribe by itself, unseen by the listener); the flush happens all the same.
    """
    admin = own_server.client()
    events: list[NearEvent] = []
    made = [
        RedisBackend.from_url(own_server.url, prefix="near", near_cache=near_cache)
        for near_cache in (NearCache(ttl=HELD, metrics=events.append), None)
    ]
    holder, writer = made
    stats = StampedeStats()
    source = {1: 10, 2: 20, 3: 30}

    @cached_stampede_safe(key="doc:{x}", backend=holder, ttl=60, metrics=stats)
    def doc(x: int) -> int:
        return source[x]

    @cached_stampede_safe(key="doc:{x}", backend=writer, ttl=60)
    def written(x: int) -> int:
        return source[x]

    near = near_of(holder)
    try:
        for x in (1, 2, 3):
            warm(holder, functools.partial(doc, x), f"doc:{x}")
        assert len(near) == 3
        if kept_out:
            acl_default(admin, "-subscribe")
        assert admin.client_kill_filter(_type="pubsub") == 1
        until("the flush", lambda: flushes(events, "lost"), BOUND)
        assert flushes(events, "lost") == [NearFlush("lost", 3)]
        source[1] = 11
        assert written.refresh(1) == 11
        hits_before = stats.snapshot().near_hits
        if kept_out:
            for _ in range(20):
                assert [doc(1), doc(2), doc(3)] == [11, 20, 30]
            assert stats.snapshot().near_hits == hits_before
            assert len(near) == 0
            assert not near.live
            acl_default(admin, "+subscribe")
        until("the listener back", lambda: near.live, BOUND)
        assert warm(holder, functools.partial(doc, 1), "doc:1") == 11
        assert [doc(1), doc(2), doc(3)] == [11, 20, 30]
        assert stats.snapshot().near_hits > hits_before
    finally:
        acl_default(admin, "+subscribe")
        for backend in made:
            backend.close()
        admin.close()


@pytest.mark.slow
def test_a_black_holed_invalidation_connection_flushes_within_the_silence_bound(
    proxy: Proxy,
    make_near: Callable[..., RedisBackend],
    redis_client: redis.Redis,
) -> None:
    """Half-open: the message of a write is lost, yet within QUIET+DEAD the near
    cache is flushed (the near ttl is 30 s), and the old value is never served after."""
    events: list[NearEvent] = []
    holder = make_near(
        proxy.url(), near_cache=NearCache(ttl=HELD, metrics=events.append)
    )
    writer = make_near(near_cache=None)
    source = [1]

    @cached_stampede_safe(key="doc", backend=holder, ttl=60)
    def held() -> int:
        return source[0]

    @cached_stampede_safe(key="doc", backend=writer, ttl=60)
    def written() -> int:
        return source[0]

    assert written() == 1
    assert warm(holder, held, "doc") == 1
    assert proxy.blackhole(pubsub_ports(redis_client)) == 1  # the holder's listener
    source[0] = 2
    assert written.refresh() == 2  # its message goes into the black hole
    # Detected within QUIET + DEAD (3 s) of silence; BOUND leaves room for a slow host.
    assert QUIET + DEAD < BOUND < HELD
    until("the flush", lambda: flushes(events, "lost"), BOUND)
    assert flushes(events, "lost") == [NearFlush("lost", 1)]
    assert [held() for _ in range(50)] == [2] * 50
    until("the reconnection", lambda: holder._listener._hub.reconnects >= 1, BOUND)
    assert warm(holder, held, "doc") == 2


def test_a_forked_child_starts_with_an_empty_near_cache_and_reads_correctly(
    make_near: Callable[..., RedisBackend],
) -> None:
    """After os.fork() the child holds nothing of the parent's, and fills its own."""
    if not hasattr(os, "fork"):
        pytest.skip("no os.fork on this platform")
    events: list[NearEvent] = []
    backend = make_near(near_cache=NearCache(ttl=HELD, metrics=events.append))
    stats = StampedeStats()

    @cached_stampede_safe(key="doc:{x}", backend=backend, ttl=60, metrics=stats)
    def doc(x: int) -> int:
        return x + 1

    for x in (1, 2):
        warm(backend, functools.partial(doc, x), f"doc:{x}")
    near = near_of(backend)
    assert len(near) == 2
    read, write = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns of fork() in a process with threads (the listener's).
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: report, then leave without running pytest's teardown
        report: dict[str, object] = {}
        try:
            report["held"] = len(near)
            report["live"] = near.live
            report["flushes"] = [e.entries for e in flushes(events, "fork")]
            hits = stats.snapshot().near_hits
            report["values"] = [doc(1), doc(2), doc(3)]
            report["near_hits"] = stats.snapshot().near_hits - hits
            warm(backend, lambda: doc(1), "doc:1")
            report["refilled"] = doc(1) == 2 and stats.snapshot().near_hits > hits
        except BaseException as exc:
            report["error"] = repr(exc)
        finally:
            os.write(write, json.dumps(report).encode())
            os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read, "rb") as answer:
        report = json.loads(answer.read())
    assert os.waitstatus_to_exitcode(status) == 0
    assert report == {
        "held": 0,
        "live": False,
        "flushes": [2],
        "values": [2, 3, 4],
        "near_hits": 0,
        "refilled": True,
    }
    assert len(near) == 2  # the parent's is untouched
    assert flushes(events, "fork") == []


# --- asyncio ----------------------------------------------------------------------------


def test_asyncio_a_second_read_is_a_near_hit(redis_url: str, redis_prefix: str) -> None:
    """AsyncRedisBackend: once filled, calls are Hit(near=True) with no Redis read."""
    events: list[Event] = []

    async def scenario() -> None:
        backend = AsyncRedisBackend.from_url(
            redis_url, prefix=redis_prefix, near_cache=NearCache(ttl=HELD)
        )

        @cached_stampede_safe(key="doc", backend=backend, ttl=60, metrics=events.append)
        async def doc() -> str:
            return "value"

        try:
            assert await warm_async(backend, doc, "doc") == "value"
            events.clear()
            reads = [0]
            real = backend._send

            async def counted(call: Any) -> Any:
                reads[0] += 1
                return await real(call)

            backend._send = counted  # type: ignore[method-assign]
            assert [await doc() for _ in range(50)] == ["value"] * 50
            assert reads == [0]
            assert events == [Hit("doc", near=True)] * 50
        finally:
            await backend.aclose()

    asyncio.run(scenario())


def test_asyncio_a_sync_writer_s_refresh_drops_the_near_copy(
    redis_url: str, redis_prefix: str, make_near: Callable[..., RedisBackend]
) -> None:
    """A RedisBackend in a thread refreshes; the asyncio holder drops it and follows."""
    writer = make_near(near_cache=None)
    source = [1]

    @cached_stampede_safe(key="doc", backend=writer, ttl=60)
    def written() -> int:
        return source[0]

    async def scenario() -> None:
        holder = AsyncRedisBackend.from_url(
            redis_url, prefix=redis_prefix, near_cache=NearCache(ttl=HELD)
        )

        @cached_stampede_safe(key="doc", backend=holder, ttl=60)
        async def held() -> int:
            return source[0]

        try:
            assert await asyncio.to_thread(written) == 1
            assert await warm_async(holder, held, "doc") == 1
            source[0] = 2
            assert await asyncio.to_thread(written.refresh) == 2
            await until_async("the drop", lambda: not holds(holder, "doc"), BOUND)
            assert await held() == 2
        finally:
            await holder.aclose()

    asyncio.run(scenario())


@pytest.mark.parametrize("write", ["refresh", "invalidate"])
def test_asyncio_after_a_write_returns_no_task_reads_the_old_value(
    write: str, redis_url: str, redis_prefix: str
) -> None:
    """Reader tasks race every write; none begun after it returned gets an older value."""
    stale: list[tuple[int, int]] = []
    stats = StampedeStats()

    async def scenario() -> None:
        backend = AsyncRedisBackend.from_url(
            redis_url, prefix=redis_prefix, near_cache=NearCache(ttl=HELD)
        )
        source = [0]
        written = [0]
        stop = asyncio.Event()

        @cached_stampede_safe(key="doc", backend=backend, ttl=60, metrics=stats)
        async def doc() -> int:
            await asyncio.sleep(0)
            return source[0]

        async def read() -> None:
            while not stop.is_set():
                floor = written[0]
                value = await doc()
                if value < floor:
                    stale.append((floor, value))
                await asyncio.sleep(0)  # a near hit never yields: let the others run

        try:
            assert await warm_async(backend, doc, "doc") == 0
            readers = [asyncio.create_task(read()) for _ in range(3)]
            for value in range(1, ROUNDS + 1):
                await until_async("a refill", lambda: holds(backend, "doc"), BOUND)
                source[0] = value
                if write == "refresh":
                    assert await doc.refresh() == value
                else:
                    await doc.invalidate()
                written[0] = value
                assert await doc() >= value
            stop.set()
            await asyncio.wait_for(asyncio.gather(*readers), BOUND)
        finally:
            await backend.aclose()

    asyncio.run(scenario())
    assert stale == []
    assert stats.snapshot().near_hits > ROUNDS


@pytest.fixture
def abandoned_connections_allowed() -> Iterator[None]:
    """Collect, quietly, the connections a stopped event loop left unclosed.

    A loop that stops without closing its connections leaves their sockets to the
    garbage collector, which warns (ResourceWarning): redis.asyncio's behaviour (see
    test_event_loops.py); collected here so no later test is blamed for them.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        yield
        gc.collect()


@pytest.mark.usefixtures("abandoned_connections_allowed")
def test_asyncio_the_end_of_an_event_loop_flushes_and_the_next_loop_fills_again(
    redis_url: str, redis_prefix: str
) -> None:
    """asyncio.run ends: NearFlush("stopped"), empty; a new asyncio.run fills it anew."""
    events: list[NearEvent] = []
    backend = AsyncRedisBackend.from_url(
        redis_url,
        prefix=redis_prefix,
        near_cache=NearCache(ttl=HELD, metrics=events.append),
    )
    hits: list[Event] = []

    @cached_stampede_safe(key="doc", backend=backend, ttl=60, metrics=hits.append)
    async def doc() -> str:
        return "value"

    async def fill() -> None:
        await warm_async(backend, doc, "doc")
        hits.clear()
        assert await doc() == "value"
        assert near_hits(hits) == 1

    asyncio.run(fill())
    near = near_of(backend)
    assert flushes(events, "stopped") == [NearFlush("stopped", 1)]
    assert len(near) == 0
    assert not near.live

    async def again() -> None:
        try:
            await fill()
        finally:
            await backend.aclose()

    asyncio.run(again())
    assert len(flushes(events, "stopped")) == 2  # aclose() stopped the second one


@pytest.mark.slow
def test_asyncio_a_paused_event_loop_does_not_serve_a_value_replaced_meanwhile(
    redis_url: str, redis_prefix: str, make_near: Callable[..., RedisBackend]
) -> None:
    """asyncio.Runner keeps its loop between runs; a write made while it was paused,
    for longer than the listener's own silence bound, must not be served from near."""
    writer = make_near(near_cache=None)
    source = [1]
    events: list[Event] = []

    @cached_stampede_safe(key="doc", backend=writer, ttl=60)
    def written() -> int:
        return source[0]

    holder = AsyncRedisBackend.from_url(
        redis_url, prefix=redis_prefix, near_cache=NearCache(ttl=HELD)
    )

    @cached_stampede_safe(key="doc", backend=holder, ttl=60, metrics=events.append)
    async def held() -> int:
        return source[0]

    with asyncio.Runner() as runner:
        try:
            assert written() == 1
            assert runner.run(warm_async(holder, held, "doc")) == 1
            source[0] = 2
            assert written.refresh() == 2
            # Longer than a half-open connection may go unnoticed (QUIET + DEAD).
            time.sleep(QUIET + DEAD + 0.5)
            events.clear()
            value = runner.run(held())
        finally:
            runner.run(holder.aclose())
    assert (value, near_hits(events)) == (2, 0)


# --- Bounded in size --------------------------------------------------------------------


@pytest.mark.parametrize("admission", [True, False])
def test_maxsize_evicts_the_least_recently_used_and_never_holds_more(
    admission: bool, make_near: Callable[..., RedisBackend]
) -> None:
    """maxsize=3: a, b, c held; a used; d evicts b, e evicts c; never above 3.

    With admission, d and e get in on a later read than their first (`warm` reads
    on until they are in); whichever read lets them in evicts the least recently used.
    """
    events: list[NearEvent] = []
    backend = make_near(
        near_cache=NearCache(
            maxsize=3, ttl=HELD, admission=admission, metrics=events.append
        )
    )
    near = near_of(backend)
    sizes: list[int] = []
    stats = StampedeStats()

    @cached_stampede_safe(key="item:{x}", backend=backend, ttl=60, metrics=stats)
    def item(x: str) -> str:
        return x.upper()

    def call(x: str) -> str:
        value = item(x)
        sizes.append(len(near))
        return value

    for x in "abc":
        warm(backend, functools.partial(call, x), f"item:{x}")
    assert [e for e in events if isinstance(e, NearEviction)] == []
    hits = stats.snapshot().near_hits
    assert call("a") == "A"  # a near hit: "a" is now the most recently used
    assert stats.snapshot().near_hits == hits + 1
    warm(backend, lambda: call("d"), "item:d")
    warm(backend, lambda: call("e"), "item:e")
    evicted = [e.key for e in events if isinstance(e, NearEviction)]
    assert evicted == ["item:b", "item:c"]
    assert {k for k in ("item:a", "item:d", "item:e") if holds(backend, k)} == {
        "item:a",
        "item:d",
        "item:e",
    }
    assert max(sizes) <= 3
    assert near.evictions == 2


def test_maxbytes_bounds_the_payload_bytes_held(
    make_near: Callable[..., RedisBackend],
) -> None:
    """maxbytes=1200 with ~530-byte payloads: two held, the oldest evicted for a third."""
    events: list[NearEvent] = []
    backend = make_near(
        near_cache=NearCache(ttl=HELD, maxbytes=1200, metrics=events.append)
    )
    near = near_of(backend)
    weights: list[int] = []

    @cached_stampede_safe(key="blob:{x}", backend=backend, ttl=60)
    def blob(x: str) -> str:
        return x * 500

    def call(x: str) -> str:
        value = blob(x)
        weights.append(near._store.weight)
        return value

    for x in "abc":
        warm(backend, functools.partial(call, x), f"blob:{x}")
    assert len(near) == 2
    evicted = [e.key for e in events if isinstance(e, NearEviction)]
    # A listener starved for 3 s on a loaded machine flushes the near cache (as it
    # must), and "a" may then be gone before "c" needs its room: no eviction at all.
    if not any(isinstance(e, NearFlush) for e in events):
        assert evicted == ["blob:a"]
    assert evicted in ([], ["blob:a"])
    assert max(weights) <= 1200
    assert 1000 < near._store.weight <= 1200


def test_an_entry_bigger_than_maxbytes_is_not_kept_and_displaces_nothing(
    make_near: Callable[..., RedisBackend],
) -> None:
    """A 2 kB payload with maxbytes=1200 is read from Redis every time; others stay."""
    events: list[NearEvent] = []
    backend = make_near(
        near_cache=NearCache(ttl=HELD, maxbytes=1200, metrics=events.append)
    )
    stats = StampedeStats()

    @cached_stampede_safe(key="blob:{n}", backend=backend, ttl=60, metrics=stats)
    def blob(n: int) -> str:
        return "x" * n

    warm(backend, lambda: blob(100), "blob:100")
    assert len(blob(2000)) == 2000  # computed and stored
    # Once the store's own message is in, reads of it could fill the near cache: none does.
    until(
        "the store's own message",
        lambda: any(e == NearInvalidation("blob:2000") for e in events),
        BOUND,
    )
    hits = stats.snapshot().near_hits
    assert [len(blob(2000)) for _ in range(20)] == [2000] * 20
    assert stats.snapshot().near_hits == hits
    assert not holds(backend, "blob:2000")
    assert holds(backend, "blob:100")
    assert [e for e in events if isinstance(e, NearEviction)] == []


# --- Bad input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "named"),
    [
        ({"maxsize": 0}, ValueError, "maxsize"),
        ({"maxsize": -5}, ValueError, "maxsize"),
        ({"maxsize": 1.5}, ValueError, "maxsize"),
        ({"maxsize": True}, ValueError, "maxsize"),
        ({"ttl": -1}, ValueError, "ttl"),
        ({"ttl": 0}, ValueError, "ttl"),
        ({"ttl": float("nan")}, ValueError, "ttl"),
        ({"ttl": float("inf")}, ValueError, "ttl"),
        ({"ttl": "x"}, TypeError, "ttl"),
        ({"ttl": True}, TypeError, "ttl"),
        ({"maxbytes": 0}, ValueError, "maxbytes"),
        ({"maxbytes": "1kb"}, ValueError, "maxbytes"),
        ({"metrics": "stats"}, TypeError, "metrics"),
        ({"admission": "yes"}, TypeError, "admission"),
        ({"admission": 1}, TypeError, "admission"),
    ],
)
def test_a_bad_near_cache_option_is_refused_naming_it(
    options: dict[str, Any], error: type[Exception], named: str
) -> None:
    """NearCache(...) with a bad value raises at once, naming the option."""
    with pytest.raises(error, match=rf"NearCache: {named}\b"):
        NearCache(**options)


@pytest.mark.parametrize("value", ["yes", True, 10_000, {"maxsize": 10}])
def test_a_near_cache_that_is_not_a_near_cache_is_refused_before_connecting(
    value: object, proxy: Proxy
) -> None:
    """near_cache="yes" (or any non-NearCache) is a TypeError naming near_cache; no
    connection is opened first (the proxy counts none)."""
    url = proxy.url()
    builders: list[Callable[[], object]] = [
        lambda: RedisBackend.from_url(url, near_cache=value),  # type: ignore[arg-type]
        lambda: AsyncRedisBackend.from_url(url, near_cache=value),  # type: ignore[arg-type]
        lambda: RedisBackend.from_sentinel(
            [("127.0.0.1", proxy.port)],
            "mymaster",
            near_cache=value,  # type: ignore[arg-type]
        ),
        lambda: RedisBackend(
            redis.Redis.from_url(url),
            near_cache=value,  # type: ignore[arg-type]
        ),
    ]
    for build in builders:
        with pytest.raises(TypeError, match=r"near_cache=.* is not a NearCache"):
            build()
    assert proxy._pairs == []
