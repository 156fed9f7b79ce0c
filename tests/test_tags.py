"""`tags=`: every value carries its tags, and `invalidate_tag` is final for all of them.

On the memory backend and on a real redis-server (`make_backend`; two backends on one
store stand for two processes). Computations are counted exactly; a computation in
flight is held by an event, never by a sleep.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, cast

import pytest

from stampede_guard import (
    AsyncRedisBackend,
    MemoryBackend,
    cached_stampede_safe,
    cached_stampede_safe_batch,
)
from stampede_guard.backends import Backend, TagBackend
from stampede_guard.testing import wait_for_joiners

pytestmark = pytest.mark.timeout(60)


class Tagging(Backend, TagBackend, Protocol):
    """A sync backend that keeps tags (MemoryBackend, RedisBackend)."""


def tag_backend(make_backend: Callable[[], Backend]) -> Tagging:
    backend = make_backend()
    assert isinstance(backend, TagBackend)
    return cast("Tagging", backend)


def test_invalidating_a_tag_recomputes_its_values_once_and_no_other(
    make_backend: Callable[[], Backend],
) -> None:
    """user:1's values are computed again after invalidate_tag("user:1"); user:2's not."""
    backend = tag_backend(make_backend)
    calls: list[tuple[str, int]] = []

    @cached_stampede_safe(
        key="profile:{user_id}", tags=("user:{user_id}",), backend=backend
    )
    def profile(user_id: int) -> dict[str, int]:
        calls.append(("profile", user_id))
        return {"user": user_id, "version": len(calls)}

    @cached_stampede_safe(
        key="posts:{user_id}", tags=("user:{user_id}", "posts"), backend=backend
    )
    def posts(user_id: int) -> list[int]:
        calls.append(("posts", user_id))
        return [user_id]

    first = profile(1), profile(2), posts(1), posts(2)
    assert len(calls) == 4
    assert (profile(1), profile(2), posts(1), posts(2)) == first
    assert len(calls) == 4
    tag_backend(make_backend).invalidate_tag("user:1")  # from "another process"
    assert profile(1) != first[0]
    assert posts(1) == [1]
    assert profile(2) == first[1]
    assert sorted(calls[4:]) == [("posts", 1), ("profile", 1)]
    backend.invalidate_tag("posts")
    posts(1), posts(2), profile(1)
    assert sorted(calls[6:]) == [("posts", 1), ("posts", 2)]


def test_tags_from_a_callable_of_the_value_and_the_arguments(
    make_backend: Callable[[], Backend],
) -> None:
    """tags=callable(value, *args): a tag the arguments cannot name (the value's org)."""
    backend = tag_backend(make_backend)
    calls: list[int] = []
    orgs = {1: "acme", 2: "acme", 3: "initech"}

    @cached_stampede_safe(
        key="user:{user_id}",
        tags=lambda value, user_id: (f"org:{value['org']}", f"user:{user_id}"),
        backend=backend,
    )
    def user(user_id: int) -> dict[str, Any]:
        calls.append(user_id)
        return {"id": user_id, "org": orgs[user_id]}

    for user_id in (1, 2, 3):
        user(user_id)
    backend.invalidate_tag("org:acme")
    for user_id in (1, 2, 3):
        user(user_id)
    assert calls == [1, 2, 3, 1, 2]


class Held:
    """A tagged function on key "k" whose first computation waits for `release`."""

    def __init__(self, backend: Tagging) -> None:
        self.started, self.release = threading.Event(), threading.Event()
        self.calls = 0

        @cached_stampede_safe(key="k", tags=("t",), backend=backend)
        def slow() -> int:
            self.calls += 1
            calls = self.calls
            if calls == 1:
                self.started.set()
                assert self.release.wait(10)
            return calls

        self.fn = slow


def test_a_computation_begun_before_the_invalidation_serves_its_caller_but_is_not_kept(
    make_backend: Callable[[], Backend],
) -> None:
    """Final: what began before invalidate_tag returned is not stored after it."""
    held = Held(tag_backend(make_backend))
    leader = slow_in_thread(held.fn)
    assert held.started.wait(10)
    tag_backend(make_backend).invalidate_tag("t")
    held.release.set()
    assert leader() == 1  # its caller asked before the invalidation: it may have it
    assert held.fn() == 2  # nobody else may: not stored
    assert held.fn() == 2
    assert held.calls == 2


def test_callers_joined_to_a_revoked_computation_do_not_take_its_value(
    make_backend: Callable[[], Backend],
) -> None:
    """Callers that joined the leader before the tag's invalidation get a later value."""
    held = Held(tag_backend(make_backend))
    leader = slow_in_thread(held.fn)
    assert held.started.wait(10)
    joined = [slow_in_thread(held.fn) for _ in range(4)]
    wait_for_joiners(held.fn, 4)
    tag_backend(make_backend).invalidate_tag("t")
    late = slow_in_thread(held.fn)  # a caller arriving after the invalidation
    held.release.set()
    assert leader() == 1
    # The joiners asked before the invalidation, but the value they shared was refused
    # by the backend: they do not take a value nobody else may have, and start again.
    assert [call() for call in joined] == [2, 2, 2, 2]
    assert late() == 2
    assert held.fn() == 2
    assert held.calls == 2


def slow_in_thread(fn: Callable[[], int]) -> Callable[[], int]:
    """Call *fn* in a thread now; return a function that joins it and gives its result."""
    out: list[int] = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()

    def result() -> int:
        thread.join(10)
        return out[0]

    return result


def test_tags_are_checked_at_decoration_time_with_the_fix() -> None:
    backend = MemoryBackend()
    with pytest.raises(
        TypeError,
        match=r"give a tuple of templates, e\.g\. tags=\('user:\{user_id\}',\)",
    ):
        # (a str is a Sequence[str] to a type checker: only the run time can tell)
        @cached_stampede_safe(tags="user:{user_id}", backend=backend)
        def one(user_id: int) -> int:
            return user_id

    with pytest.raises(ValueError, match="has no parameter 'uid'"):

        @cached_stampede_safe(tags=("user:{uid}",), backend=backend)
        def two(user_id: int) -> int:
            return user_id

    with pytest.raises(TypeError, match="not a str template"):

        @cached_stampede_safe(tags=(42,), backend=backend)  # type: ignore[arg-type]
        def three(user_id: int) -> int:
            return user_id


def test_tags_on_a_backend_without_invalidate_tag_are_refused_at_decoration() -> None:
    """A third-party backend that keeps no tags: refused, not silently ignored."""

    memory = MemoryBackend()

    class Plain:  # the Backend protocol's eight methods, and nothing of tags
        get, get_or_lock, lock = memory.get, memory.get_or_lock, memory.lock
        set, set_and_unlock = memory.set, memory.set_and_unlock
        extend, unlock, delete = memory.extend, memory.unlock, memory.delete

    plain = Plain()
    assert isinstance(plain, Backend)
    assert not isinstance(plain, TagBackend)
    with pytest.raises(TypeError, match="tags= needs a backend that keeps tags"):
        cached_stampede_safe(tags=("t",), backend=plain)


@pytest.mark.parametrize(
    ("made", "error", "match"),
    [
        ("t", TypeError, "returned the str 't'"),
        (["a\nb"], ValueError, "control character"),
        ([""], ValueError, "1 to 512"),
        ([7], TypeError, "must be a str"),
    ],
)
def test_bad_tags_from_a_callable_fail_the_call_and_leave_no_lock_or_value(
    make_backend: Callable[[], Backend],
    made: object,
    error: type[Exception],
    match: str,
) -> None:
    backend = tag_backend(make_backend)
    calls: list[int] = []
    returned: Any = made

    @cached_stampede_safe(
        key="k", tags=lambda _value: returned, backend=backend, lock_timeout=30
    )
    def fn() -> int:
        calls.append(1)
        return len(calls)

    with pytest.raises(error, match=match):
        fn()
    assert backend.get("k") is None
    # The lock was released: the next caller computes at once (it does not wait 30 s).
    assert backend.get_or_lock("k", "next", 5) == "next"


def test_bypass_and_refresh_of_a_tagged_function(
    make_backend: Callable[[], Backend],
) -> None:
    """bypass() returns the plain value; refresh() stores it with its tags."""
    backend = tag_backend(make_backend)
    calls: list[int] = []

    @cached_stampede_safe(key="k:{x}", tags=("x:{x}",), backend=backend)
    def fn(x: int) -> int:
        calls.append(x)
        return len(calls)

    assert fn.bypass(1) == 1
    assert fn(1) == 2
    assert fn.refresh(1) == 3
    entry = fn.get_cached(1)
    assert entry is not None
    assert entry.value == 3
    assert entry.tags == ("x:1",)
    backend.invalidate_tag("x:1")
    assert fn.get_cached(1) is None
    assert fn(1) == 4


def test_an_async_tagged_function_on_memory_and_on_redis(
    redis_url: str, redis_prefix: str
) -> None:
    """The asyncio wrapper tags its values too; `await backend.invalidate_tag(tag)`."""

    async def main() -> None:
        redis_backend = AsyncRedisBackend.from_url(redis_url, prefix=redis_prefix)
        memory = MemoryBackend()
        try:
            await calls_once_per_invalidation(memory, memory.ainvalidate_tag)
            await calls_once_per_invalidation(
                redis_backend, redis_backend.invalidate_tag
            )
        finally:
            await redis_backend.aclose()

    asyncio.run(main())


async def calls_once_per_invalidation(
    backend: MemoryBackend | AsyncRedisBackend,
    invalidate_tag: Callable[[str], Awaitable[None]],
) -> None:
    """20 concurrent calls compute once; after the tag's invalidation, once more."""
    calls: list[int] = []

    @cached_stampede_safe(key="a:{x}", tags=("x:{x}",), backend=backend)
    async def fn(x: int) -> int:
        calls.append(x)
        await asyncio.sleep(0)
        return len(calls)

    assert await asyncio.gather(*(fn(1) for _ in range(20))) == [1] * 20
    await invalidate_tag("x:1")
    assert await fn(1) == 2
    assert calls == [1, 1]


# Batch functions: each id's value carries the id's tags.


def test_a_batch_functions_ids_carry_their_tags(
    make_backend: Callable[[], Backend],
) -> None:
    """tags=("user:{}",): invalidating one id's tag recomputes that id only, once."""
    backend = tag_backend(make_backend)
    asked: list[list[int]] = []

    @cached_stampede_safe_batch(key="bu:{}", tags=("user:{}", "users"), backend=backend)
    def users(ids: Sequence[int]) -> dict[int, str]:
        asked.append(sorted(ids))
        return {i: f"user {i}" for i in ids if i != 3}

    assert users([1, 2, 3]) == {1: "user 1", 2: "user 2"}
    assert users([1, 2, 3]) == {1: "user 1", 2: "user 2"}
    tag_backend(make_backend).invalidate_tag("user:2")
    assert users([1, 2, 3]) == {1: "user 1", 2: "user 2"}
    tag_backend(make_backend).invalidate_tag("user:3")  # an id with no value too
    assert users([1, 2, 3]) == {1: "user 1", 2: "user 2"}
    backend.invalidate_tag("users")
    assert users([1, 2]) == {1: "user 1", 2: "user 2"}
    assert asked == [[1, 2, 3], [2], [3], [1, 2]]


def test_a_batch_functions_tags_from_each_value(
    make_backend: Callable[[], Backend],
) -> None:
    """tags=callable(value, id): a tag the id cannot name; None for an id with none."""
    backend = tag_backend(make_backend)
    asked: list[list[int]] = []
    seen: list[tuple[object, int]] = []

    def tags_of(value: dict[str, str] | None, id_: int) -> list[str]:
        seen.append((value, id_))
        return [] if value is None else [f"org:{value['org']}"]

    @cached_stampede_safe_batch(key="bo:{}", tags=tags_of, backend=backend)
    def people(ids: Sequence[int]) -> dict[int, dict[str, str]]:
        asked.append(sorted(ids))
        return {i: {"org": "acme" if i < 3 else "initech"} for i in ids if i != 9}

    people([1, 2, 3, 9])
    assert (None, 9) in seen
    backend.invalidate_tag("org:acme")
    people([1, 2, 3, 9])
    assert asked == [[1, 2, 3, 9], [1, 2]]


def test_a_batch_functions_bad_tags_are_refused_and_leave_no_lock(
    make_backend: Callable[[], Backend],
) -> None:
    backend = tag_backend(make_backend)
    with pytest.raises(ValueError, match="name only the id"):
        cached_stampede_safe_batch(key="b:{}", tags=("user:{uid}",), backend=backend)(
            lambda _ids: {}
        )
    returned: Any = ["a\nb"]

    @cached_stampede_safe_batch(
        key="bb:{}", tags=lambda _v, _i: returned, backend=backend, lock_timeout=30
    )
    def fn(ids: Sequence[int]) -> dict[int, int]:
        return {i: i for i in ids}

    with pytest.raises(ValueError, match="control character"):
        fn([1, 2])
    assert backend.get_or_lock("bb:1", "next", 5) == "next"  # released at once
    assert backend.get("bb:2") is None
