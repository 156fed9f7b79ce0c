"""A conformance suite for `stampede_guard.Backend` implementations, run by pytest.

Subclass `BackendContract` in your tests and define a ``backend`` fixture returning a
fresh backend; every test of the contract then runs against it:

```python
import pytest
from stampede_guard.testing import BackendContract


class TestMyBackend(BackendContract):
    @pytest.fixture
    def backend(self) -> MyBackend:
        return MyBackend(...)
```

Values used are JSON data, so byte-oriented backends with the default serializer pass.
Each test works on keys of its own and bounds every wait, so a shared store is fine.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable

import pytest

from stampede_guard.backends._protocol import Backend, Entry

__all__ = ["BackendContract"]

_LONG = 60.0  # seconds: a value or lock that must outlive the test
_SHORT = 0.05  # seconds: a value or lock the test waits out
_PATIENCE = 5.0  # seconds: the most a test waits for something to expire
_THREADS = 50


def _key(label: str = "k") -> str:
    return f"contract:{label}:{uuid.uuid4().hex}"


def _entry(value: object = None) -> Entry:
    # Binary fractions, so that every backend's float encoding round-trips them exactly.
    return Entry(value, created_at=1_700_000_000.25, compute_seconds=0.125)


_VALUE = {"name": "Zürich", "ids": [1, 2, 3], "ratio": 0.5, "ok": True, "none": None}


def _eventually(condition: Callable[[], bool]) -> bool:
    """Poll *condition* until it holds or `_PATIENCE` runs out; return its last result."""
    deadline = time.monotonic() + _PATIENCE
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _ticket_of(claim: object) -> int:
    """Return the ticket of a look, or skip: fencing is optional in the contract."""
    ticket = getattr(claim, "ticket", None)
    if ticket is None:
        pytest.skip("the backend gives no tickets (Claim): its stores are not fenced")
    return int(ticket)


class BackendContract:
    """The behaviour every backend must have; subclass it and define a `backend` fixture."""

    def test_get_of_missing_key_returns_none(self, backend: Backend) -> None:
        """A key never stored reads as None."""
        assert backend.get(_key()) is None

    def test_set_then_get_returns_equal_entry(self, backend: Backend) -> None:
        """A stored entry reads back with equal value, created_at and compute_seconds."""
        key, entry = _key(), _entry(_VALUE)
        assert backend.set(key, entry, _LONG) == entry
        assert backend.get(key) == entry

    def test_set_returns_the_entry_as_readers_get_it(self, backend: Backend) -> None:
        """What set returns equals what get then reads, even if encoding changed it."""
        key = _key()
        stored = backend.set(key, _entry({"pair": (1, 2)}), _LONG)
        assert backend.get(key) == stored

    def test_set_replaces_previous_entry(self, backend: Backend) -> None:
        """A second set of one key replaces the first entry."""
        key = _key()
        backend.set(key, _entry("old"), _LONG)
        backend.set(key, _entry("new"), _LONG)
        assert backend.get(key) == _entry("new")

    def test_none_is_storable_and_distinct_from_a_miss(self, backend: Backend) -> None:
        """An entry whose value is None reads back as an Entry, not as a miss."""
        key = _key()
        backend.set(key, _entry(None), _LONG)
        assert backend.get(key) == _entry(None)
        assert backend.get_or_lock(key, "token-a", _LONG) == _entry(None)

    def test_entry_expires_after_its_ttl(self, backend: Backend) -> None:
        """An entry with a short ttl disappears; one with a long ttl stays."""
        short, long = _key("short"), _key("long")
        backend.set(short, _entry("short"), _SHORT)
        backend.set(long, _entry("long"), _LONG)
        assert _eventually(lambda: backend.get(short) is None)
        assert backend.get(long) == _entry("long")

    def test_expired_entry_lets_get_or_lock_take_the_lock(
        self, backend: Backend
    ) -> None:
        """Once an entry expires, get_or_lock takes the free lock instead of returning it."""
        key = _key()
        backend.set(key, _entry("v"), _SHORT)
        assert _eventually(lambda: backend.get(key) is None)
        assert backend.get_or_lock(key, "token-a", _LONG) == "token-a"

    def test_get_or_lock_takes_a_free_lock(self, backend: Backend) -> None:
        """get_or_lock on a key with no value and no lock takes it: returns our token."""
        assert backend.get_or_lock(_key(), "token-a", _LONG) == "token-a"

    def test_get_or_lock_returns_the_holders_token_while_lock_is_held(
        self, backend: Backend
    ) -> None:
        """get_or_lock with another token returns the holder's token and takes nothing."""
        key = _key()
        assert backend.get_or_lock(key, "token-a", _LONG) == "token-a"
        assert backend.get_or_lock(key, "token-b", _LONG) == "token-a"

    def test_get_or_lock_returns_entry_when_lock_is_free(
        self, backend: Backend
    ) -> None:
        """get_or_lock returns the stored entry (and takes no lock) when a value exists."""
        key = _key()
        backend.set(key, _entry("v"), _LONG)
        assert backend.get_or_lock(key, "token-a", _LONG) == _entry("v")
        assert backend.unlock(key, "token-a") is False

    def test_get_or_lock_returns_entry_while_lock_is_held(
        self, backend: Backend
    ) -> None:
        """A waiter's get_or_lock returns the entry even if the lock is still held."""
        key = _key()
        assert backend.get_or_lock(key, "token-a", _LONG) == "token-a"
        backend.set(key, _entry("v"), _LONG)
        assert backend.get_or_lock(key, "token-b", _LONG) == _entry("v")

    def test_expired_lock_can_be_taken_by_another_token(self, backend: Backend) -> None:
        """A lock whose lock_ttl ran out is free for another token, and then held by it."""
        key = _key()
        assert backend.get_or_lock(key, "token-a", _SHORT) == "token-a"
        assert _eventually(
            lambda: backend.get_or_lock(key, "token-b", _LONG) == "token-b"
        )
        assert backend.get_or_lock(key, "token-a", _LONG) == "token-b"
        assert backend.unlock(key, "token-a") is False
        assert backend.unlock(key, "token-b") is True

    def test_lock_takes_a_free_lock_even_with_a_value_stored(
        self, backend: Backend
    ) -> None:
        """`lock` ignores the stored value: it takes a free lock and returns our token."""
        key = _key()
        backend.set(key, _entry("v"), _LONG)
        assert backend.lock(key, "token-a", _LONG) == "token-a"
        assert backend.get_or_lock(key, "token-b", _LONG) == _entry("v")
        assert backend.lock(key, "token-b", _LONG) == "token-a"
        assert backend.unlock(key, "token-a") is True

    def test_extend_renews_only_the_holders_lease(self, backend: Backend) -> None:
        """Extending by the holder keeps a short lock alive; by anyone else, nothing."""
        key = _key()
        assert backend.get_or_lock(key, "token-a", _SHORT) == "token-a"
        assert backend.extend(key, "token-b", _LONG) is False
        assert backend.extend(key, "token-a", _LONG) is True
        time.sleep(_SHORT * 2)
        assert backend.lock(key, "token-b", _LONG) == "token-a", "the lease was renewed"
        assert backend.unlock(key, "token-a") is True
        assert backend.extend(key, "token-a", _LONG) is False, (
            "a free lock is not renewed"
        )

    def test_unlock_with_right_token_frees_the_lock(self, backend: Backend) -> None:
        """`unlock` by the holder returns True and lets another token take the lock."""
        key = _key()
        assert backend.get_or_lock(key, "token-a", _LONG) == "token-a"
        assert backend.unlock(key, "token-a") is True
        assert backend.get_or_lock(key, "token-b", _LONG) == "token-b"

    def test_unlock_with_wrong_token_keeps_the_lock(self, backend: Backend) -> None:
        """`unlock` with another token returns False and the lock stays held."""
        key = _key()
        assert backend.get_or_lock(key, "token-a", _LONG) == "token-a"
        assert backend.unlock(key, "token-b") is False
        assert backend.get_or_lock(key, "token-c", _LONG) == "token-a"
        assert backend.unlock(key, "token-a") is True

    def test_unlock_of_a_free_lock_returns_false(self, backend: Backend) -> None:
        """`unlock` of a key nobody locked returns False."""
        assert backend.unlock(_key(), "token-a") is False

    def test_set_and_unlock_stores_and_releases_own_lock(
        self, backend: Backend
    ) -> None:
        """set_and_unlock by the holder stores the entry, returns it and frees the lock."""
        key = _key()
        assert backend.get_or_lock(key, "token-a", _LONG) == "token-a"
        assert backend.set_and_unlock(key, _entry("v"), _LONG, "token-a") == _entry("v")
        assert backend.get(key) == _entry("v")
        assert backend.unlock(key, "token-a") is False
        backend.delete(key)
        assert backend.get_or_lock(key, "token-b", _LONG) == "token-b"

    def test_set_and_unlock_by_a_non_holder_stores_nothing(
        self, backend: Backend
    ) -> None:
        """A fenced write: while another token holds the lock, nothing is stored."""
        key = _key()
        assert backend.get_or_lock(key, "token-a", _LONG) == "token-a"
        assert backend.set_and_unlock(key, _entry("v"), _LONG, "token-b") == _entry("v")
        assert backend.get(key) is None
        assert backend.unlock(key, "token-a") is True

    def test_set_and_unlock_with_a_free_lock_stores(self, backend: Backend) -> None:
        """A holder whose lease ran out with nobody taking over still stores its value."""
        key = _key()
        assert backend.set_and_unlock(key, _entry("v"), _LONG, "token-a") == _entry("v")
        assert backend.get(key) == _entry("v")

    def test_set_and_unlock_after_lock_expiry_keeps_the_new_holders_lock(
        self, backend: Backend
    ) -> None:
        """A holder whose lock passed to a successor neither stores nor frees that lock."""
        key = _key()
        assert backend.get_or_lock(key, "token-a", _SHORT) == "token-a"
        assert _eventually(
            lambda: backend.get_or_lock(key, "token-b", _LONG) == "token-b"
        )
        assert backend.set_and_unlock(key, _entry("late"), _LONG, "token-a") == _entry(
            "late"
        )
        assert backend.get(key) is None, "the late value must not overwrite the new one"
        assert backend.unlock(key, "token-b") is True

    def test_delete_drops_the_value_and_revokes_the_lock(
        self, backend: Backend
    ) -> None:
        """`delete` removes the entry and revokes a held lock: the next caller takes it."""
        key = _key()
        assert backend.get_or_lock(key, "token-a", _LONG) == "token-a"
        backend.set(key, _entry("v"), _LONG)
        backend.delete(key)
        assert backend.get(key) is None
        assert backend.get_or_lock(key, "token-b", _LONG) == "token-b"
        assert backend.unlock(key, "token-a") is False, (
            "the revoked holder frees nothing"
        )
        assert backend.unlock(key, "token-b") is True

    def test_tickets_of_successive_looks_increase(self, backend: Backend) -> None:
        """Each look's ticket is later than the one before, for the same key."""
        key = _key()
        first = _ticket_of(backend.get_or_lock(key, "token-a", _LONG))
        second = _ticket_of(backend.lock(key, "token-b", _LONG))
        third = _ticket_of(backend.get_or_lock(key, "token-c", _LONG))
        assert first < second < third

    def test_a_store_begun_before_delete_is_refused(self, backend: Backend) -> None:
        """Invalidation is final: a computation that began before it stores nothing."""
        key = _key()
        claim = backend.get_or_lock(key, "token-a", _LONG)
        ticket = _ticket_of(claim)
        backend.delete(key)
        stored = backend.set_and_unlock(
            key, _entry("old"), _LONG, "token-a", ticket=ticket
        )
        assert stored is None
        assert backend.get(key) is None
        assert backend.set(key, _entry("old"), _LONG, ticket=ticket) is None
        assert backend.get(key) is None
        after = _ticket_of(backend.get_or_lock(key, "token-b", _LONG))
        assert backend.set_and_unlock(
            key, _entry("new"), _LONG, "token-b", ticket=after
        ) == _entry("new")
        assert backend.get(key) == _entry("new")

    def test_an_older_computation_never_replaces_a_newer_value(
        self, backend: Backend
    ) -> None:
        """A store whose computation began before the stored value's is refused."""
        key = _key()
        older = _ticket_of(backend.get_or_lock(key, "token-a", _SHORT))
        assert _eventually(
            lambda: backend.get_or_lock(key, "token-b", _LONG) == "token-b"
        )
        newer = _ticket_of(backend.lock(key, "token-b", _LONG))
        assert backend.set_and_unlock(
            key, _entry("new"), _LONG, "token-b", ticket=newer
        ) == _entry("new")
        assert (
            backend.set_and_unlock(key, _entry("old"), _LONG, "token-a", ticket=older)
            is None
        )
        assert backend.set(key, _entry("old"), _LONG, ticket=older) is None
        assert backend.get(key) == _entry("new")

    def test_a_refused_store_releases_its_own_lock(self, backend: Backend) -> None:
        """A holder whose store is refused for its ticket still lets go of its lock."""
        key = _key()
        ticket = _ticket_of(backend.get_or_lock(key, "token-a", _LONG))
        newer = _ticket_of(backend.lock(key, "token-x", _LONG))
        backend.set(key, _entry("new"), _LONG, ticket=newer)
        assert (
            backend.set_and_unlock(key, _entry("old"), _LONG, "token-a", ticket=ticket)
            is None
        )
        assert backend.get_or_lock(key, "token-b", _LONG) == _entry("new")
        assert backend.unlock(key, "token-a") is False

    def test_delete_of_a_missing_key_does_nothing(self, backend: Backend) -> None:
        """`delete` of a key never stored raises nothing and leaves it missing."""
        key = _key()
        backend.delete(key)
        assert backend.get(key) is None

    def test_keys_are_independent(self, backend: Backend) -> None:
        """Values and locks of different keys, however similar, never interfere."""
        base = _key()
        keys = [
            base + s for s in ("", " ", "A", ":b", "{a}", "}{", "é", "\n", "x" * 300)
        ]
        for i, key in enumerate(keys):
            backend.set(key, _entry(i), _LONG)
        backend.delete(keys[0])
        assert [backend.get(key) for key in keys] == [None] + [
            _entry(i) for i in range(1, len(keys))
        ]
        a, b = _key("a"), _key("b")
        assert backend.get_or_lock(a, "token-a", _LONG) == "token-a"
        assert backend.get_or_lock(b, "token-b", _LONG) == "token-b"
        backend.set(a, _entry("a"), _LONG)
        assert backend.get(b) is None
        assert backend.unlock(b, "token-a") is False
        assert backend.unlock(b, "token-b") is True

    def test_only_one_of_many_threads_takes_a_free_lock(self, backend: Backend) -> None:
        """Threads racing get_or_lock on one free key: all agree on one winner."""
        key = _key()
        barrier = threading.Barrier(_THREADS)
        results: list[Entry | str | BaseException] = []
        guard = threading.Lock()

        def race(token: str) -> None:
            try:
                barrier.wait(timeout=_PATIENCE)
                claim: Entry | str | BaseException = backend.get_or_lock(
                    key, token, _LONG
                )
            except BaseException as exc:  # noqa: BLE001 - reported by the assertion
                claim = exc
            with guard:
                results.append(claim)

        threads = [
            threading.Thread(target=race, args=(f"token-{i}",)) for i in range(_THREADS)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=_PATIENCE * 2)
        assert len(results) == _THREADS
        winners = set(results)
        assert len(winners) == 1, winners
        assert winners <= {f"token-{i}" for i in range(_THREADS)}
