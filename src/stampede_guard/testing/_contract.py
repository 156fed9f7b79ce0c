"""The backend contract: each check written once, run on a sync or an async backend.

A check is a coroutine function over a `Driver` (see `_drivers`): the sync driver
runs it without an event loop, the async one on a loop of the test's own.
`BackendContract` and `AsyncBackendContract` are made from the one list of checks,
one test method per check, named and documented after it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import pytest

from stampede_guard.backends import RELEASED, AsyncBackend, Backend, Entry
from stampede_guard.testing._drivers import (
    PATIENCE,
    AsyncDriver,
    Driver,
    SyncDriver,
    run_sync,
)

__all__ = ["AsyncBackendContract", "BackendContract"]

_LONG = 60.0  # seconds: a value or lock that must outlive the test
_SHORT = 0.05  # seconds: a value or lock the test waits out
_RACERS = 50

T = TypeVar("T")


def _key(label: str = "k") -> str:
    return f"contract:{label}:{uuid.uuid4().hex}"


def _entry(value: object = None) -> Entry:
    # Binary fractions, so that every backend's float encoding round-trips them exactly.
    return Entry(value, created_at=1_700_000_000.25, compute_seconds=0.125)


_VALUE = {"name": "Zürich", "ids": [1, 2, 3], "ratio": 0.5, "ok": True, "none": None}


def _ticket_of(claim: object) -> int:
    """Return the ticket of a look, or skip: fencing is optional in the contract."""
    ticket = getattr(claim, "ticket", None)
    if ticket is None:
        pytest.skip("the backend gives no tickets (Claim): its stores are not fenced")
    return int(ticket)


async def _eventually(b: Driver, condition: Callable[[], Awaitable[bool]]) -> bool:
    """Poll *condition* until it holds or `PATIENCE` runs out; return its last result."""
    deadline = time.monotonic() + PATIENCE
    while not await condition():
        if time.monotonic() > deadline:
            return False
        await b.sleep(0.01)
    return True


Check = Callable[[Driver], Coroutine[Any, Any, None]]
_CHECKS: list[Check] = []


def _check(fn: Check) -> Check:
    """Register *fn* as a check of the contract (its name becomes ``test_<name>``)."""
    _CHECKS.append(fn)
    return fn


# --- Values ---------------------------------------------------------------------------


@_check
async def get_of_missing_key_returns_none(b: Driver) -> None:
    """A key never stored reads as None."""
    assert await b.get(_key()) is None


@_check
async def set_then_get_returns_equal_entry(b: Driver) -> None:
    """A stored entry reads back with equal value, created_at and compute_seconds."""
    key, entry = _key(), _entry(_VALUE)
    assert await b.set(key, entry, _LONG) == entry
    assert await b.get(key) == entry


@_check
async def set_returns_the_entry_as_readers_get_it(b: Driver) -> None:
    """What set returns equals what get then reads, even if encoding changed it."""
    key = _key()
    stored = await b.set(key, _entry({"pair": (1, 2)}), _LONG)
    assert await b.get(key) == stored


@_check
async def set_replaces_previous_entry(b: Driver) -> None:
    """A second set of one key replaces the first entry."""
    key = _key()
    await b.set(key, _entry("old"), _LONG)
    await b.set(key, _entry("new"), _LONG)
    assert await b.get(key) == _entry("new")


@_check
async def none_is_storable_and_distinct_from_a_miss(b: Driver) -> None:
    """An entry whose value is None reads back as an Entry, not as a miss."""
    key = _key()
    await b.set(key, _entry(None), _LONG)
    assert await b.get(key) == _entry(None)
    assert await b.get_or_lock(key, "token-a", _LONG) == _entry(None)


@_check
async def entry_expires_after_its_ttl(b: Driver) -> None:
    """An entry with a short ttl disappears; one with a long ttl stays."""
    short, long = _key("short"), _key("long")
    await b.set(short, _entry("short"), _SHORT)
    await b.set(long, _entry("long"), _LONG)
    assert await _eventually(b, lambda: _is_missing(b, short))
    assert await b.get(long) == _entry("long")


async def _is_missing(b: Driver, key: str) -> bool:
    return await b.get(key) is None


async def _takes(b: Driver, key: str, token: str) -> bool:
    return await b.get_or_lock(key, token, _LONG) == token


@_check
async def expired_entry_lets_get_or_lock_take_the_lock(b: Driver) -> None:
    """Once an entry expires, get_or_lock takes the free lock instead of returning it."""
    key = _key()
    await b.set(key, _entry("v"), _SHORT)
    assert await _eventually(b, lambda: _is_missing(b, key))
    assert await b.get_or_lock(key, "token-a", _LONG) == "token-a"


# --- Locks ----------------------------------------------------------------------------


@_check
async def get_or_lock_takes_a_free_lock(b: Driver) -> None:
    """get_or_lock on a key with no value and no lock takes it: returns our token."""
    assert await b.get_or_lock(_key(), "token-a", _LONG) == "token-a"


@_check
async def get_or_lock_returns_the_holders_token_while_lock_is_held(b: Driver) -> None:
    """get_or_lock with another token returns the holder's token and takes nothing."""
    key = _key()
    assert await b.get_or_lock(key, "token-a", _LONG) == "token-a"
    assert await b.get_or_lock(key, "token-b", _LONG) == "token-a"


@_check
async def get_or_lock_returns_entry_when_lock_is_free(b: Driver) -> None:
    """get_or_lock returns the stored entry (and takes no lock) when a value exists."""
    key = _key()
    await b.set(key, _entry("v"), _LONG)
    assert await b.get_or_lock(key, "token-a", _LONG) == _entry("v")
    assert await b.unlock(key, "token-a") is False


@_check
async def get_or_lock_returns_entry_while_lock_is_held(b: Driver) -> None:
    """A waiter's get_or_lock returns the entry even if the lock is still held."""
    key = _key()
    assert await b.get_or_lock(key, "token-a", _LONG) == "token-a"
    await b.set(key, _entry("v"), _LONG)
    assert await b.get_or_lock(key, "token-b", _LONG) == _entry("v")


@_check
async def expired_lock_can_be_taken_by_another_token(b: Driver) -> None:
    """A lock whose lock_ttl ran out is free for another token, and then held by it."""
    key = _key()
    assert await b.get_or_lock(key, "token-a", _SHORT) == "token-a"
    assert await _eventually(b, lambda: _takes(b, key, "token-b"))
    assert await b.get_or_lock(key, "token-a", _LONG) == "token-b"
    assert await b.unlock(key, "token-a") is False
    assert await b.unlock(key, "token-b") is True


@_check
async def lock_takes_a_free_lock_even_with_a_value_stored(b: Driver) -> None:
    """`lock` ignores the stored value: it takes a free lock and returns our token."""
    key = _key()
    await b.set(key, _entry("v"), _LONG)
    assert await b.lock(key, "token-a", _LONG) == "token-a"
    assert await b.get_or_lock(key, "token-b", _LONG) == _entry("v")
    assert await b.lock(key, "token-b", _LONG) == "token-a"
    assert await b.unlock(key, "token-a") is True


@_check
async def extend_renews_only_the_holders_lease(b: Driver) -> None:
    """Extending by the holder keeps a short lock alive; by anyone else, nothing."""
    key = _key()
    # Long enough to outlast the next round trip on a loaded machine (0.05 s did not
    # always), short enough to wait out.
    lease = 0.5
    assert await b.get_or_lock(key, "token-a", lease) == "token-a"
    assert await b.extend(key, "token-a", _LONG) is True
    assert await b.extend(key, "token-b", _LONG) is False
    await b.sleep(lease * 1.2)  # the short lease would have run out by now
    assert await b.lock(key, "token-b", _LONG) == "token-a", "the lease was renewed"
    assert await b.unlock(key, "token-a") is True
    assert await b.extend(key, "token-a", _LONG) is False, "a free lock is not renewed"


@_check
async def unlock_with_right_token_frees_the_lock(b: Driver) -> None:
    """`unlock` by the holder returns True and lets another token take the lock."""
    key = _key()
    assert await b.get_or_lock(key, "token-a", _LONG) == "token-a"
    assert await b.unlock(key, "token-a") is True
    assert await b.get_or_lock(key, "token-b", _LONG) == "token-b"


@_check
async def unlock_with_wrong_token_keeps_the_lock(b: Driver) -> None:
    """`unlock` with another token returns False and the lock stays held."""
    key = _key()
    assert await b.get_or_lock(key, "token-a", _LONG) == "token-a"
    assert await b.unlock(key, "token-b") is False
    assert await b.get_or_lock(key, "token-c", _LONG) == "token-a"
    assert await b.unlock(key, "token-a") is True


@_check
async def unlock_of_a_free_lock_returns_false(b: Driver) -> None:
    """`unlock` of a key nobody locked returns False."""
    assert await b.unlock(_key(), "token-a") is False


@_check
async def only_one_of_many_callers_takes_a_free_lock(b: Driver) -> None:
    """Callers racing get_or_lock on one free key: all agree on one winner."""
    key = _key()

    async def take(i: int) -> object:
        return await b.get_or_lock(key, f"token-{i}", _LONG)

    winners = set(await b.race(_RACERS, take))
    assert len(winners) == 1, winners
    assert winners <= {f"token-{i}" for i in range(_RACERS)}


# --- Fenced stores --------------------------------------------------------------------


@_check
async def set_and_unlock_stores_and_releases_own_lock(b: Driver) -> None:
    """set_and_unlock by the holder stores the entry, returns it and frees the lock."""
    key = _key()
    assert await b.get_or_lock(key, "token-a", _LONG) == "token-a"
    assert await b.set_and_unlock(key, _entry("v"), _LONG, "token-a") == _entry("v")
    assert await b.get(key) == _entry("v")
    assert await b.unlock(key, "token-a") is False
    await b.delete(key)
    assert await b.get_or_lock(key, "token-b", _LONG) == "token-b"


@_check
async def set_and_unlock_by_a_non_holder_stores_nothing(b: Driver) -> None:
    """A fenced write: while another token holds the lock, nothing is stored."""
    key = _key()
    assert await b.get_or_lock(key, "token-a", _LONG) == "token-a"
    assert await b.set_and_unlock(key, _entry("v"), _LONG, "token-b") == _entry("v")
    assert await b.get(key) is None
    assert await b.unlock(key, "token-a") is True


@_check
async def set_and_unlock_with_a_free_lock_stores(b: Driver) -> None:
    """A holder whose lease ran out with nobody taking over still stores its value."""
    key = _key()
    assert await b.set_and_unlock(key, _entry("v"), _LONG, "token-a") == _entry("v")
    assert await b.get(key) == _entry("v")


@_check
async def set_and_unlock_after_lock_expiry_keeps_the_new_holders_lock(
    b: Driver,
) -> None:
    """A holder whose lock passed to a successor neither stores nor frees that lock."""
    key = _key()
    assert await b.get_or_lock(key, "token-a", _SHORT) == "token-a"
    assert await _eventually(b, lambda: _takes(b, key, "token-b"))
    late = await b.set_and_unlock(key, _entry("late"), _LONG, "token-a")
    assert late == _entry("late")
    assert await b.get(key) is None, "the late value must not overwrite the new one"
    assert await b.unlock(key, "token-b") is True


@_check
async def tickets_of_successive_looks_increase(b: Driver) -> None:
    """Each look's ticket is later than the one before, for the same key."""
    key = _key()
    first = _ticket_of(await b.get_or_lock(key, "token-a", _LONG))
    second = _ticket_of(await b.lock(key, "token-b", _LONG))
    third = _ticket_of(await b.get_or_lock(key, "token-c", _LONG))
    assert first < second < third


@_check
async def an_older_computation_never_replaces_a_newer_value(b: Driver) -> None:
    """A store whose computation began before the stored value's is refused."""
    key = _key()
    older = _ticket_of(await b.get_or_lock(key, "token-a", _SHORT))
    assert await _eventually(b, lambda: _takes(b, key, "token-b"))
    newer = _ticket_of(await b.lock(key, "token-b", _LONG))
    stored = await b.set_and_unlock(key, _entry("new"), _LONG, "token-b", ticket=newer)
    assert stored == _entry("new")
    refused = await b.set_and_unlock(key, _entry("old"), _LONG, "token-a", ticket=older)
    assert refused is None
    assert await b.set(key, _entry("old"), _LONG, ticket=older) is None
    assert await b.get(key) == _entry("new")


@_check
async def a_refused_store_releases_its_own_lock(b: Driver) -> None:
    """A holder whose store is refused for its ticket still lets go of its lock."""
    key = _key()
    ticket = _ticket_of(await b.get_or_lock(key, "token-a", _LONG))
    newer = _ticket_of(await b.lock(key, "token-x", _LONG))
    await b.set(key, _entry("new"), _LONG, ticket=newer)
    refused = await b.set_and_unlock(
        key, _entry("old"), _LONG, "token-a", ticket=ticket
    )
    assert refused is None
    assert await b.get_or_lock(key, "token-b", _LONG) == _entry("new")
    assert await b.unlock(key, "token-a") is False


# --- Invalidation ---------------------------------------------------------------------


@_check
async def delete_drops_the_value_and_revokes_the_lock(b: Driver) -> None:
    """`delete` removes the entry and revokes a held lock: the next caller takes it."""
    key = _key()
    assert await b.get_or_lock(key, "token-a", _LONG) == "token-a"
    await b.set(key, _entry("v"), _LONG)
    await b.delete(key)
    assert await b.get(key) is None
    assert await b.get_or_lock(key, "token-b", _LONG) == "token-b"
    assert await b.unlock(key, "token-a") is False, "the revoked holder frees nothing"
    assert await b.unlock(key, "token-b") is True


@_check
async def a_store_begun_before_delete_is_refused(b: Driver) -> None:
    """Invalidation is final: a computation that began before it stores nothing."""
    key = _key()
    ticket = _ticket_of(await b.get_or_lock(key, "token-a", _LONG))
    await b.delete(key)
    stored = await b.set_and_unlock(key, _entry("old"), _LONG, "token-a", ticket=ticket)
    assert stored is None
    assert await b.get(key) is None
    assert await b.set(key, _entry("old"), _LONG, ticket=ticket) is None
    assert await b.get(key) is None
    after = _ticket_of(await b.get_or_lock(key, "token-b", _LONG))
    stored = await b.set_and_unlock(key, _entry("new"), _LONG, "token-b", ticket=after)
    assert stored == _entry("new")
    assert await b.get(key) == _entry("new")


@_check
async def delete_of_a_missing_key_does_nothing(b: Driver) -> None:
    """`delete` of a key never stored raises nothing and leaves it missing."""
    key = _key()
    await b.delete(key)
    assert await b.get(key) is None


@_check
async def keys_are_independent(b: Driver) -> None:
    """Values and locks of different keys, however similar, never interfere."""
    base = _key()
    keys = [base + s for s in ("", " ", "A", ":b", "{a}", "}{", "é", "\n", "x" * 300)]
    for i, key in enumerate(keys):
        await b.set(key, _entry(i), _LONG)
    await b.delete(keys[0])
    assert [await b.get(key) for key in keys] == [None] + [
        _entry(i) for i in range(1, len(keys))
    ]
    a, c = _key("a"), _key("b")
    assert await b.get_or_lock(a, "token-a", _LONG) == "token-a"
    assert await b.get_or_lock(c, "token-b", _LONG) == "token-b"
    await b.set(a, _entry("a"), _LONG)
    assert await b.get(c) is None
    assert await b.unlock(c, "token-a") is False
    assert await b.unlock(c, "token-b") is True


# --- Notifications (optional) ---------------------------------------------------------


@_check
async def subscribers_hear_of_stores_and_releases(b: Driver) -> None:
    """A notifier tells a subscriber of a stored entry, then of a released lock."""
    key = _key()
    listening = await b.subscribe(key)
    if listening is None:
        pytest.skip("the backend sends no notifications (Notifier): waiters poll")
    try:
        assert await b.get_or_lock(key, "token-a", _LONG) == "token-a"
        stored = await b.set_and_unlock(key, _entry("v"), _LONG, "token-a")
        assert await listening.wait(PATIENCE) == stored
        assert await b.lock(key, "token-b", _LONG) == "token-b"
        assert await b.unlock(key, "token-b") is True
        assert await listening.wait(PATIENCE) is RELEASED
    finally:
        await listening.close()


# --- Tags (optional) -------------------------------------------------------------------


def _tags_kept(b: Driver) -> None:
    """Skip on a backend without tags (no `TagBackend` methods)."""
    if not b.tags:
        pytest.skip("the backend keeps no tags (TagBackend): tags= is refused on it")


@_check
async def an_invalidated_tag_makes_its_entries_absent_and_no_other(b: Driver) -> None:
    """After invalidate_tag, the entries carrying the tag read as absent; others stay."""
    _tags_kept(b)
    tag, other = f"contract-tag-{uuid.uuid4().hex}", f"contract-tag-{uuid.uuid4().hex}"
    carrying, spared = _key("tagged"), _key("spared")
    tagged = Entry(_VALUE, 1_700_000_000.25, 0.125, (tag, other))
    for key, entry in ((carrying, tagged), (spared, Entry(1, 1.0, 0.0, (other,)))):
        assert await b.get_or_lock(key, "token", _LONG) == "token"
        assert await b.set_and_unlock(key, entry, _LONG, "token") == entry
    assert await b.get(carrying) == tagged
    await b.invalidate_tag(tag)
    assert await b.get(carrying) is None
    assert await b.get_or_lock(carrying, "next", _LONG) == "next"
    assert await b.get(spared) == Entry(1, 1.0, 0.0, (other,))


@_check
async def a_store_begun_before_its_tags_invalidation_is_refused(b: Driver) -> None:
    """A store whose ticket precedes an invalidation of one of its tags stores nothing."""
    _tags_kept(b)
    tag, key = f"contract-tag-{uuid.uuid4().hex}", _key()
    ticket = _ticket_of(await b.get_or_lock(key, "token", _LONG))
    await b.invalidate_tag(tag)
    entry = Entry(_VALUE, 1_700_000_000.25, 0.125, (tag,))
    assert await b.set_and_unlock(key, entry, _LONG, "token", ticket=ticket) is None
    assert await b.get(key) is None
    assert await b.get_or_lock(key, "next", _LONG) == "next"  # released


# --- The two contracts ----------------------------------------------------------------


def _sync_test(check: Check) -> Callable[[Any, Backend], None]:
    def test(_self: Any, backend: Backend) -> None:
        run_sync(check(SyncDriver(backend)))

    return _named(test, check)


def _async_test(check: Check) -> Callable[[Any, AsyncBackend], None]:
    def test(_self: Any, backend: AsyncBackend) -> None:
        async def main() -> None:
            try:
                await check(AsyncDriver(backend))
            finally:
                close = getattr(backend, "aclose", None)
                if callable(close):
                    await close()

        asyncio.run(main())

    return _named(test, check)


F = TypeVar("F", bound=Callable[..., None])


def _named(test: F, check: Check) -> F:
    # Not functools.wraps: pytest would follow __wrapped__ to the check's parameters.
    test.__doc__ = check.__doc__
    test.__name__ = f"test_{check.__name__}"
    test.__qualname__ = test.__name__
    return test


class BackendContract:
    """The behaviour every `Backend` must have; subclass it and define a `backend` fixture.

    The fixture returns a fresh backend for each test. Values used are JSON data, so
    byte-oriented backends with the default serializer pass. Each test works on keys
    of its own and bounds every wait, so a shared store is fine. Fencing (tickets),
    notifications and tags are optional: their tests skip on a backend without them.
    """


class AsyncBackendContract:
    """`BackendContract` for an `AsyncBackend`, through its a-prefixed methods.

    Subclass it and define a `backend` fixture returning a fresh backend. Each test
    runs in an event loop of its own (`asyncio.run`) and ends by awaiting the
    backend's ``aclose()``, if it has one, in that loop: connections made in a loop
    are closed in it. The checks are `BackendContract`'s, one copy of each; racing
    callers are tasks instead of threads.
    """


for _c in _CHECKS:
    setattr(BackendContract, f"test_{_c.__name__}", _sync_test(_c))
    setattr(AsyncBackendContract, f"test_{_c.__name__}", _async_test(_c))
del _c
