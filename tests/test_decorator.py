"""The decorator: configuration errors, helpers, methods, errors and timeouts (memory backend)."""

from __future__ import annotations

import functools
import inspect
import random
import re
import threading
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import pytest
from typing_extensions import Unpack

from stampede_guard import (
    CacheOptions,
    LockTimeoutError,
    MemoryBackend,
    StampedeStats,
    cached_stampede_safe,
)
from stampede_guard._cache_options import DEFAULTS
from stampede_guard._context import Policy
from stampede_guard._decorator import Decorator
from stampede_guard._options import validated_policy
from stampede_guard.testing import wait_for_joiners


def counting(backend: MemoryBackend, **options: Any) -> tuple[Any, list[str]]:
    calls: list[str] = []

    def f(x: str) -> str:
        calls.append(x)
        return x.upper()

    return cached_stampede_safe(key="k:{x}", backend=backend, **options)(f), calls


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("ttl", 0, "ttl=0 is out of range"),
        ("ttl", -5, "ttl=-5 is out of range"),
        ("ttl", float("inf"), "ttl=inf is out of range"),
        ("lock_timeout", float("nan"), "lock_timeout=nan is out of range"),
        ("wait_timeout", 0.0, "wait_timeout=0.0 is out of range"),
        ("base_delay", -0.1, "base_delay=-0.1 is out of range"),
        ("max_delay", 0.05, "max_delay=0.05 is shorter than base_delay=0.1"),
        ("max_retries", -1, "max_retries=-1 is negative"),
        ("on_timeout", "wait", "on_timeout='wait' is not one of 'compute'"),
        ("namespace", "a{b}", "namespace='a{b}' must be non-empty, without braces"),
    ],
)
def test_bad_numbers_and_names_fail_at_decoration_time(
    option: str, value: object, message: str
) -> None:
    """Out-of-range or unknown settings raise ValueError naming the parameter, before any call."""
    with pytest.raises(
        ValueError, match=message.replace("(", r"\(").replace("[", r"\[")
    ):
        cached_stampede_safe(**dict[str, Any]({option: value}))


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("ttl", "900"),
        ("ttl", True),
        ("max_retries", 2.5),
        ("backend", object()),
        ("metrics", 42),
        ("key", 42),
        ("namespace", 7),
    ],
)
def test_wrong_types_fail_at_decoration_time(option: str, value: object) -> None:
    """Arguments of the wrong type raise TypeError naming the parameter."""
    with pytest.raises(TypeError, match=option):
        cached_stampede_safe(**dict[str, Any]({option: value}))


def test_ttl_shorter_than_lock_timeout_warns() -> None:
    """A ttl shorter than lock_timeout is legal but suspicious: a warning, pointing at the caller."""
    with pytest.warns(
        UserWarning, match="ttl=5.0 is shorter than lock_timeout=10.0"
    ) as record:
        cached_stampede_safe(ttl=5, lock_timeout=10)
    assert record[0].filename == __file__


def test_template_naming_a_missing_parameter_fails_at_decoration_time() -> None:
    """key='weather:{town}' on f(city) is refused when decorating, listing the real parameters."""
    with pytest.raises(
        ValueError, match=r"has no parameter 'town' \(its parameters: city\)"
    ):

        @cached_stampede_safe(key="weather:{town}")
        def f(city: str) -> str:
            return city


def test_key_callable_with_the_wrong_parameters_fails_at_decoration_time() -> None:
    """A key callable that cannot take the function's arguments is refused when decorating."""
    with pytest.raises(TypeError, match="cannot take the arguments"):

        @cached_stampede_safe(key=lambda a, b: f"{a}{b}")
        def f(city: str) -> str:
            return city


def test_generator_functions_are_refused() -> None:
    """Decorating a generator function is a TypeError, not a cached, exhausted generator."""

    def gen(x: int) -> Any:
        yield x

    async def agen(x: int) -> Any:
        yield x

    with pytest.raises(TypeError, match="generator"):
        cached_stampede_safe()(gen)
    with pytest.raises(TypeError, match="generator"):
        cached_stampede_safe()(agen)


def test_value_is_cached_until_invalidated() -> None:
    """The second call is served from the cache; invalidate() makes the next call compute."""
    f, calls = counting(MemoryBackend())
    assert f("a") == "A"
    assert f("a") == "A"
    assert calls == ["a"]
    f.invalidate("a")
    assert f("a") == "A"
    assert calls == ["a", "a"]


def test_value_expires_after_ttl() -> None:
    """After ttl the entry is gone and the function runs again (controllable clock)."""
    now = [0.0]
    f, calls = counting(MemoryBackend(clock=lambda: now[0]), ttl=60, lock_timeout=10)
    f("a")
    now[0] = 59.9
    f("a")
    now[0] = 60.0
    f("a")
    assert calls == ["a", "a"]


def test_wrapper_keeps_name_doc_and_wrapped() -> None:
    """functools metadata and __wrapped__ point at the original function."""

    def original(x: int) -> int:
        """Doc."""
        return x

    wrapped = cached_stampede_safe(backend=MemoryBackend())(original)
    assert wrapped.__wrapped__ is original
    assert functools.WRAPPER_ASSIGNMENTS
    assert wrapped.__name__ == "original"  # type: ignore[attr-defined]
    assert wrapped.__doc__ == "Doc."


def test_cache_key_uses_the_template_and_namespace() -> None:
    """cache_key() returns '<namespace>:<rendered template>' with defaults applied."""

    @cached_stampede_safe(
        key="weather:{city}:{units}", namespace="v2", backend=MemoryBackend()
    )
    def weather(city: str, units: str = "metric") -> str:
        return city

    assert weather.cache_key("Paris") == "v2:weather:Paris:metric"
    assert weather.cache_key(city="Paris", units="metric") == "v2:weather:Paris:metric"


class Service:
    def __init__(self, ident: int) -> None:
        self.ident = ident
        self.calls = 0

    @cached_stampede_safe(key="svc:{self.ident}:{x}", backend=MemoryBackend())
    def lookup(self, x: int) -> int:
        self.calls += 1
        return self.ident * 100 + x


def test_methods_bind_self_for_calls_and_helpers() -> None:
    """A decorated method binds like a method: calls, cache_key and invalidate all get self."""
    a, b = Service(1), Service(2)
    assert a.lookup(5) == 105
    assert b.lookup(5) == 205
    assert a.lookup(5) == 105
    assert a.calls == 1
    assert a.lookup.cache_key(5) == "svc:1:5"
    a.lookup.invalidate(5)
    assert a.lookup(5) == 105
    assert a.calls == 2
    assert Service.lookup.cache_key(b, 5) == "svc:2:5"


def test_function_error_reaches_caller_unchanged_and_is_not_cached() -> None:
    """The same exception object propagates; the next call runs the function again."""
    attempts = []
    boom = RuntimeError("upstream 503")

    # It captures an exception object, which has no stable form: it needs a key.
    @cached_stampede_safe(key="flaky:{x}", backend=MemoryBackend())
    def flaky(x: int) -> int:
        attempts.append(x)
        if len(attempts) == 1:
            raise boom
        return x

    with pytest.raises(RuntimeError) as raised:
        flaky(1)
    assert raised.value is boom
    assert flaky(1) == 1
    assert attempts == [1, 1]


def test_none_is_cached_like_any_value() -> None:
    """A function returning None is not called again: None is a value, not a miss."""
    calls = []

    @cached_stampede_safe(backend=MemoryBackend())
    def nothing(x: int) -> None:
        calls.append(x)

    nothing(1)
    nothing(1)
    assert calls == [1]


def hold_lock(backend: MemoryBackend, key: str) -> None:
    assert backend.get_or_lock(key, "someone-else", 60) == "someone-else"


@pytest.mark.timeout(10)
def test_waiter_timeout_computes_itself_by_default() -> None:
    """With on_timeout='compute' a waiter that runs out of time computes, returns and counts a timeout."""
    backend, stats = MemoryBackend(), StampedeStats()
    f, calls = counting(
        backend, wait_timeout=0.3, base_delay=0.01, max_delay=0.05, metrics=stats
    )
    hold_lock(backend, "k:a")
    assert f("a") == "A"
    assert calls == ["a"]
    snap = stats.snapshot()
    assert (snap.timeouts, snap.computations, snap.lock_waits) == (1, 1, 1)
    assert snap.total_wait_seconds >= 0.3


@pytest.mark.timeout(10)
def test_waiter_timeout_raises_lock_timeout_error_when_asked() -> None:
    """With on_timeout='raise' the waiter raises LockTimeoutError (a TimeoutError) and never computes."""
    backend = MemoryBackend()
    f, calls = counting(
        backend, wait_timeout=0.2, base_delay=0.01, max_delay=0.05, on_timeout="raise"
    )
    hold_lock(backend, "k:a")
    with pytest.raises(LockTimeoutError, match="'k:a'") as raised:
        f("a")
    assert isinstance(raised.value, TimeoutError)
    assert calls == []


@pytest.mark.timeout(10)
def test_max_retries_gives_up_before_wait_timeout() -> None:
    """max_retries=0 gives up right after the first look, long before wait_timeout."""
    backend = MemoryBackend()
    f, _ = counting(backend, wait_timeout=30, max_retries=0, on_timeout="raise")
    hold_lock(backend, "k:a")
    with pytest.raises(LockTimeoutError):
        f("a")


@pytest.mark.timeout(10)
def test_waiter_takes_over_after_the_holder_lease_expires() -> None:
    """A lock whose holder died is taken over once its lease runs out; the waiter computes."""
    backend = MemoryBackend()
    f, calls = counting(
        backend, lock_timeout=0.2, ttl=60, base_delay=0.01, max_delay=0.05
    )
    assert backend.get_or_lock("k:a", "dead-holder", 0.2) == "dead-holder"
    assert f("a") == "A"
    assert calls == ["a"]


@pytest.mark.timeout(20)
def test_leader_failure_is_shared_with_the_callers_that_joined_it() -> None:
    """In one process, callers that arrived during a failing call get its exception: one call."""
    calls = 0
    first_started = threading.Event()
    boom = RuntimeError("upstream 503")

    @cached_stampede_safe(key="x", backend=MemoryBackend())
    def f() -> int:
        nonlocal calls
        calls += 1
        first_started.set()
        if calls == 1:
            wait_for_joiners(f, 20)  # the failure reaches every caller that joined
            raise boom
        return calls

    errors: list[BaseException] = []

    def call() -> None:
        try:
            f()
        except RuntimeError as exc:
            errors.append(exc)

    leader = threading.Thread(target=call)
    leader.start()
    first_started.wait(5)
    joiners = [threading.Thread(target=call) for _ in range(20)]
    for t in joiners:
        t.start()
    for t in [leader, *joiners]:
        t.join(15)
    assert calls == 1
    assert len(errors) == 21
    assert all(e is boom for e in errors)
    assert f() == 2, "the error was not cached: the next call computes"


@pytest.mark.timeout(20)
def test_waiters_of_a_dead_holder_wait_for_the_next_leader_instead_of_all_computing() -> (
    None
):
    """When a dead holder's lease runs out, one waiter takes over; the rest wait for it."""
    backend = MemoryBackend()
    computations = 0
    guard = threading.Lock()

    @cached_stampede_safe(
        key="k",
        backend=backend,
        ttl=60,
        lock_timeout=0.3,
        wait_timeout=5,  # longer than the dead holder's lease: nobody gives up first
        base_delay=0.01,
        max_delay=0.05,
    )
    def f() -> str:
        nonlocal computations
        with guard:
            computations += 1
        wait_for_joiners(f, 9)  # the other callers wait on this one, not on the lock
        return "v"

    assert backend.get_or_lock("k", "dead-holder", 0.3) == "dead-holder"
    barrier = threading.Barrier(10)
    results: list[str] = []

    def call() -> None:
        barrier.wait()
        results.append(f())

    threads = [threading.Thread(target=call) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert results == ["v"] * 10
    assert computations == 1


@pytest.mark.timeout(20)
def test_lease_shorter_than_the_computation_costs_two_computations_not_one_per_waiter() -> (
    None
):
    """A leader outliving its lease lets one more caller in; the other waiters still wait.

    Two decorated copies of one function on one backend stand for two processes (each
    coalesces its own callers, as a process does).
    """
    computations = 0
    guard = threading.Lock()
    backend = MemoryBackend()

    def compute() -> str:
        nonlocal computations
        with guard:
            computations += 1
        threading.Event().wait(0.5)  # under test: a computation longer than its lease
        return "v"

    copies = [
        cached_stampede_safe(
            key="k",
            backend=backend,
            ttl=60,
            lock_timeout=0.3,
            wait_timeout=5,  # waiters (and joiners) outwait the computation
            base_delay=0.01,
            max_delay=0.05,
        )(compute)
        for _ in range(2)
    ]
    barrier = threading.Barrier(20)
    results: list[str] = []

    def call(i: int) -> None:
        barrier.wait()
        results.append(copies[i % 2]())

    threads = [threading.Thread(target=call, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert results == ["v"] * 20
    assert computations == 2


@pytest.mark.parametrize("option", ["ttl", "lock_timeout", "wait_timeout", "stale_ttl"])
def test_a_duration_no_backend_can_hold_is_refused_at_decoration(option: str) -> None:
    """1e16 s overflowed Redis's expiry, so every store failed: refused, naming the limit."""
    century = 100 * 365 * 24 * 3600
    with pytest.raises(
        ValueError, match=rf"{option}=1e\+16 is out of range.*100 years"
    ):
        cached_stampede_safe(**{"ttl": century, option: 1e16})  # type: ignore[call-overload]
    cached_stampede_safe(**{"ttl": century, option: century})  # type: ignore[call-overload]


# --- The options, declared once -------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def shown(value: object) -> str:
    """How the docs write a default: ``"compute"``, ``900``, ``None``."""
    return f'"{value}"' if isinstance(value, str) else repr(value)


def declared() -> dict[str, str]:
    """Every option in declaration order with its default as the docs show it."""
    return {"backend": "None"} | {
        name: shown(DEFAULTS[name])  # type: ignore[literal-required]
        for name in CacheOptions.__annotations__
    }


def test_every_option_has_exactly_one_default() -> None:
    """DEFAULTS has each key of CacheOptions, no other, and every option is optional."""
    assert list(DEFAULTS) == list(CacheOptions.__annotations__)
    assert CacheOptions.__required_keys__ == frozenset()


@pytest.mark.parametrize(
    ("page", "header"),
    [
        ("README.md", "| Option | Default | Meaning |"),
        ("docs/quick-reference.md", "| Option | Default | What it does |"),
    ],
)
def test_option_tables_list_exactly_the_options_with_their_defaults(
    page: str, header: str
) -> None:
    """The README's and the quick reference's option tables: one row per option, in order, with its default."""
    text = (ROOT / page).read_text(encoding="utf-8")
    table = text.split(f"{header}\n|---|---|---|\n", 1)[1]
    rows = table.split("\n\n", 1)[0].splitlines()
    found = dict(
        re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", "\n".join(rows), re.MULTILINE)
    )
    assert len(found) == len(rows)
    assert list(found.items()) == list(declared().items())


def test_docstring_lists_exactly_the_options_with_their_types_and_defaults() -> None:
    """The docstring: one entry per option, in order, with CacheOptions' type and the default."""
    doc = inspect.getdoc(cached_stampede_safe) or ""
    sections = doc.split("\n\n")
    args = next(s for s in sections if s.startswith("Args:\n"))
    keyword = next(s for s in sections if s.startswith("Keyword Args:\n"))
    found: dict[str, str] = {}
    types: dict[str, str] = {}
    for section in (args, keyword):
        entries = re.split(
            r"^    (?=\w+(?: \([^\n]*\))?: )", section, flags=re.MULTILINE
        )
        for entry in entries[1:]:
            head, text = entry.split(": ", 1)
            name, _, annotation = head.partition(" (")
            default = re.search(r"Defaults\s+to\s+``([^`]*)``", text)
            assert default, f"{name}'s entry does not give its default"
            found[name] = default[1]
            if annotation:
                types[name] = annotation.removesuffix(")")
    assert list(found.items()) == list(declared().items())
    declared_types = {  # ForwardRefs: CacheOptions' module has postponed annotations
        name: getattr(hint, "__forward_arg__", hint)
        for name, hint in CacheOptions.__annotations__.items()
    }
    assert types == declared_types


def test_policy_defaults_are_the_decorators() -> None:
    """A Policy built with only the required fields is what the decorator's defaults make."""
    made = validated_policy({})
    required = {
        f.name: getattr(made, f.name) for f in fields(Policy) if f.default is MISSING
    }
    assert Policy(**required) == made


def test_misspelled_option_fails_at_decoration_time_naming_the_nearest() -> None:
    """tll=60 would be swallowed by **options and ttl left at 900: refused, with the fix."""
    with pytest.raises(TypeError, match=r"argument 'tll'; did you mean ttl=\?"):
        cached_stampede_safe(tll=60)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match=r"argument 'colour'; its options are backend,"):
        cached_stampede_safe(**dict[str, Any]({"colour": 1}))


def test_options_are_keyword_only() -> None:
    """A positional argument (a key template, say) is a TypeError, as it always was."""
    with pytest.raises(TypeError, match="positional"):
        cached_stampede_safe("k:{x}")  # type: ignore[call-overload]


def test_a_wrapper_passes_typed_options_on() -> None:
    """Code that wraps the decorator types its options with CacheOptions and passes them on."""

    def my_cache(**options: Unpack[CacheOptions]) -> Decorator:
        return cached_stampede_safe(**options)

    calls: list[int] = []

    @my_cache(key="sq:{x}", ttl=60, namespace="wrapper-test")
    def square(x: int) -> int:
        calls.append(x)
        return x * x

    assert (square(3), square(3), calls) == (9, 9, [3])
    assert square.cache_key(3) == "wrapper-test:sq:3"
    square.invalidate(3)


def test_the_library_draws_without_moving_the_global_random_state() -> None:
    """XFetch's draws (and the backoff's jitter, from the same source) leave `random` be.

    A user who seeds `random` for a reproducible run must not be thrown off by cache
    hits (and Hypothesis fails a strategy whose global random state moved meanwhile,
    as a background thread of an earlier test once made it do in CI).
    """
    draws: list[float] = []

    @cached_stampede_safe(key="e", backend=MemoryBackend(), early_refresh=True)
    def early() -> int:
        return 2

    early()
    random.seed(7)
    state = random.getstate()
    context: Any = early._context  # type: ignore[attr-defined]
    real = context.random

    def counted() -> float:
        draws.append(real())
        return draws[-1]

    object.__setattr__(context, "random", counted)
    for _ in range(50):
        assert early() == 2
    assert len(draws) == 50  # every judged hit drew once
    assert random.getstate() == state
