"""Settings from the result: ``ttl`` and ``stale_ttl`` as functions of the computed value."""

from __future__ import annotations

import asyncio
import math
import threading
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest
import redis

from _waiting import Waiting
from stampede_guard import (
    Entry,
    MemoryBackend,
    RedisBackend,
    cached_stampede_safe,
    cached_stampede_safe_batch,
)
from stampede_guard._cache_options import MAX_SECONDS
from stampede_guard._options import validated_policy
from stampede_guard.backends.redis._codec import lock_key, value_key
from stampede_guard.metrics import Event, Miss, Refresh
from stampede_guard.testing import VirtualClock

pytestmark = pytest.mark.timeout(60)


def max_age(value: dict[str, Any]) -> float:
    """The ttl function of these tests: the value's own ``max_age``."""
    return value["max_age"]  # type: ignore[no-any-return]


def lock_is_free(backend: MemoryBackend, key: str) -> bool:
    """Whether nobody holds *key*'s lock (taken and let go again to find out)."""
    claim = backend.lock(key, "probe", 1)
    backend.unlock(key, "probe")
    return claim == "probe"


def test_each_value_is_kept_as_long_as_its_own_ttl_says() -> None:
    """max_age 10 and 100: after 50 s the first is computed again, the second is not."""
    clock = VirtualClock()
    backend = clock.memory_backend()
    calls = Counter[str]()
    ages = {"short": 10, "long": 100}

    @cached_stampede_safe(key="page:{name}", ttl=max_age, backend=backend)
    def page(name: str) -> dict[str, Any]:
        calls[name] += 1
        return {"name": name, "max_age": ages[name]}

    page("short"), page("long")
    clock.advance(9.9)
    page("short"), page("long")
    assert calls == {"short": 1, "long": 1}
    clock.advance(40)
    page("short"), page("long")
    assert calls == {"short": 2, "long": 1}


def test_a_ttl_of_zero_is_not_cached_and_the_next_call_computes_again() -> None:
    """0 means "do not cache this one": returned, nothing stored, the lock let go."""
    backend = MemoryBackend()
    calls = 0

    @cached_stampede_safe(key="token", ttl=max_age, backend=backend)
    def token() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        return {"n": calls, "max_age": 0}

    assert token() == {"n": 1, "max_age": 0}
    assert token() == {"n": 2, "max_age": 0}
    key = token.cache_key()
    assert backend.get(key) is None
    assert lock_is_free(backend, key)


def test_an_answer_under_a_millisecond_counts_as_zero() -> None:
    """0.0005 s is less than a backend keeps: not stored, rather than kept too long."""
    backend = MemoryBackend()
    calls = 0

    @cached_stampede_safe(key="k", ttl=lambda _: 0.0005, backend=backend)
    def f() -> int:
        nonlocal calls
        calls += 1
        return calls

    assert (f(), f()) == (1, 2)
    assert backend.get(f.cache_key()) is None


def test_a_stale_ttl_function_gives_a_stale_period_only_to_the_values_it_names() -> (
    None
):
    """After ttl, the value with a stale period is served stale and refreshed; the one
    whose stale_ttl is 0 is gone: a miss."""
    clock = VirtualClock()
    backend = clock.memory_backend()
    events: list[Event] = []
    calls = Counter[str]()

    @cached_stampede_safe(
        key="rate:{name}",
        ttl=10,
        stale_ttl=lambda v: 100 if v["name"] == "keep" else 0,
        background_refresh=False,
        backend=backend,
        metrics=events.append,
    )
    def rate(name: str) -> dict[str, Any]:
        calls[name] += 1
        return {"name": name, "n": calls[name]}

    rate("keep"), rate("drop")
    clock.advance(20)
    events.clear()
    assert rate("keep")["n"] == 2  # refreshed inline: background_refresh=False
    assert rate("drop")["n"] == 2
    keep, drop = rate.cache_key("keep"), rate.cache_key("drop")
    assert Refresh(keep, "stale") in events
    assert Miss(keep) not in events
    assert Miss(drop) in events
    assert not any(isinstance(e, Refresh) and e.key == drop for e in events)


def test_a_stale_ttl_function_makes_hits_judged_for_a_refresh() -> None:
    """Any value may get a stale period, so every hit is judged (`Policy.refreshes`)."""
    assert validated_policy({"stale_ttl": lambda _: 0}).refreshes
    assert not validated_policy({"ttl": lambda _: 60}).refreshes


def test_ttl_jitter_cuts_a_functions_answer_as_it_cuts_a_number() -> None:
    """ttl=lambda v: v with jitter 0.5 cuts each entry exactly as ttl=100 does."""
    by_value = validated_policy({"ttl": lambda v: v, "ttl_jitter": 0.5})
    by_number = validated_policy({"ttl": 100, "ttl_jitter": 0.5})
    entry = Entry(100, 1_700_000_000.25, 0.1)
    times = [by_value.fresh_for(f"k:{n}", entry) for n in range(200)]
    assert times == [by_number.fresh_for(f"k:{n}", entry) for n in range(200)]
    assert all(50 <= t <= 100 for t in times)
    assert len(set(times)) == 200


BAD_ANSWERS: list[tuple[object, type[Exception]]] = [
    ("60", TypeError),
    (True, TypeError),
    (None, TypeError),
    (math.nan, ValueError),
    (math.inf, ValueError),
    (-1, ValueError),
    (MAX_SECONDS + 1, ValueError),
]


@pytest.mark.parametrize("option", ["ttl", "stale_ttl"])
@pytest.mark.parametrize(("answer", "error"), BAD_ANSWERS)
def test_a_bad_answer_raises_naming_it_and_leaves_no_lock_nor_value(
    option: str, answer: object, error: type[Exception]
) -> None:
    """Not a number, NaN, inf, negative, over 100 years: a clear error to the caller;
    nothing stored, the lock let go, and the next call computes at once."""
    backend = MemoryBackend()
    calls = 0

    def bad(_: object) -> float:
        return answer  # type: ignore[return-value]

    @cached_stampede_safe(
        key="k",
        ttl=bad if option == "ttl" else 60,
        stale_ttl=bad if option == "stale_ttl" else 0,
        backend=backend,
    )
    def f() -> int:
        nonlocal calls
        calls += 1
        return calls

    with pytest.raises(error, match=rf"the {option} function returned {answer!r}"):
        f()
    key = f.cache_key()
    assert backend.get(key) is None
    assert lock_is_free(backend, key)
    with pytest.raises(error):
        f()
    assert calls == 2


def test_a_ttl_function_that_raises_passes_its_error_on_with_a_note() -> None:
    """The function's own exception, unchanged but noted; the lock let go, nothing stored."""
    backend = MemoryBackend()

    @cached_stampede_safe(key="k", ttl=max_age, backend=backend)
    def f() -> dict[str, Any]:
        return {"no": "max_age"}

    with pytest.raises(KeyError, match="max_age") as raised:
        f()
    assert any("raised by the ttl function" in n for n in raised.value.__notes__)
    assert backend.get(f.cache_key()) is None
    assert lock_is_free(backend, f.cache_key())


def test_a_waiter_takes_over_when_the_leaders_ttl_answer_is_bad() -> None:
    """The leader's value gets -1 s: the leader raises, and the waiter (another process's
    copy, on the same backend) takes the released lock and computes once itself: two
    computations in all, and no wait for the lock's lease."""
    backend, waiting = MemoryBackend(), Waiting()
    both_in, guard, calls = threading.Event(), threading.Lock(), Counter[str]()

    def compute() -> str:
        with guard:
            calls["n"] += 1
            first = calls["n"] == 1
        if first:
            both_in.wait(10)
            return "bad"
        return "good"

    copies = [  # one per process: they share the backend, not their flights
        cached_stampede_safe(
            key="k",
            ttl=lambda v: -1 if v == "bad" else 60,
            lock_timeout=30,
            on_timeout="raise",  # a lock left behind would fail the waiter
            backend=backend,
            metrics=waiting,
        )(compute)
        for _ in range(2)
    ]
    outcomes: list[str] = []

    def call(f: Any) -> None:
        try:
            outcomes.append(f())
        except ValueError as exc:
            outcomes.append(type(exc).__name__)

    threads = [threading.Thread(target=call, args=(f,)) for f in copies]
    for t in threads:
        t.start()
    waiting.until_missed(2)
    both_in.set()
    for t in threads:
        t.join(20)
    assert sorted(outcomes) == ["ValueError", "good"]
    assert calls["n"] == 2
    assert [w.outcome for w in waiting.waits] == ["lock"]
    assert backend.get(copies[0].cache_key()) is not None


def test_an_async_function_takes_its_ttl_from_its_value() -> None:
    """async def: kept as long as the value says, 0 not kept, a bad answer lets go."""
    clock = VirtualClock()
    backend = clock.memory_backend()
    calls = Counter[str]()

    @cached_stampede_safe(key="t:{name}", ttl=max_age, backend=backend)
    async def token(name: str, age: float) -> dict[str, Any]:
        calls[name] += 1
        await asyncio.sleep(0)
        return {"max_age": age}

    async def main() -> None:
        await token("kept", 30)
        await token("never", 0)
        clock.advance(29)
        await token("kept", 30)
        await token("never", 0)
        assert calls == {"kept": 1, "never": 2}
        with pytest.raises(ValueError, match="the ttl function returned -5"):
            await token("bad", -5)
        assert lock_is_free(backend, token.cache_key("bad", -5))

    asyncio.run(main())


def test_the_batch_decorator_keeps_each_id_as_long_as_its_value_says() -> None:
    """Per id: max_age 10 and 100 expire apart; an id without a value is not stored."""
    clock = VirtualClock()
    backend = clock.memory_backend()
    asked: list[list[int]] = []
    ages = {1: 10, 2: 100}

    @cached_stampede_safe_batch(key="u:{}", ttl=max_age, backend=backend)
    def users(ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        asked.append(sorted(ids))
        return {i: {"max_age": ages[i]} for i in ids if i in ages}

    users([1, 2, 3])
    clock.advance(50)
    assert users([1, 2, 3]) == {1: {"max_age": 10}, 2: {"max_age": 100}}
    assert asked == [[1, 2, 3], [1, 3]]


def test_a_bad_answer_in_a_batch_raises_and_releases_every_lock() -> None:
    """One id's bad answer fails the call: nothing stored, no lock left, next call computes."""
    backend = MemoryBackend()
    calls = 0

    @cached_stampede_safe_batch(key="u:{}", ttl=max_age, backend=backend)
    def users(ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        nonlocal calls
        calls += 1
        return {i: {"max_age": -1 if i == 2 else 60} for i in ids}

    with pytest.raises(ValueError, match="the ttl function returned -1"):
        users([1, 2])
    for i in (1, 2):
        assert backend.get(users.cache_key(i)) is None
        assert lock_is_free(backend, users.cache_key(i))
    with pytest.raises(ValueError, match="the ttl function returned -1"):
        users([1, 2])
    assert calls == 2


def test_redis_keeps_the_value_for_its_max_age(
    redis_url: str, redis_client: redis.Redis, redis_prefix: str
) -> None:
    """The value key's PTTL is the value's max_age (+ its stale period); a value whose ttl
    is 0 leaves neither a value nor a lock in Redis."""
    backend = RedisBackend.from_url(redis_url, prefix=redis_prefix)

    @cached_stampede_safe(
        key="page:{age}",
        ttl=max_age,
        stale_ttl=lambda v: v["max_age"] / 2,
        backend=backend,
    )
    def page(age: int) -> dict[str, Any]:
        return {"max_age": age}

    try:
        page(120)
        page(0)
        kept = redis_client.pttl(value_key(redis_prefix, page.cache_key(120)))
        gone = page.cache_key(0)
        assert redis_client.exists(value_key(redis_prefix, gone)) == 0
        assert redis_client.exists(lock_key(redis_prefix, gone)) == 0
    finally:
        backend.close()
    assert 170_000 <= kept <= 180_000


def five() -> float:
    """A ttl function that forgot the value."""
    return 5.0


def test_anything_but_a_number_or_a_function_is_refused_at_decoration() -> None:
    """ttl="60" names both forms it takes; a function of no argument is refused too."""
    with pytest.raises(
        TypeError, match="number of seconds or a function of the computed value"
    ):
        cached_stampede_safe(ttl="60")  # type: ignore[call-overload]
    with pytest.raises(TypeError, match=r"stale_ttl=.* must take one argument"):
        cached_stampede_safe(stale_ttl=five)  # type: ignore[arg-type]


def test_a_ttl_function_is_not_warned_about_as_shorter_than_lock_timeout() -> None:
    """Its answers are not known at decoration: no warning (warnings are errors here)."""
    cached_stampede_safe(ttl=lambda _: 1, lock_timeout=30)
