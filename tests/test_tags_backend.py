"""Tags at the backend: `invalidate_tag` is final, one write, and hostile data is a miss.

Every test runs on the memory backend and on a real redis-server (`make_backend`: two
backends sharing one store stand for two processes), except where Redis alone is the
subject (the record and stamp keys, the commands sent).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
import redis

from _waiting import until
from stampede_guard import AsyncRedisBackend, NearCache, RedisBackend
from stampede_guard._near import Near
from stampede_guard._tags import TAG_MESSAGE
from stampede_guard.backends import Backend, Claim, Entry, TagBackend
from stampede_guard.metrics import NearEvent, NearInvalidation

pytestmark = pytest.mark.timeout(60)


def near_of(backend: RedisBackend) -> Near:
    near: Any = backend
    found: Near = near._near
    return found


def tagged(value: object, *tags: str) -> Entry:
    return Entry(value, 1.0, 0.0, tags)


def store(backend: Backend, key: str, entry: Entry) -> Entry | None:
    """Store *entry* as a leader does: look (taking the lock), then set and unlock."""
    claim = backend.get_or_lock(key, "leader", 10)
    assert isinstance(claim, Claim)
    return backend.set_and_unlock(key, entry, 60, "leader", ticket=claim.ticket)


def test_an_entry_with_an_invalidated_tag_reads_as_absent_everywhere(
    make_backend: Callable[[], Backend],
) -> None:
    """After invalidate_tag, get and get_or_lock in every process see no entry."""
    writer, other = make_backend(), make_backend()
    assert isinstance(writer, TagBackend)
    store(writer, "a", tagged(1, "user:1", "org:9"))
    store(writer, "b", tagged(2, "user:2", "org:9"))
    store(writer, "c", tagged(3))
    assert other.get("a") == tagged(1, "user:1", "org:9")
    writer.invalidate_tag("user:1")
    assert other.get("a") is None
    assert writer.get("a") is None
    # The next caller takes the lock at once: nothing to wait for.
    assert other.get_or_lock("a", "next", 10) == "next"
    # Entries without the tag are untouched.
    assert other.get("b") == tagged(2, "user:2", "org:9")
    assert other.get("c") == tagged(3)
    writer.invalidate_tag("org:9")
    assert other.get("b") is None
    assert other.get("c") == tagged(3)


def test_a_computation_begun_before_the_invalidation_is_not_stored(
    make_backend: Callable[[], Backend],
) -> None:
    """A store whose ticket precedes the tag's invalidation is refused; its lock is let go."""
    leader, other = make_backend(), make_backend()
    assert isinstance(other, TagBackend)
    claim = leader.get_or_lock("k", "leader", 10)
    assert isinstance(claim, Claim)
    other.invalidate_tag("user:1")  # while the leader computes
    refused = leader.set_and_unlock(
        "k", tagged("old", "user:1"), 60, "leader", ticket=claim.ticket
    )
    assert refused is None
    assert other.get("k") is None
    assert other.get_or_lock("k", "next", 10) == "next"  # the lock was released
    # A value of other tags, begun as early, is stored: only its own tags fence it.
    claim = other.get_or_lock("j", "leader", 10)
    assert isinstance(claim, Claim)
    other.invalidate_tag("user:1")
    stored = other.set_and_unlock(
        "j", tagged("v", "user:2"), 60, "leader", ticket=claim.ticket
    )
    assert stored == tagged("v", "user:2")


def test_a_value_computed_after_the_invalidation_is_stored_and_read(
    make_backend: Callable[[], Backend],
) -> None:
    """The tag keeps working: what is computed after it was invalidated holds."""
    backend, other = make_backend(), make_backend()
    assert isinstance(backend, TagBackend)
    store(backend, "k", tagged("old", "user:1"))
    backend.invalidate_tag("user:1")
    assert store(other, "k", tagged("new", "user:1")) == tagged("new", "user:1")
    assert backend.get("k") == tagged("new", "user:1")
    backend.invalidate_tag("user:1")
    assert backend.get("k") is None


def test_set_without_the_lock_is_fenced_by_tags_too(
    make_backend: Callable[[], Backend],
) -> None:
    """`set` (a waiter that timed out, a refresh) is refused for its tags like a leader."""
    backend = make_backend()
    assert isinstance(backend, TagBackend)
    claim = backend.lock("k", "t", 10)
    assert isinstance(claim, Claim)
    backend.invalidate_tag("t1")
    assert backend.set("k", tagged(1, "t1"), 60, ticket=claim.ticket) is None
    assert backend.get("k") is None
    claim = backend.lock("k", "t2", 10)
    assert isinstance(claim, Claim)
    assert backend.set("k", tagged(1, "t1"), 60, ticket=claim.ticket) is not None
    assert backend.get("k") == tagged(1, "t1")


def test_the_batch_reads_see_invalidated_tags(
    make_backend: Callable[[], Backend],
) -> None:
    """get_many and get_or_lock_many read a tag-invalidated entry as absent."""
    backend = make_backend()
    assert isinstance(backend, TagBackend)
    store(backend, "a", tagged(1, "x"))
    store(backend, "b", tagged(2, "y"))
    backend.invalidate_tag("x")
    many: Any = backend
    assert many.get_many(["a", "b"]) == [None, tagged(2, "y")]
    found = many.get_or_lock_many(["a", "b"], "tok", 10)
    assert found[0] == "tok"
    assert found[1] == tagged(2, "y")


@pytest.mark.parametrize(
    ("tag", "error"),
    [
        ("", ValueError),
        ("a\nb", ValueError),
        ("a\x00b", ValueError),
        ("x" * 513, ValueError),
        (42, TypeError),
    ],
)
def test_a_bad_tag_is_refused_with_the_fix(
    make_backend: Callable[[], Backend], tag: object, error: type[Exception]
) -> None:
    backend: Any = make_backend()
    with pytest.raises(error, match="tag"):
        backend.invalidate_tag(tag)


# Redis: what is sent, and what the server holds.


def test_invalidating_a_tag_is_one_write_whatever_the_number_of_entries(
    private_redis_client: redis.Redis, redis_url: str, redis_prefix: str
) -> None:
    """O(1): one SET (and one PUBLISH) for a tag carried by 500 entries."""
    backend = RedisBackend.from_url(redis_url, prefix=redis_prefix)
    try:
        for i in range(500):
            store(backend, f"k{i}", tagged(i, "popular"))
        before = private_redis_client.info("commandstats")
        backend.invalidate_tag("popular")
        after = private_redis_client.info("commandstats")
        calls = {
            name: after[name]["calls"] - before.get(name, {"calls": 0})["calls"]
            for name in after
            if after[name]["calls"] != before.get(name, {"calls": 0})["calls"]
        }
        calls.pop("cmdstat_info", None)
        writes = {k: v for k, v in calls.items() if k in {"cmdstat_set", "cmdstat_del"}}
        assert writes == {"cmdstat_set": 1}
        assert all(backend.get(f"k{i}") is None for i in range(0, 500, 50))
    finally:
        backend.close()


def test_a_tagged_hit_is_one_round_trip(redis_url: str, redis_prefix: str) -> None:
    """A hit on a tagged key this process knows is one script call: no GET first."""
    backend = RedisBackend.from_url(redis_url, prefix=redis_prefix)
    try:
        store(backend, "k", tagged("v", "t"))
        sent: list[str] = []
        anyone: Any = backend
        send, read = anyone._send, anyone._read

        def counting_send(call: Any) -> Any:
            sent.append(call.script)
            return send(call)

        def counting_read(name: str) -> Any:
            sent.append("GET")
            return read(name)

        anyone._send, anyone._read = counting_send, counting_read
        for _ in range(3):
            assert backend.get("k") == tagged("v", "t")
        assert sent == ["read", "read", "read"]
        sent.clear()
        # An untagged key's hit stays one GET.
        store(backend, "plain", tagged("p"))
        sent.clear()
        assert backend.get("plain") == tagged("p")
        assert sent == ["GET"]
    finally:
        backend.close()


def test_a_process_that_never_stored_a_tagged_key_still_checks_its_tags(
    redis_url: str, redis_prefix: str
) -> None:
    """A GET that finds a tagged value reads it again through the checking script."""
    writer = RedisBackend.from_url(redis_url, prefix=redis_prefix)
    reader = RedisBackend.from_url(redis_url, prefix=redis_prefix)
    try:
        store(writer, "k", tagged("v", "t"))
        writer.invalidate_tag("t")
        assert reader.get("k") is None  # found by GET, refused by the check
        store(writer, "k", tagged("w", "t"))
        assert reader.get("k") == tagged("w", "t")
    finally:
        writer.close()
        reader.close()


@pytest.mark.parametrize(
    "damage",
    [
        "tag key deleted",
        "tag key a list",
        "record a list",
        "record deleted",
        "stamp garbage",
    ],
)
def test_damaged_tag_data_reads_as_a_miss_and_the_next_store_repairs_it(
    redis_url: str, redis_prefix: str, redis_client: redis.Redis, damage: str
) -> None:
    """Whatever happened to a tag's stamp or a value's record: a miss, never an error."""
    backend = RedisBackend.from_url(redis_url, prefix=redis_prefix)
    try:
        store(backend, "k", tagged("v", "t"))
        tag_key = f"{redis_prefix}:tag:t"
        (record,) = redis_client.keys(f"{redis_prefix}:*g:k")
        match damage:
            case "tag key deleted":
                redis_client.delete(tag_key)
            case "tag key a list":
                redis_client.delete(tag_key)
                redis_client.rpush(tag_key, "x")
            case "record a list":
                redis_client.delete(record)
                redis_client.rpush(record, "x")
            case "record deleted":
                redis_client.delete(record)
            case _:
                redis_client.set(tag_key, "not a stamp")
        assert backend.get("k") is None
        claim = backend.get_or_lock("k", "next", 10)
        assert claim == "next"
        assert isinstance(claim, Claim)
        stored = backend.set_and_unlock(
            "k", tagged("again", "t"), 60, "next", ticket=claim.ticket
        )
        assert stored == tagged("again", "t")
        assert backend.get("k") == tagged("again", "t")
        backend.invalidate_tag("t")
        assert backend.get("k") is None
    finally:
        backend.close()


def test_the_tag_key_lives_as_long_as_the_longest_value_carrying_it(
    redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    """Stores stretch the stamp's expiry to their own: an old value never outlives it."""
    backend = RedisBackend.from_url(redis_url, prefix=redis_prefix)
    try:
        claim = backend.lock("short", "t", 10)
        backend.set("short", tagged(1, "t"), 5, ticket=claim.ticket)
        assert 0 < redis_client.pttl(f"{redis_prefix}:tag:t") <= 5000
        claim = backend.lock("long", "t", 10)
        backend.set("long", tagged(1, "t"), 500, ticket=claim.ticket)
        assert redis_client.pttl(f"{redis_prefix}:tag:t") > 400_000
        claim = backend.lock("short2", "t", 10)
        backend.set("short2", tagged(1, "t"), 5, ticket=claim.ticket)
        assert redis_client.pttl(f"{redis_prefix}:tag:t") > 400_000  # never shortened
    finally:
        backend.close()


def test_the_async_backend_invalidates_tags_awaited(
    redis_url: str, redis_prefix: str
) -> None:
    """`await AsyncRedisBackend.invalidate_tag(tag)`, seen by a sync backend too."""
    sync = RedisBackend.from_url(redis_url, prefix=redis_prefix)

    async def main() -> None:
        backend = AsyncRedisBackend.from_url(redis_url, prefix=redis_prefix)
        try:
            claim = await backend.aget_or_lock("k", "t", 10)
            assert isinstance(claim, Claim)
            await backend.aset_and_unlock(
                "k", tagged(1, "x"), 60, "t", ticket=claim.ticket
            )
            assert await backend.aget("k") == tagged(1, "x")
            await backend.invalidate_tag("x")
            assert await backend.aget("k") is None
            await backend.ainvalidate_tag("x")
        finally:
            await backend.aclose()

    try:
        asyncio.run(main())
        assert sync.get("k") is None
    finally:
        sync.close()


def test_a_near_cache_drops_what_it_holds_when_a_tag_is_invalidated_anywhere(
    redis_url: str, redis_prefix: str
) -> None:
    """The invalidating process drops at once; another one on hearing the message."""
    events: list[NearEvent] = []
    near = RedisBackend.from_url(
        redis_url,
        prefix=redis_prefix,
        near_cache=NearCache(ttl=60, metrics=events.append),
    )
    writer = RedisBackend.from_url(redis_url, prefix=redis_prefix)
    try:
        held = near.local_read
        assert held is not None
        near.get("k")  # subscribes the near cache's channel

        def heard(key: str) -> Callable[[], bool]:
            return lambda: NearInvalidation(key) in events

        def holds(key: str) -> Callable[[], bool]:
            def check() -> bool:
                near.get(key)
                return held(key) is not None

            return check

        until("the near cache listening", lambda: near_of(near).live)
        # Fill only once each store's own message is heard: it drops the key, and a
        # copy filled before it lands would be dropped by it, not by the tag.
        store(writer, "k", tagged("v", "t"))
        store(writer, "other", tagged("o", "u"))
        until("the stores' messages heard", lambda: heard("k")() and heard("other")())
        until("the near cache holding k", holds("k"))
        until("the near cache holding other", holds("other"))
        writer.invalidate_tag("t")
        until("the near cache dropping k", lambda: held("k") is None)
        assert near.get("k") is None
        assert held("other") is not None  # another tag's: still held
        # Read-your-writes: the invalidating process itself serves nothing old.
        before = events.count(NearInvalidation("k"))
        store(writer, "k", tagged("w", "t"))
        until(
            "the store's message heard",
            lambda: events.count(NearInvalidation("k")) > before,
        )
        until("the near cache holding k again", holds("k"))
        near.invalidate_tag("t")
        assert held("k") is None
        assert near.get("k") is None
    finally:
        near.close()
        writer.close()


# The near cache's own decisions about tags, on a `Near` driven by hand.


def live_near() -> Near:
    near = Near(NearCache(), "channel")
    near.subscribed()
    return near


def offer(near: Near, key: str, start: int, *tags: str) -> bool:
    """Offer a read of *key* begun at *start*; return whether the near cache kept it."""
    near.admit(
        key, tagged(key, *tags), start, began=near.clock(), remote_ttl=None, weight=1
    )
    return near.lookup(key) is not None


def test_a_tag_drops_only_the_near_entries_carrying_it() -> None:
    near = live_near()
    start = near.begin()
    assert start is not None
    assert offer(near, "a", start, "user:1")
    assert offer(near, "b", start, "user:1", "org:1")
    assert offer(near, "c", start, "user:2")
    assert offer(near, "d", start)
    near.invalidated(TAG_MESSAGE + "user:1")
    assert near.lookup("a") is None
    assert near.lookup("b") is None
    assert near.lookup("c") is not None
    assert near.lookup("d") is not None


def test_a_read_begun_before_a_tags_invalidation_cannot_bring_its_entry_back() -> None:
    """The tag's number refuses what an older read brings back carrying it."""
    near = live_near()
    before = near.begin()
    assert before is not None
    near.invalidated(TAG_MESSAGE + "user:1")
    assert not offer(near, "a", before, "user:1")  # read before, landed after
    assert offer(near, "b", before, "user:2")  # another tag's: kept
    after = near.begin()
    assert after is not None
    assert offer(near, "a", after, "user:1")  # read after: kept


def test_a_key_stored_again_without_the_tag_is_not_dropped_by_it() -> None:
    """The index may name keys that no longer carry the tag: only carriers go."""
    near = live_near()
    start = near.begin()
    assert start is not None
    assert offer(near, "a", start, "user:1")
    near.drop("a")  # changed: stored again, now without the tag
    later = near.begin()
    assert later is not None
    assert offer(near, "a", later, "org:1")
    near.invalidated(TAG_MESSAGE + "user:1")
    assert near.lookup("a") is not None


def test_the_tag_index_stays_bounded_under_churn() -> None:
    """Keys evicted or dropped leave the index when it outgrows what is held."""
    near = Near(NearCache(maxsize=100, admission=False), "channel")
    near.subscribed()
    for i in range(50_000):
        start = near.begin()
        assert start is not None
        offer(near, f"k{i}", start, f"t{i % 7}", "all")
    assert len(near) <= 100
    assert near._indexed <= 2 * (100 + 4096)
    near.invalidated(TAG_MESSAGE + "all")
    assert len(near) == 0
