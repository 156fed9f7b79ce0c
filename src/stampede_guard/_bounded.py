"""A bounded in-process store: least recently used out first, each entry with a deadline.

Serves `MemoryBackend` (its entries) and the near cache of the Redis backends. One
job: keep at most *maxsize* entries (and, optionally, at most *maxbytes* of weight),
dropping the least recently used one when a new one would not fit, and never return
an entry past its deadline.

Eviction is LRU. Admission, optional (*admission*): once the store is full, a new
key gets in on its second ``put`` within the last *maxsize* new keys; one seen once
is only remembered (a "doorkeeper"). So a scan of keys read once does not flush the
hot ones. W-TinyLFU's frequency sketch would do slightly better but counts every
access, and in Python that count costs more than the hit it decides about (a hit here
is a dict read and a ``move_to_end``); the doorkeeper costs nothing on a hit. On a
Zipf(1.0) trace of 1,000,000 requests over 100,000 keys, 10,000 entries:
73.5 % hits as plain LRU (cachetools' ``LRUCache`` alike), 77.5 % with the
doorkeeper, 78.0 % with a frequency count on misses, 81 % for the best static set
(``benchmarks/near.py``). Admission suits a cache in front of another (a near
cache: a refused key costs one more read from Redis); never a store whose refusal
costs a computation (`MemoryBackend` does not use it).

A hit takes no lock: ``OrderedDict``'s ``get`` and ``move_to_end`` are each atomic
under the GIL, and a ``move_to_end`` that loses a race with a removal is simply
skipped. Inserts and removals take the mutex, so the size bound holds exactly.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["BoundedStore", "check_maxbytes", "check_maxsize"]

K = TypeVar("K")
V = TypeVar("V")


def check_maxsize(
    maxsize: object, owner: str, *, allow_none: bool = False
) -> int | None:
    """Return *maxsize* if it is a positive int (or None where allowed), else raise."""
    if maxsize is None and allow_none:
        return None
    if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
        unbounded = " or None for no limit" if allow_none else ""
        msg = f"{owner}: maxsize={maxsize!r} must be a whole number of entries >= 1{unbounded}"
        raise ValueError(msg)
    return maxsize


def check_maxbytes(maxbytes: object, owner: str) -> int | None:
    """Return *maxbytes* if it is None or a positive int, else raise ValueError."""
    if maxbytes is None:
        return None
    if isinstance(maxbytes, bool) or not isinstance(maxbytes, int) or maxbytes < 1:
        msg = f"{owner}: maxbytes={maxbytes!r} must be a whole number of bytes >= 1, or None for no limit"
        raise ValueError(msg)
    return maxbytes


class BoundedStore(Generic[K, V]):
    """At most *maxsize* entries (and *maxbytes* of weight), least recently used out first.

    Args:
        maxsize: Most entries held; None for no limit.
        maxbytes: Most total weight held (see `put`); None for no limit.
        clock: Monotonic seconds; deadlines are on this clock.
        on_evict: Called with the key of each entry dropped to make room (not of
            expired or removed ones), outside the mutex.
        admission: Once full, admit a new key only on its second `put` (see the
            module).
    """

    __slots__ = (
        "_bytes",
        "_clock",
        "_data",
        "_get",
        "_mutex",
        "_on_evict",
        "_seen",
        "evictions",
        "maxbytes",
        "maxsize",
    )

    def __init__(
        self,
        maxsize: int | None,
        *,
        maxbytes: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_evict: Callable[[K], None] | None = None,
        admission: bool = False,
    ) -> None:
        self.maxsize = maxsize
        self.maxbytes = maxbytes
        self._clock = clock
        self._on_evict = on_evict
        self._mutex = threading.Lock()
        # key -> (value, deadline, weight)
        self._data: OrderedDict[K, tuple[V, float, int]] = OrderedDict()
        self._bytes = 0
        self.evictions = 0
        self._get = self.reader()
        # Keys refused once, remembered for their second chance (the doorkeeper).
        self._seen: OrderedDict[K, None] | None = OrderedDict() if admission else None

    def __len__(self) -> int:
        return len(self._data)

    @property
    def weight(self) -> int:
        """The total weight held (0 unless entries were put with one)."""
        return self._bytes

    def reader(
        self, heard: list[float] | None = None, silence: float = 0.0
    ) -> Callable[[K], V | None]:
        """Return `get` as a closure: the hot path (cheaper than the bound method).

        With *heard*, a one-item list holding the time (on this store's clock) the
        store was last confirmed current, nothing is returned once that is more than
        *silence* seconds ago (see ``_near``: a listener that could not run).
        """
        find, used, clock, expired = (
            self._data.get,
            self._data.move_to_end,
            self._clock,
            self._remove_if,
        )
        checked = [0.0] if heard is None else heard
        limit = float("inf") if heard is None else silence

        def get(key: K) -> V | None:
            item = find(key)
            if item is None:
                return None
            now = clock()
            if item[1] <= now:
                expired(key, item)
                return None
            if now - checked[0] > limit:
                return None
            try:  # noqa: SIM105 - suppress() would cost more than the rest of a hit
                used(key)
            except KeyError:  # removed meanwhile: this read still saw a live value
                pass
            return item[0]

        return get

    def get(self, key: K) -> V | None:
        """Return the live value of *key* (and mark it used), or None."""
        return self._get(key)

    def peek(self, key: K) -> tuple[V, float] | None:
        """Return *key*'s value and deadline, live or not, without marking it used."""
        item = self._data.get(key)
        return None if item is None else (item[0], item[1])

    def put(self, key: K, value: V, deadline: float, weight: int = 0) -> bool:
        """Hold *value* for *key* until *deadline*; return whether it is held.

        Evicts least recently used entries until the new one fits. An entry heavier
        than *maxbytes* on its own is not held (and displaces nothing), nor, with
        *admission*, a new key's first try while the store is full.
        """
        if self.maxbytes is not None and weight > self.maxbytes:
            self.pop(key)
            return False
        evicted: list[K] = []
        with self._mutex:
            old = self._data.pop(key, None)
            if old is not None:
                self._bytes -= old[2]
            elif self._seen is not None and not self._admits(key, weight):
                return False
            self._data[key] = (value, deadline, weight)
            self._bytes += weight
            self._shrink(evicted)
        self._evicted(evicted)
        return True

    def _admits(self, key: K, weight: int) -> bool:
        """Whether a new *key* gets in: while there is room, or on its second try."""
        seen = self._seen
        assert seen is not None  # noqa: S101 - only called with admission
        full = (self.maxsize is not None and len(self._data) >= self.maxsize) or (
            self.maxbytes is not None and self._bytes + weight > self.maxbytes
        )
        if not full:
            return True
        if key in seen:  # its second try
            del seen[key]
            return True
        seen[key] = None
        if len(seen) > (self.maxsize or len(self._data)):
            seen.popitem(last=False)
        return False

    def _shrink(self, evicted: list[K]) -> None:
        data, maxsize, maxbytes = self._data, self.maxsize, self.maxbytes
        now: float | None = None
        while (maxsize is not None and len(data) > maxsize) or (
            maxbytes is not None and self._bytes > maxbytes
        ):
            key, (_, deadline, weight) = data.popitem(last=False)
            self._bytes -= weight
            if now is None:
                now = self._clock()
            if deadline > now:  # an expired entry was not evicted: it was done
                evicted.append(key)
        self.evictions += len(evicted)

    def _evicted(self, keys: list[K]) -> None:
        if self._on_evict is not None:
            for key in keys:
                self._on_evict(key)

    def pop(self, key: K) -> V | None:
        """Remove *key*; return its value (live or not), or None."""
        with self._mutex:
            item = self._data.pop(key, None)
            if item is None:
                return None
            self._bytes -= item[2]
            return item[0]

    def _remove_if(self, key: K, item: tuple[V, float, int]) -> None:
        """Remove *key* if it still holds *item* (not a newer value put meanwhile)."""
        with self._mutex:
            if self._data.get(key) is item:
                del self._data[key]
                self._bytes -= item[2]

    def clear(self) -> int:
        """Remove everything; return how many entries there were."""
        with self._mutex:
            count = len(self._data)
            self._data.clear()
            self._bytes = 0
            return count

    def sweep(self) -> int:
        """Remove the expired entries; return how many."""
        now = self._clock()
        with self._mutex:
            # Readers move entries to the end without the mutex: iterating the dict
            # itself in Python code could meet one ("OrderedDict mutated during
            # iteration", which failed the store that swept). list() copies it in one
            # C call, which no other thread interrupts under the GIL.
            items = list(self._data.items())
            dead = [k for k, item in items if item[1] <= now]
            for key in dead:
                self._bytes -= self._data.pop(key)[2]
            return len(dead)

    def reset(self) -> None:
        """Start over in a forked child: the parent's mutex may be held for ever."""
        self._mutex = threading.Lock()
        self._data.clear()
        self._bytes = 0
        if self._seen is not None:
            self._seen.clear()
