"""BoundedStore: the bounded LRU under MemoryBackend and the near cache, on a fake clock.

No server. A reference model (a plain list in recency order) checks random sequences
of puts, gets, pops, sweeps and clock advances; real threads check that the bounds
and the weight's bookkeeping survive concurrent use.
"""

from __future__ import annotations

import random
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from stampede_guard._bounded import BoundedStore, check_maxbytes, check_maxsize

pytestmark = pytest.mark.timeout(60)


class FakeClock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(
    maxsize: int | None = 3,
    *,
    maxbytes: int | None = None,
    evicted: list[str] | None = None,
) -> tuple[BoundedStore[str, str], FakeClock]:
    """Return a store on a fake clock (at 0), reporting evictions into *evicted*."""
    clock = FakeClock()
    store: BoundedStore[str, str] = BoundedStore(
        maxsize,
        maxbytes=maxbytes,
        clock=clock,
        on_evict=None if evicted is None else evicted.append,
    )
    return store, clock


def keys_of(store: BoundedStore[str, str]) -> list[str]:
    """Return the keys held, least recently used first (live or not)."""
    return list(store._data)


# --- Least recently used -------------------------------------------------------------


def test_the_least_recently_put_entry_goes_first() -> None:
    """A full store drops its oldest entry for a new one."""
    evicted: list[str] = []
    store, _ = make(3, evicted=evicted)
    for key in "abcd":
        assert store.put(key, key.upper(), 100)
    assert keys_of(store) == ["b", "c", "d"]
    assert store.get("a") is None
    assert evicted == ["a"]
    assert store.evictions == 1


def test_a_get_marks_the_entry_used_so_it_outlives_older_ones() -> None:
    """Reading the oldest entry makes the next-oldest the one evicted."""
    store, _ = make(3)
    for key in "abc":
        store.put(key, key.upper(), 100)
    assert store.get("a") == "A"
    store.put("d", "D", 100)
    assert keys_of(store) == ["c", "a", "d"]
    assert store.get("b") is None
    assert [store.get(key) for key in "acd"] == ["A", "C", "D"]


def test_a_peek_does_not_mark_the_entry_used() -> None:
    """peek returns the value and deadline but leaves the recency order alone."""
    store, _ = make(2)
    store.put("a", "A", 7.5)
    store.put("b", "B", 100)
    assert store.peek("a") == ("A", 7.5)
    assert store.peek("zz") is None
    store.put("c", "C", 100)
    assert keys_of(store) == ["b", "c"]


def test_putting_a_held_key_again_replaces_it_and_evicts_nothing() -> None:
    """A new value for a held key takes its place (most recent) without making room."""
    evicted: list[str] = []
    store, clock = make(3, evicted=evicted)
    for key in "abc":
        store.put(key, key.upper(), 100)
    store.put("a", "A2", 5)
    assert len(store) == 3
    assert evicted == []
    assert keys_of(store) == ["b", "c", "a"]
    assert store.peek("a") == ("A2", 5)
    clock.advance(5)
    assert store.get("a") is None  # the new deadline, not the old one


def test_the_size_bound_is_exact_and_keeps_the_newest() -> None:
    """After 100 puts into a store of 10, it holds exactly the last 10."""
    evicted: list[str] = []
    store, _ = make(10, evicted=evicted)
    for n in range(100):
        store.put(f"k{n}", str(n), 100)
        assert len(store) == min(n + 1, 10)
    assert keys_of(store) == [f"k{n}" for n in range(90, 100)]
    assert evicted == [f"k{n}" for n in range(90)]
    assert store.evictions == 90


def test_an_unbounded_store_keeps_everything() -> None:
    """maxsize=None (MemoryBackend's default) never evicts."""
    store, _ = make(None)
    for n in range(1000):
        store.put(f"k{n}", str(n), 100)
    assert len(store) == 1000
    assert store.evictions == 0


# --- Deadlines -----------------------------------------------------------------------


def test_an_entry_is_served_before_its_deadline_and_never_at_or_after_it() -> None:
    """get answers up to just before the deadline; at the deadline the entry is gone."""
    store, clock = make(3)
    store.put("a", "A", 10.0)
    clock.now = 9.999
    assert store.get("a") == "A"
    clock.now = 10.0
    assert store.get("a") is None
    assert len(store) == 0  # removed by the get that found it expired
    clock.now = 5.0  # a clock that went back does not bring it back
    assert store.get("a") is None


def test_an_entry_put_already_expired_is_never_served() -> None:
    """A deadline in the past (or now) is an entry nobody gets."""
    store, clock = make(3)
    clock.now = 50
    store.put("past", "P", 49)
    store.put("now", "N", 50)
    assert store.get("past") is None
    assert store.get("now") is None


def test_expired_entries_dropped_to_make_room_are_not_reported_as_evictions() -> None:
    """on_evict hears only of live entries pushed out; an expired one was done anyway."""
    evicted: list[str] = []
    store, clock = make(2, evicted=evicted)
    store.put("short", "S", 5)
    store.put("long", "L", 100)
    clock.now = 6
    store.put("c", "C", 100)  # pushes out "short", which had expired
    assert keys_of(store) == ["long", "c"]
    assert evicted == []
    assert store.evictions == 0
    store.put("d", "D", 100)  # pushes out "long", live
    assert evicted == ["long"]
    assert store.evictions == 1


# --- Weight --------------------------------------------------------------------------


def test_the_weight_bound_evicts_least_recent_entries_until_the_new_one_fits() -> None:
    """maxbytes=100: 40 + 40 + 30 pushes out the first 40 (70 held)."""
    evicted: list[str] = []
    store, _ = make(None, maxbytes=100, evicted=evicted)
    assert store.put("a", "A", 100, 40)
    assert store.put("b", "B", 100, 40)
    assert store.weight == 80
    assert store.put("c", "C", 100, 30)
    assert keys_of(store) == ["b", "c"]
    assert store.weight == 70
    assert evicted == ["a"]
    assert store.put("d", "D", 100, 100)  # exactly maxbytes: fits, alone
    assert keys_of(store) == ["d"]
    assert store.weight == 100
    assert evicted == ["a", "b", "c"]


def test_an_entry_heavier_than_maxbytes_is_refused_and_displaces_nothing() -> None:
    """put returns False for weight > maxbytes; every other entry stays, none evicted."""
    evicted: list[str] = []
    store, _ = make(5, maxbytes=100, evicted=evicted)
    store.put("a", "A", 100, 30)
    store.put("b", "B", 100, 30)
    assert not store.put("huge", "H", 100, 101)
    assert store.get("huge") is None
    assert keys_of(store) == ["a", "b"]
    assert store.weight == 60
    assert evicted == []
    assert store.evictions == 0


def test_a_refused_heavy_value_still_drops_the_keys_older_value() -> None:
    """A key's old value is not kept once a newer one was offered, even one refused."""
    store, _ = make(5, maxbytes=100)
    store.put("a", "old", 100, 10)
    store.put("b", "B", 100, 10)
    assert not store.put("a", "new but huge", 100, 500)
    assert store.get("a") is None
    assert keys_of(store) == ["b"]
    assert store.weight == 10


def test_replacing_a_value_accounts_for_the_new_weight_only() -> None:
    """A key put again counts its new weight, not both."""
    store, _ = make(5, maxbytes=100)
    store.put("a", "A", 100, 60)
    store.put("a", "A2", 100, 70)
    assert store.weight == 70
    assert len(store) == 1


def test_both_bounds_apply_together() -> None:
    """maxsize and maxbytes each bound the store; whichever binds first evicts."""
    store, _ = make(2, maxbytes=100)
    store.put("a", "A", 100, 10)
    store.put("b", "B", 100, 10)
    store.put("c", "C", 100, 10)  # the count binds
    assert keys_of(store) == ["b", "c"]
    store.put("d", "D", 100, 95)  # the weight binds: both others go
    assert keys_of(store) == ["d"]
    assert store.weight == 95


# --- Removal -------------------------------------------------------------------------


def test_pop_removes_the_entry_and_returns_its_value_live_or_not() -> None:
    """pop returns the value even past its deadline, frees its weight, reports no eviction."""
    evicted: list[str] = []
    store, clock = make(3, maxbytes=100, evicted=evicted)
    store.put("a", "A", 5, 20)
    store.put("b", "B", 100, 30)
    clock.now = 10
    assert store.pop("a") == "A"
    assert store.pop("a") is None
    assert store.pop("never") is None
    assert store.pop("b") == "B"
    assert len(store) == 0
    assert store.weight == 0
    assert evicted == []


def test_clear_empties_the_store_and_returns_how_many_it_held() -> None:
    """clear drops live and expired entries alike, and reports no eviction."""
    evicted: list[str] = []
    store, clock = make(5, maxbytes=100, evicted=evicted)
    store.put("a", "A", 5, 10)
    store.put("b", "B", 100, 10)
    clock.now = 10
    assert store.clear() == 2
    assert len(store) == 0
    assert store.weight == 0
    assert store.clear() == 0
    assert evicted == []


def test_sweep_removes_the_expired_entries_only() -> None:
    """sweep drops what reached its deadline, returns the count and frees the weight."""
    store, clock = make(5, maxbytes=100)
    store.put("a", "A", 5, 10)
    store.put("b", "B", 10, 20)
    store.put("c", "C", 100, 30)
    clock.now = 10
    assert store.sweep() == 2
    assert keys_of(store) == ["c"]
    assert store.weight == 30
    assert store.sweep() == 0


def test_reset_starts_over_even_if_the_mutex_was_left_held() -> None:
    """In a forked child the parent's mutex may be held for ever: reset replaces it."""
    store, _ = make(3, maxbytes=100)
    store.put("a", "A", 100, 10)
    assert store._mutex.acquire(blocking=False)  # as a thread of the parent held it
    store.reset()
    assert len(store) == 0
    assert store.weight == 0
    assert store.put("b", "B", 100, 10)  # would block on the old mutex
    assert store.get("b") == "B"


def test_on_evict_runs_outside_the_mutex_so_it_may_use_the_store() -> None:
    """A hook that reads and removes from the store does not deadlock the put."""
    seen: list[tuple[str, int]] = []
    clock = FakeClock()
    store: BoundedStore[str, str] = BoundedStore(2, clock=clock)

    def hook(key: str) -> None:
        store.pop("nothing")  # takes the mutex
        seen.append((key, len(store)))

    store._on_evict = hook
    for key in "abc":
        store.put(key, key, 100)
    assert seen == [("a", 2)]


class RacingClock(FakeClock):
    """A clock that runs *meanwhile* once, the next time a get looks at it.

    A get reads the entry without the mutex, then the clock: whatever *meanwhile*
    does lands exactly in that gap, as another thread's call could.
    """

    def __init__(self, now: float = 0.0) -> None:
        super().__init__(now)
        self.meanwhile: list[object] = []

    def __call__(self) -> float:
        while self.meanwhile:
            action = self.meanwhile.pop()
            assert callable(action)
            action()
        return self.now


def test_an_expired_read_racing_a_new_put_does_not_remove_the_new_value() -> None:
    """A get that found the old entry expired leaves the value put meanwhile alone."""
    clock = RacingClock()
    store: BoundedStore[str, str] = BoundedStore(3, maxbytes=100, clock=clock)
    store.put("a", "old", 5, 10)
    clock.now = 6
    clock.meanwhile.append(lambda: store.put("a", "new", 100, 30))
    assert store.get("a") is None  # it saw the old, expired entry
    assert store.get("a") == "new"
    assert store.weight == 30


def test_a_hit_racing_a_removal_returns_what_it_saw_and_brings_nothing_back() -> None:
    """A get whose entry is popped meanwhile returns the live value it read, no error."""
    clock = RacingClock()
    store: BoundedStore[str, str] = BoundedStore(3, clock=clock)
    store.put("a", "A", 100)
    clock.meanwhile.append(lambda: store.pop("a"))
    assert store.get("a") == "A"
    assert len(store) == 0
    assert store.get("a") is None


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "10"])
def test_the_bounds_refuse_anything_but_a_positive_whole_number(bad: object) -> None:
    """maxsize and maxbytes: a whole number >= 1; the message names the owner."""
    with pytest.raises(ValueError, match=r"NearCache: maxsize="):
        check_maxsize(bad, "NearCache")
    with pytest.raises(ValueError, match=r"NearCache: maxbytes="):
        check_maxbytes(bad, "NearCache")


def test_none_is_a_bound_only_where_allowed() -> None:
    """maxbytes=None means no limit; maxsize=None only where the owner allows it."""
    assert check_maxbytes(None, "X") is None
    assert check_maxsize(None, "X", allow_none=True) is None
    assert check_maxsize(7, "X") == 7
    with pytest.raises(ValueError, match="maxsize=None"):
        check_maxsize(None, "X")


# --- Admission (the doorkeeper) -----------------------------------------------------


def make_admitting(
    maxsize: int | None = 2, *, maxbytes: int | None = None
) -> tuple[BoundedStore[str, str], list[str]]:
    """Return a store with admission on a fake clock, and the keys it evicts."""
    evicted: list[str] = []
    store: BoundedStore[str, str] = BoundedStore(
        maxsize,
        maxbytes=maxbytes,
        clock=FakeClock(),
        on_evict=evicted.append,
        admission=True,
    )
    return store, evicted


def test_with_admission_a_store_with_room_takes_a_new_key_at_once() -> None:
    """The doorkeeper only acts once the store is full."""
    store, evicted = make_admitting(2)
    assert store.put("a", "A", 100)
    assert store.put("b", "B", 100)
    assert keys_of(store) == ["a", "b"]
    assert evicted == []


def test_with_admission_a_new_key_gets_into_a_full_store_on_its_second_put() -> None:
    """Once full, a new key's first put is refused (nothing evicted), its second taken."""
    store, evicted = make_admitting(2)
    store.put("a", "A", 100)
    store.put("b", "B", 100)
    assert not store.put("c", "C1", 100)
    assert keys_of(store) == ["a", "b"]
    assert evicted == []
    assert store.put("c", "C2", 100)
    assert keys_of(store) == ["b", "c"]
    assert store.get("c") == "C2"
    assert evicted == ["a"]
    assert not store.put("d", "D", 100)  # c's second chance is used up: d starts over


def test_with_admission_a_held_key_is_always_replaced() -> None:
    """A new value of a key already held needs no second try, even when full."""
    store, _ = make_admitting(2)
    store.put("a", "A", 100)
    store.put("b", "B", 100)
    assert store.put("a", "A2", 100)
    assert store.get("a") == "A2"


def test_with_admission_the_weight_bound_counts_as_full() -> None:
    """A new key that would overflow maxbytes waits for its second try too."""
    store, _ = make_admitting(None, maxbytes=100)
    store.put("a", "A", 100, 60)
    assert not store.put("b", "B", 100, 50)
    assert keys_of(store) == ["a"]
    assert store.put("b", "B", 100, 50)
    assert keys_of(store) == ["b"]


def test_the_doorkeeper_remembers_at_most_maxsize_refused_keys() -> None:
    """Past maxsize refused keys, the oldest one refused is forgotten: it starts over."""
    store, _ = make_admitting(2)
    store.put("a", "A", 100)
    store.put("b", "B", 100)
    for key in ("x", "y", "z"):  # x is forgotten when z is remembered
        assert not store.put(key, key, 100)
    assert not store.put("x", "x", 100)  # a first try again (and y is forgotten)
    assert store.put("z", "z", 100)  # still remembered
    assert "z" in keys_of(store)


def test_reset_forgets_the_refused_keys_too() -> None:
    """A forked child's store starts over without its parent's doorkeeper."""
    store, _ = make_admitting(1)
    store.put("a", "A", 100)
    assert not store.put("b", "B", 100)
    store.reset()
    store.put("a", "A", 100)
    assert not store.put("b", "B", 100)  # a first try again


# --- Against a reference model -------------------------------------------------------


@dataclass
class Model:
    """The store's contract, written the slow, obvious way: a list in recency order."""

    maxsize: int | None
    maxbytes: int | None
    admission: bool = False
    entries: list[tuple[str, int, float, int]] = field(default_factory=list)
    evicted: list[str] = field(default_factory=list)
    seen: list[str] = field(default_factory=list)  # the doorkeeper, oldest first

    def _index(self, key: str) -> int | None:
        for n, entry in enumerate(self.entries):
            if entry[0] == key:
                return n
        return None

    @property
    def weight(self) -> int:
        return sum(entry[3] for entry in self.entries)

    def get(self, key: str, now: float) -> int | None:
        n = self._index(key)
        if n is None:
            return None
        entry = self.entries.pop(n)
        if entry[2] <= now:
            return None
        self.entries.append(entry)
        return entry[1]

    def pop(self, key: str) -> int | None:
        n = self._index(key)
        return None if n is None else self.entries.pop(n)[1]

    def put(
        self, key: str, value: int, deadline: float, weight: int, now: float
    ) -> bool:
        if self.maxbytes is not None and weight > self.maxbytes:
            self.pop(key)
            return False
        if self.pop(key) is None and self.admission and not self._admits(key, weight):
            return False
        self.entries.append((key, value, deadline, weight))
        while (self.maxsize is not None and len(self.entries) > self.maxsize) or (
            self.maxbytes is not None and self.weight > self.maxbytes
        ):
            gone = self.entries.pop(0)
            if gone[2] > now:
                self.evicted.append(gone[0])
        return True

    def _admits(self, key: str, weight: int) -> bool:
        full = (self.maxsize is not None and len(self.entries) >= self.maxsize) or (
            self.maxbytes is not None and self.weight + weight > self.maxbytes
        )
        if not full:
            return True
        if key in self.seen:
            self.seen.remove(key)
            return True
        self.seen.append(key)
        if len(self.seen) > (self.maxsize or len(self.entries)):
            self.seen.pop(0)
        return False

    def sweep(self, now: float) -> int:
        live = [entry for entry in self.entries if entry[2] > now]
        swept = len(self.entries) - len(live)
        self.entries = live
        return swept


class StoreAgainstModel(RuleBasedStateMachine):
    """Random puts, gets, pops, sweeps and clock advances: the store acts as the model."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.evicted: list[str] = []
        self.store: BoundedStore[str, int] = BoundedStore(1)
        self.model = Model(1, None)
        self.counter = 0

    @initialize(
        maxsize=st.one_of(st.none(), st.integers(1, 6)),
        maxbytes=st.one_of(st.none(), st.integers(1, 40)),
        admission=st.booleans(),
    )
    def setup(self, maxsize: int | None, maxbytes: int | None, admission: bool) -> None:
        self.store = BoundedStore(
            maxsize,
            maxbytes=maxbytes,
            clock=self.clock,
            on_evict=self.evicted.append,
            admission=admission,
        )
        self.model = Model(maxsize, maxbytes, admission)

    keys = st.sampled_from("abcdefgh")

    @rule(
        key=keys,
        ttl=st.sampled_from([0.0, 0.5, 1.0, 3.0, 50.0]),
        weight=st.integers(0, 45),
    )
    def put(self, key: str, ttl: float, weight: int) -> None:
        self.counter += 1
        now = self.clock()
        fits = self.store.put(key, self.counter, now + ttl, weight)
        assert fits == self.model.put(key, self.counter, now + ttl, weight, now)

    @rule(key=keys)
    def get(self, key: str) -> None:
        assert self.store.get(key) == self.model.get(key, self.clock())

    @rule(key=keys)
    def pop(self, key: str) -> None:
        assert self.store.pop(key) == self.model.pop(key)

    @rule(seconds=st.sampled_from([0.25, 0.5, 1.0, 2.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @precondition(lambda self: len(self.model.entries) > 0)
    @rule()
    def sweep(self) -> None:
        assert self.store.sweep() == self.model.sweep(self.clock())

    @invariant()
    def holds_what_the_model_holds_in_the_same_order(self) -> None:
        held = [(k, item[0], item[1], item[2]) for k, item in self.store._data.items()]
        assert held == self.model.entries
        assert self.store.weight == self.model.weight
        assert len(self.store) == len(self.model.entries)

    @invariant()
    def stays_within_its_bounds(self) -> None:
        if self.model.maxsize is not None:
            assert len(self.store) <= self.model.maxsize
        if self.model.maxbytes is not None:
            assert self.store.weight <= self.model.maxbytes

    @invariant()
    def reports_the_same_evictions(self) -> None:
        assert self.evicted == self.model.evicted
        assert self.store.evictions == len(self.model.evicted)


StoreAgainstModel.TestCase.settings = settings(
    max_examples=200, stateful_step_count=60, deadline=None
)
test_the_store_behaves_as_its_reference_model = StoreAgainstModel.TestCase


# --- Threads -------------------------------------------------------------------------


@pytest.fixture
def busy_switching() -> Iterator[None]:
    """Switch threads every few bytecodes instead of every 5 ms: real interleavings."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(previous)


MAXSIZE, MAXBYTES = 8, 200


class Hammer:
    """Random put/get/pop/sweep on one store from many threads; what went wrong."""

    def __init__(self, *, admission: bool) -> None:
        self.evicted: list[str] = []
        self._evicted_lock = threading.Lock()
        # The real clock, with deadlines short enough that entries expire under load.
        self.store: BoundedStore[str, str] = BoundedStore(
            MAXSIZE, maxbytes=MAXBYTES, on_evict=self._on_evict, admission=admission
        )
        self.keys = [f"k{n}" for n in range(24)]
        self.errors: list[BaseException] = []
        self.wrong: list[tuple[str, str]] = []  # a value put for another key
        self.over: list[tuple[int, int]] = []  # a bound seen exceeded
        self.start = threading.Barrier(8)

    def _on_evict(self, key: str) -> None:
        with self._evicted_lock:
            self.evicted.append(key)

    def run(self, seed: int) -> None:
        try:
            self.start.wait(10)
            rng = random.Random(seed)
            for n in range(20_000):
                self.step(rng, f"{seed}:{n}")
        except BaseException as exc:
            self.errors.append(exc)

    def step(self, rng: random.Random, tag: str) -> None:
        store, key, roll = self.store, rng.choice(self.keys), rng.random()
        if roll < 0.45:
            deadline = store._clock() + rng.choice([0.0005, 0.002, 5.0])
            store.put(key, f"{key}={tag}", deadline, rng.randint(0, 60))
        elif roll < 0.85:
            found = store.get(key)
            if found is not None and not found.startswith(f"{key}="):
                self.wrong.append((key, found))
        elif roll < 0.97:
            store.pop(key)
        else:
            store.sweep()
        # Looked at under the mutex: inside a put the store holds the new entry
        # before it drops the old ones, one more than maxsize.
        with store._mutex:
            size, weight = len(store), store.weight
        if size > MAXSIZE or weight > MAXBYTES:
            self.over.append((size, weight))


@pytest.mark.usefixtures("busy_switching")
@pytest.mark.parametrize("admission", [False, True], ids=["lru", "doorkeeper"])
def test_eight_threads_hammering_a_small_store_keep_its_bounds_and_bookkeeping(
    admission: bool,
) -> None:
    """Concurrent put/get/pop/sweep: no exception, bounds hold, weight adds up, values right."""
    hammer = Hammer(admission=admission)
    threads = [threading.Thread(target=hammer.run, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(50)
    assert not any(thread.is_alive() for thread in threads)
    assert hammer.errors == []
    assert hammer.wrong == []
    assert hammer.over == []
    store = hammer.store
    assert len(store) <= MAXSIZE
    assert store.weight <= MAXBYTES
    assert store.weight == sum(item[2] for item in store._data.values())
    assert store.evictions == len(hammer.evicted)
