"""The algorithm on its own: the plan stepped by hand and driven by hypothesis."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stampede_guard import BackendError, Entry, LockTimeoutError
from stampede_guard._call import first_look
from stampede_guard._context import Context, Plan, Policy, Via
from stampede_guard._ops import (
    AwaitFlight,
    AwaitNotice,
    Bypass,
    Compute,
    Delete,
    Extend,
    Get,
    GetOrLock,
    Op,
    Set,
    SetAndUnlock,
    Spawn,
    Subscribe,
    TakeLock,
    Tick,
    Unlock,
    Unsubscribe,
)
from stampede_guard._plan import plan
from stampede_guard.backends._protocol import RELEASED
from stampede_guard.metrics import (
    BackendFailed,
    Computed,
    ComputeError,
    Event,
    Hit,
    LockAcquired,
    LockWait,
    Miss,
    Timeout,
)

ENTRY = Entry("cached", 1.0, 0.5)
# The computation the plans below ask for: key "k", apart from a cancellable caller
# (on_cancel="finish"), for at most one lease.
COMPUTE = Compute("k", apart=True, bound=10.0)


@dataclass
class FakeClock:
    now: float = 100.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Harness:
    """Steps one plan by hand with a fake clock and records its events."""

    on_timeout: Literal["compute", "raise"] = "compute"
    on_backend_error: Literal["compute", "raise"] = "compute"
    wait_timeout: float = 10.0
    max_retries: int | None = None
    clock: FakeClock = field(default_factory=FakeClock)
    events: list[Event] = field(default_factory=list)

    def context(self) -> Context:
        policy = Policy(
            ttl=900,
            lock_timeout=10,
            wait_timeout=self.wait_timeout,
            base_delay=0.1,
            max_delay=1.6,
            max_retries=self.max_retries,
            on_timeout=self.on_timeout,
            on_backend_error=self.on_backend_error,
        )
        return Context(
            policy,
            self.events.append,
            clock=self.clock,
            wall_clock=lambda: 5.0,
            new_token=lambda: "tok",
        )

    def start(self, key: str = "k") -> Plan:
        return plan(key, self.context())


def finish(gen: Plan, answer: object) -> object:
    """Send *answer* and expect the plan to return; give back (value, was a hit)."""
    with pytest.raises(StopIteration) as stop:
        gen.send(answer)
    return stop.value.value


SUB = object()  # a subscription handle, opaque to the plan


def enter_wait(
    h: Harness, gen: Plan, holder: str = "other", subscription: object = SUB
) -> Op:
    """Miss, find the lock held, subscribe, look again: return the first AwaitNotice."""
    assert next(gen) == GetOrLock("k", "tok", 10.0)
    assert gen.send(holder) == Subscribe("k")
    look = gen.send(subscription)
    assert look == GetOrLock("k", "tok", 10.0), "a look right after subscribing"
    return gen.send(holder)


def time_out_await(h: Harness, gen: Plan, op: Op, subscription: object = SUB) -> None:
    """Let an AwaitNotice run out with no notice; expect the look that follows it."""
    assert isinstance(op, AwaitNotice)
    assert op.subscription is subscription
    h.clock.now += op.seconds
    assert gen.send(None) == GetOrLock("k", "tok", 10.0)


def test_first_look_returns_a_cached_value_and_counts_a_hit() -> None:
    """Step 1: a found entry is the answer (with a Hit event); nothing found is a miss."""
    h = Harness()
    context = h.context()
    assert first_look("k", ENTRY, context) is ENTRY
    assert first_look("k", None, context) is None
    assert h.events == [Hit("k")]


def test_miss_takes_lock_computes_and_publishes_in_one_step() -> None:
    """On a miss the plan locks, computes, then stores and unlocks in one operation."""
    h = Harness()
    gen = h.start()
    assert next(gen) == GetOrLock("k", "tok", 10.0)
    assert gen.send("tok") == COMPUTE
    h.clock.now += 2.0
    op = gen.send("fresh")
    assert op == SetAndUnlock("k", Entry("fresh", 5.0, 2.0), 900.0, "tok", None)
    # The caller gets the value as the backend stored it (e.g. JSON-decoded).
    assert finish(gen, Entry(["as", "stored"], 5.0, 2.0)) == (
        ["as", "stored"],
        Via.COMPUTED,
    )
    assert h.events == [Miss("k"), LockAcquired("k"), Computed("k", 2.0)]


def test_value_stored_between_the_two_looks_is_a_hit() -> None:
    """If get_or_lock finds a value (the double-check), nothing is computed."""
    h = Harness()
    gen = h.start()
    assert next(gen) == GetOrLock("k", "tok", 10.0)
    assert finish(gen, ENTRY) == ("cached", Via.CACHE)
    assert h.events == [Hit("k")]


def test_function_error_releases_the_lock_and_propagates_unchanged() -> None:
    """The function's exception reaches the caller as is, after an Unlock; nothing is stored."""
    h = Harness()
    gen = h.start()
    next(gen)
    assert gen.send("tok") == COMPUTE
    boom = ValueError("upstream down")
    assert gen.throw(boom) == Unlock("k", "tok")
    with pytest.raises(ValueError, match="upstream down") as raised:
        gen.send(True)
    assert raised.value is boom
    assert isinstance(h.events[-1], ComputeError)
    assert h.events[-1].error is boom


def test_store_failure_releases_the_lock_and_propagates() -> None:
    """When storing fails (e.g. serialization), the lock is released and the error raised."""
    h = Harness()
    gen = h.start()
    next(gen)
    gen.send("tok")
    assert isinstance(gen.send("v"), SetAndUnlock)
    assert gen.throw(TypeError("not JSON")) == Unlock("k", "tok")
    with pytest.raises(TypeError, match="not JSON"):
        gen.send(True)


def test_unlock_failure_does_not_hide_the_original_error() -> None:
    """If releasing the lock fails too, the caller still sees the function's exception."""
    h = Harness()
    gen = h.start()
    next(gen)
    gen.send("tok")
    gen.throw(KeyError("original"))
    with pytest.raises(KeyError, match="original"):
        gen.throw(ConnectionError("redis gone"))


def test_waiter_polls_with_growing_delays_then_gets_the_value() -> None:
    """Without notices, a waiter looks after each delay (doubling, jittered, capped)."""
    h = Harness()
    gen = h.start()
    op = enter_wait(h, gen, subscription=None)
    delays = []
    for _ in range(6):
        assert isinstance(op, AwaitNotice)
        delays.append(op.seconds)
        time_out_await(h, gen, op, subscription=None)
        op = gen.send("other")
    assert 0.1 <= delays[0] <= 0.2
    assert all(b >= a - 0.1 for a, b in itertools.pairwise(delays))
    assert max(delays) <= 1.6
    assert isinstance(op, AwaitNotice)
    time_out_await(h, gen, op, subscription=None)
    assert gen.send(ENTRY) == Unsubscribe(None)
    assert finish(gen, None) == ("cached", Via.COMPUTED)
    wait = h.events[-1]
    assert isinstance(wait, LockWait)
    assert wait.outcome == "value"
    assert wait.seconds == pytest.approx(sum(delays) + op.seconds)


def test_a_subscribed_waiter_looks_for_itself_only_every_max_delay() -> None:
    """With notices coming, the waiter's own looks are max_delay apart: few commands."""
    h = Harness()
    gen = h.start()
    op = enter_wait(h, gen)
    for _ in range(4):
        assert isinstance(op, AwaitNotice)
        assert op.seconds == pytest.approx(1.6)
        time_out_await(h, gen, op)
        op = gen.send("other")


def test_a_notice_with_the_value_ends_the_wait_without_a_look() -> None:
    """When the stored entry is announced, the waiter returns it at once."""
    h = Harness()
    gen = h.start()
    op = enter_wait(h, gen)
    assert isinstance(op, AwaitNotice)
    h.clock.now += 0.01
    assert gen.send(ENTRY) == Unsubscribe(SUB)
    assert finish(gen, None) == ("cached", Via.COMPUTED)
    wait = h.events[-1]
    assert isinstance(wait, LockWait)
    assert wait.outcome == "value"
    assert wait.seconds == pytest.approx(0.01)


def test_a_value_stored_before_the_subscription_is_found_by_the_next_look() -> None:
    """The look right after subscribing catches a value stored before anyone could hear it."""
    h = Harness()
    gen = h.start()
    next(gen)
    assert gen.send("other") == Subscribe("k")
    assert gen.send(SUB) == GetOrLock("k", "tok", 10.0)
    assert gen.send(ENTRY) == Unsubscribe(SUB)
    assert finish(gen, None) == ("cached", Via.COMPUTED)


def test_a_release_notice_makes_the_waiter_look_and_take_over() -> None:
    """'released' (the holder failed) makes the waiter look at once; it takes the lock."""
    h = Harness()
    gen = h.start()
    op = enter_wait(h, gen)
    assert isinstance(op, AwaitNotice)
    assert gen.send(RELEASED) == GetOrLock("k", "tok", 10.0)
    assert gen.send("tok") == Unsubscribe(SUB)
    assert gen.send(None) == COMPUTE
    assert isinstance(gen.send("mine"), SetAndUnlock)
    assert finish(gen, Entry("mine", 5.0, 0.0)) == ("mine", Via.COMPUTED)
    assert [type(e) for e in h.events] == [Miss, LockWait, LockAcquired, Computed]


def test_patience_restarts_when_the_lock_passes_to_a_new_holder() -> None:
    """A waiter gives each holder the full wait_timeout: a new holder restarts the wait."""
    h = Harness(wait_timeout=3.0)
    gen = h.start()
    op = enter_wait(h, gen, "first", subscription=None)
    holders = iter(["first"] * 3 + ["second"] + ["second"] * 100)
    changed_at = None
    while isinstance(op, AwaitNotice):
        time_out_await(h, gen, op, subscription=None)
        holder = next(holders)
        if holder == "second" and changed_at is None:
            changed_at = h.clock.now
        op = gen.send(holder)
    assert op == Unsubscribe(None)
    assert changed_at is not None
    assert h.clock.now == pytest.approx(changed_at + 3.0)
    assert gen.send(None) == COMPUTE


def drive_to_timeout(h: Harness, gen: Plan) -> Op:
    """Answer 'locked' to every look until the plan stops waiting; return its next op."""
    op = enter_wait(h, gen)
    while isinstance(op, AwaitNotice):
        time_out_await(h, gen, op)
        op = gen.send("other")
    assert op == Unsubscribe(SUB), "every subscription is closed"
    return gen.send(None)


def test_wait_is_bounded_by_wait_timeout_not_by_a_retry_count() -> None:
    """With the defaults a waiter keeps looking until wait_timeout, then computes itself."""
    h = Harness(wait_timeout=10.0)
    gen = h.start()
    op = drive_to_timeout(h, gen)
    assert h.clock.now == pytest.approx(110.0)
    assert op == COMPUTE
    assert isinstance(gen.send("own"), Set)
    assert finish(gen, Entry("own", 5.0, 0.0)) == ("own", Via.COMPUTED)
    kinds = [type(e) for e in h.events]
    assert kinds == [Miss, LockWait, Timeout, Computed]


def test_on_timeout_raise_raises_lock_timeout_error() -> None:
    """With on_timeout='raise' the waiter raises LockTimeoutError naming the key."""
    h = Harness(on_timeout="raise", wait_timeout=3.0)
    gen = h.start("weather:Paris")
    next(gen)
    gen.send("other")
    op = gen.send(SUB)
    op = gen.send("other")
    while isinstance(op, AwaitNotice):
        h.clock.now += op.seconds
        gen.send(None)
        op = gen.send("other")
    assert op == Unsubscribe(SUB)
    with pytest.raises(LockTimeoutError, match="weather:Paris") as raised:
        gen.send(None)
    assert isinstance(raised.value, TimeoutError)
    assert raised.value.waited == pytest.approx(3.0)


def test_max_retries_caps_the_number_of_looks() -> None:
    """max_retries=5 gives up after five waits even though wait_timeout is far off."""
    h = Harness(max_retries=5, wait_timeout=1000.0)
    gen = h.start()
    op = enter_wait(h, gen)
    waits = 0
    while isinstance(op, AwaitNotice):
        waits += 1
        time_out_await(h, gen, op)
        op = gen.send("other")
    assert waits == 5
    assert op == Unsubscribe(SUB)
    assert gen.send(None) == COMPUTE


# --- Property: any sequence of backend answers keeps the lock discipline ---------

# What a backend may do instead of answering: nothing (answer), fail as backends do
# (BackendError, which the plan handles), or fail in a way the plan does not expect.
FAILURES: list[BaseException | None] = [
    *[None] * 6,
    BackendError("k", "op"),
    RuntimeError("unexpected"),
]


@dataclass
class Model:
    """Plays the backend with arbitrary answers and checks the lock discipline."""

    data: st.DataObject
    clock: FakeClock
    held: bool = False
    acquisitions: int = 0
    releases: int = 0
    timed_out: bool = False
    backend_failed: bool = False  # a BackendError was raised to the plan
    subscriptions: int = 0
    computed_without_lock: int = 0
    computed_under_lock: int = 0
    failed_ops: list[type[Op]] = field(default_factory=list)
    ops: list[Op] = field(default_factory=list)

    def answer(self, op: Op) -> Any:  # noqa: C901 - one case per operation
        self.ops.append(op)
        failure = self.data.draw(st.sampled_from(FAILURES))
        match op:
            case Get():
                self.raise_if(failure, op)
                return self.data.draw(st.sampled_from([None, ENTRY]))
            case TakeLock():
                self.raise_if(failure, op)
                holder = self.data.draw(st.sampled_from(["tok", "other"]))
                if holder == "tok":
                    assert not self.held, "took a lock while already holding it"
                    self.held, self.acquisitions = True, self.acquisitions + 1
                return holder
            case GetOrLock():
                self.raise_if(failure, op)
                answer = self.data.draw(
                    st.sampled_from(
                        ["tok", "other", "other", "other", "another", ENTRY]
                    )
                )
                if answer == "tok":
                    assert not self.held, "took a lock while already holding it"
                    self.held, self.acquisitions = True, self.acquisitions + 1
                return answer
            case Compute():
                if self.held:
                    self.computed_under_lock += 1
                else:
                    # The documented fall-backs: after waiting out wait_timeout, or
                    # without a backend that failed.
                    assert self.timed_out or self.backend_failed, (
                        "computed without the lock outside a fall-back"
                    )
                    self.computed_without_lock += 1
                if self.data.draw(st.sampled_from([False, False, True])):
                    raise RuntimeError("function failed")
                return "computed"
            case SetAndUnlock() | Unlock():
                assert self.held, "released a lock it did not hold"
                # A failed release leaves the lock to its lease; the plan may try again.
                self.raise_if(self.store_failure(op, failure), op)
                self.held, self.releases = False, self.releases + 1
                if isinstance(op, Unlock):
                    return None if op.apart else True
                return self.data.draw(st.sampled_from([op.entry, op.entry, None]))
            case Set(entry=entry):
                assert not self.held
                self.raise_if(self.store_failure(op, failure), op)
                return self.data.draw(st.sampled_from([entry, entry, None]))
            case Subscribe():
                assert not self.held, "subscribed while holding the lock"
                self.raise_if(failure, op)
                self.subscriptions += 1
                return SUB if self.data.draw(st.booleans()) else None
            case AwaitNotice(seconds=seconds):
                assert not self.held, "waited while holding the lock"
                assert seconds >= 0
                self.clock.now += seconds
                return self.data.draw(st.sampled_from([None, None, RELEASED, ENTRY]))
            case Unsubscribe():
                self.subscriptions -= 1
                return None
            case (
                AwaitFlight() | Extend() | Tick() | Bypass() | Delete() | Spawn()
            ):  # pragma: no cover - the assertion is the test
                raise AssertionError(f"a plan after a miss never asks for {op}")

    def store_failure(
        self, op: Op, failure: BaseException | None
    ) -> BaseException | None:
        """A store fails more often than a look, so that its fall-back is reached."""
        if isinstance(op, Set | SetAndUnlock) and self.data.draw(st.booleans()):
            return BackendError("k", "set")
        return failure

    def raise_if(self, failure: BaseException | None, op: Op) -> None:
        if failure is not None:
            self.failed_ops.append(type(op))
            self.backend_failed |= isinstance(failure, BackendError)
            raise failure


def branches_taken(  # noqa: C901 - one branch per way a call can end
    model: Model, events: list[Event], outcome: object, harness: Harness
) -> set[str]:
    """Name the ways this run ended, to check that the examples reach every one."""
    kinds = {type(e) for e in events}
    taken: set[str] = set()
    failed_backend = BackendFailed in kinds
    if isinstance(outcome, BackendError):
        taken.add("backend error raised (on_backend_error='raise')")
    if failed_backend and not model.computed_under_lock and model.computed_without_lock:
        if model.failed_ops[:1] == [GetOrLock] and len(model.ops) == 2:
            taken.add("backend down at the first look: computed without it")
        else:
            taken.add("backend down while waiting: computed without it")
    if failed_backend and any(op in {Set, SetAndUnlock} for op in model.failed_ops):
        taken.add("store failed: the value served, not cached")
    if Timeout in kinds:
        taken.add(
            "waited out: raised"
            if isinstance(outcome, LockTimeoutError)
            else "waited out: computed without the lock"
        )
    if ComputeError in kinds:
        taken.add("the function failed: lock released, error raised")
    if isinstance(outcome, tuple):
        via = outcome[1]
        if via is Via.CACHE:
            taken.add("stored between the two looks: a hit")
        if via is Via.PRIVATE:
            taken.add("store refused: the value kept private")
    for event in events:
        if isinstance(event, LockWait) and event.outcome in {"value", "lock"}:
            taken.add(f"waited, then got the {event.outcome}")
    del harness
    return taken


EVERY_BRANCH = {
    "backend error raised (on_backend_error='raise')",
    "backend down at the first look: computed without it",
    "backend down while waiting: computed without it",
    "store failed: the value served, not cached",
    "waited out: raised",
    "waited out: computed without the lock",
    "the function failed: lock released, error raised",
    "stored between the two looks: a hit",
    "store refused: the value kept private",
    "waited, then got the value",
    "waited, then got the lock",
}


def test_plan_keeps_lock_discipline_under_any_backend_answers() -> None:
    """Compute only under the lock (or in a fall-back), release every lock once, never sleep holding it; every fall-back is reached."""
    reached: set[str] = set()

    # Derandomized: the same examples every run, so the coverage check cannot flake.
    @settings(max_examples=400, deadline=None, database=None, derandomize=True)
    @given(
        data=st.data(),
        on_timeout=st.sampled_from(["compute", "raise"]),
        on_backend_error=st.sampled_from(["compute", "compute", "raise"]),
        max_retries=st.none() | st.integers(0, 2),
    )
    def one_run(
        data: st.DataObject,
        on_timeout: Literal["compute", "raise"],
        on_backend_error: Literal["compute", "raise"],
        max_retries: int | None,
    ) -> None:
        h = Harness(
            on_timeout=on_timeout,
            on_backend_error=on_backend_error,
            wait_timeout=2.0,
            max_retries=max_retries,
        )
        model = Model(data, h.clock)
        outcome = drive(h, model)
        check_discipline(model, h, outcome, on_timeout)
        reached.update(branches_taken(model, h.events, outcome, h))

    one_run()
    assert reached == EVERY_BRANCH, f"never reached: {EVERY_BRANCH - reached}"


def drive(h: Harness, model: Model) -> object:
    """Run one plan against *model*; return its result or the exception it raised."""
    gen = h.start()
    result: object = None
    error: BaseException | None = None
    for _ in range(10_000):
        try:
            op = gen.send(result) if error is None else gen.throw(error)
        except StopIteration as stop:
            return stop.value
        except (BackendError, RuntimeError, LockTimeoutError) as exc:
            return exc
        result, error = None, None
        model.timed_out = any(isinstance(e, Timeout) for e in h.events)
        try:
            result = model.answer(op)
        except (BackendError, RuntimeError) as exc:
            error = exc
    pytest.fail("the plan did not finish")


def check_discipline(
    model: Model, h: Harness, outcome: object, on_timeout: str
) -> None:
    last_release_failed = (
        isinstance(model.ops[-1], SetAndUnlock | Unlock) and model.held
    )
    assert not model.held or last_release_failed, "a lock was left held"
    assert model.releases + last_release_failed == model.acquisitions
    assert model.computed_without_lock + model.computed_under_lock <= 1, (
        "computed twice"
    )
    assert model.subscriptions == 0, "a subscription was left open"
    if isinstance(outcome, LockTimeoutError):
        assert on_timeout == "raise"
    elif not isinstance(outcome, BaseException):
        assert outcome in {
            ("cached", Via.CACHE),
            ("cached", Via.COMPUTED),
            ("computed", Via.COMPUTED),
            ("computed", Via.PRIVATE),
        }
    requests = sum(isinstance(e, (Hit, Miss)) for e in h.events)
    # A call that ends normally emitted exactly one Hit or Miss; one cut short by a
    # backend failure before it knew which emitted none.
    assert requests == 1 or (requests == 0 and bool(model.failed_ops))
