"""Default keys tell distinct functions apart: closures, lambdas, nested and redefined functions."""

from __future__ import annotations

import functools
import importlib.util
import itertools
import subprocess
import sys
import textwrap
import threading
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stampede_guard import MemoryBackend, cached_stampede_safe

REFUSAL = r"key=.*namespace="


def make_pricer(rate: float, backend: MemoryBackend) -> Callable[[float], float]:
    @cached_stampede_safe(backend=backend)
    def price(amount: float) -> float:
        return amount * rate

    return price


def test_closures_of_one_factory_keep_their_own_values() -> None:
    """make_pricer(0.9) and make_pricer(0.8) on one backend: each serves its own price."""
    backend = MemoryBackend()
    eur, gbp = make_pricer(0.9, backend), make_pricer(0.8, backend)
    assert eur(100) == 90.0
    assert gbp(100) == 80.0
    assert eur(100) == 90.0


def test_two_lambdas_on_one_backend_keep_their_own_values() -> None:
    """Two lambdas share the qualname '<lambda>' but not their cache entries."""
    backend = MemoryBackend()
    double = cached_stampede_safe(backend=backend)(lambda x: 2 * x)
    triple = cached_stampede_safe(backend=backend)(lambda x: 3 * x)
    assert double(5) == 10
    assert triple(5) == 15


def test_equal_closures_share_a_key() -> None:
    """One factory called twice with equal captured values gives one key: the identity is stable."""
    first, second = make_pricer(0.9, MemoryBackend()), make_pricer(0.9, MemoryBackend())
    assert first is not second
    assert first.cache_key(100) == second.cache_key(100)  # type: ignore[attr-defined]


def _exec_module(name: str, source: str, path: str = "") -> dict[str, Any]:
    """Run *source* as module *name* (registered while it runs, as an import does)."""
    module = types.ModuleType(name)
    sys.modules[name] = module
    try:
        code = compile(textwrap.dedent(source), path or f"{name}.py", "exec")
        exec(code, vars(module))  # noqa: S102
    finally:
        del sys.modules[name]
    return vars(module)


PINNED = """
import functools
from stampede_guard import MemoryBackend, cached_stampede_safe

def traced(fn):
    state = object()
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        assert state is not None
        return fn(*args, **kwargs)
    return wrapper

@cached_stampede_safe(backend=MemoryBackend())
def price(amount, currency="GBP"):
    return amount

class Base:
    def find(self, ident):
        return ident

class Repo(Base):
    @cached_stampede_safe(backend=MemoryBackend())
    def find(self, ident):
        return super().find(ident)

@cached_stampede_safe(backend=MemoryBackend())
@traced
def total(amount):
    return amount

in_euros = cached_stampede_safe(backend=MemoryBackend())(
    functools.partial(price, currency="EUR")
)
"""


def test_module_level_functions_and_methods_keep_their_keys() -> None:
    """The default keys of module-level functions, methods and their partials are unchanged by this release."""
    module = _exec_module("billing", PINNED)
    assert module["price"].cache_key(100) == (
        "billing:price:d79cec2b82735b85cc7f62cd0afae47f"
    )
    # A method using super() captures __class__; a decorator's wrapper captures its
    # own state: neither is part of the key, as before.
    assert module["Repo"]().find.cache_key(7) == (
        "billing:Repo.find:853a3f802e991f3faa358b7b9324bec3"
    )
    assert module["total"].cache_key(3) == (
        "billing:total:98430407b6a6ae0f16dded1c70f8b9e7"
    )
    assert module["in_euros"].cache_key(100) == (
        "billing:price:partial-f29dde080f20799b:44c53e5c4afb5f2f713904f983371dcd"
    )


def test_moving_a_nested_function_keeps_its_key() -> None:
    """Lines added above a lambda or a nested function, or another file path, keep its key."""
    source = """
    from stampede_guard import MemoryBackend, cached_stampede_safe
    def make(rate):
        return cached_stampede_safe(backend=MemoryBackend())(lambda x: x * rate)
    made = make(0.5)
    """
    here = _exec_module("moved", source)["made"]
    moved = _exec_module(
        "moved", "\n\n# a comment\n" + textwrap.dedent(source), "/srv/new/moved.py"
    )
    assert here.cache_key(2) == moved["made"].cache_key(2)


def test_a_recursive_nested_function_has_a_stable_key() -> None:
    """A nested function calling itself (its cell empty while decorating) is keyed and served."""

    def make(offset: int) -> Any:
        @cached_stampede_safe(backend=MemoryBackend())
        def fib(n: int) -> int:
            return n + offset if n < 2 else fib(n - 1) + fib(n - 2)

        return fib

    assert make(0)(10) == 55
    assert make(0).cache_key(10) == make(0).cache_key(10)
    assert make(0).cache_key(10) != make(1).cache_key(10)


def test_a_captured_value_without_a_stable_form_needs_a_key_or_a_namespace() -> None:
    """A closure over a lock is refused by name; with namespace= or key= it is accepted."""

    def make(key: str | None = None, namespace: str | None = None) -> Any:
        lock = threading.Lock()

        @cached_stampede_safe(backend=MemoryBackend(), key=key, namespace=namespace)
        def read(x: int) -> int:
            with lock:
                return x

        return read

    with pytest.raises(TypeError, match=rf"captures 'lock', a _thread.lock.*{REFUSAL}"):
        make()
    assert make(namespace="reads")(3) == 3
    assert make(key="read:{x}").cache_key(3) == "read:3"


def test_a_variable_assigned_after_decoration_needs_a_key_or_a_namespace() -> None:
    """A captured variable that is still empty when decorating (mutual recursion) is refused."""

    def make() -> Any:
        @cached_stampede_safe(backend=MemoryBackend())
        def even(n: int) -> bool:
            return n == 0 or odd(n - 1)

        def odd(n: int) -> bool:
            return n != 0 and even(n - 1)

        return even

    with pytest.raises(
        TypeError, match=rf"captures 'odd', which is not yet assigned.*{REFUSAL}"
    ):
        make()


def double(x: int) -> int:
    return 2 * x


def triple(x: int) -> int:
    return 3 * x


def test_captured_functions_are_told_apart() -> None:
    """A closure over a function is keyed by that function: by name, or by its definition."""
    backend = MemoryBackend()

    def applying(fn: Callable[[int], int]) -> Any:
        @cached_stampede_safe(backend=backend)
        def apply(x: int) -> int:
            return fn(x)

        return apply

    made = [applying(double), applying(triple), applying(lambda x: 4 * x)]
    made.append(applying(lambda x: 5 * x))
    assert [f(1) for f in made] == [2, 3, 4, 5]
    assert len({f.cache_key(1) for f in made}) == 4
    assert applying(double).cache_key(1) == made[0].cache_key(1)


def test_an_object_bound_method_captured_needs_a_key_or_a_namespace() -> None:
    """A closure over a method bound to an object is as unknown as the object."""

    def make(values: list[int]) -> Any:
        append = values.append

        @cached_stampede_safe(backend=MemoryBackend())
        def add(x: int) -> int:
            append(x)
            return x

        return add

    with pytest.raises(TypeError, match=rf"method bound to an object.*{REFUSAL}"):
        make([])


PLAIN_RATE = """
from stampede_guard import MemoryBackend, cached_stampede_safe

@cached_stampede_safe(backend=MemoryBackend())
def rate(x):
    return x * 0.9
"""


REDEFINED = """
from stampede_guard import MemoryBackend, cached_stampede_safe
BACKEND = MemoryBackend()

@cached_stampede_safe(backend=BACKEND)
def rate(x):
    return x * 0.9
first = rate

@cached_stampede_safe(backend=BACKEND)
def rate(x):
    return x * 0.8
second = rate

@cached_stampede_safe(backend=BACKEND)
def rate(x):
    return x * 0.9
third = rate
"""


def test_a_redefined_module_function_gets_a_key_of_its_own() -> None:
    """Three 'def rate' in one module, all decorated, keep their own values; the first keeps its key."""
    module = _exec_module("redefined", REDEFINED)
    first, second, third = module["first"], module["second"], module["third"]
    alone = _exec_module("redefined", PLAIN_RATE)["rate"]
    assert first.cache_key(100) == alone.cache_key(100)
    assert (first(100), second(100), third(100)) == (90.0, 80.0, 90.0)
    assert len({first.cache_key(1), second.cache_key(1), third.cache_key(1)}) == 3


def test_same_named_methods_of_two_classes_keep_their_own_values() -> None:
    """A.total and B.total are different qualnames; a class defined again is told apart too."""
    source = """
    from stampede_guard import MemoryBackend, cached_stampede_safe
    BACKEND = MemoryBackend()
    class A:
        @cached_stampede_safe(backend=BACKEND)
        def total(self, x):
            return x + 1
    class B:
        @cached_stampede_safe(backend=BACKEND)
        def total(self, x):
            return x + 2
    FirstA = A
    class A:
        @cached_stampede_safe(backend=BACKEND)
        def total(self, x):
            return x + 3
    """
    module = _exec_module("shop", source)
    assert [module[c]().total(0) for c in ("FirstA", "B", "A")] == [1, 2, 3]
    assert [module[c]().total(0) for c in ("A", "B", "FirstA")] == [3, 2, 1]


def test_namespaced_partials_of_one_function_never_share_a_key() -> None:
    """Under one namespace, partials with different bound arguments keep their own values."""
    backend = MemoryBackend()

    def price(amount: float, rate: float) -> float:
        return amount * rate

    eur = cached_stampede_safe(backend=backend, namespace="v2")(
        functools.partial(price, rate=0.9)
    )
    gbp = cached_stampede_safe(backend=backend, namespace="v2")(
        functools.partial(price, rate=0.8)
    )
    assert (eur(100), gbp(100)) == (90.0, 80.0)


CROSS_PROCESS = """
from stampede_guard import MemoryBackend, cached_stampede_safe

def make(tags, rate):
    @cached_stampede_safe(backend=MemoryBackend())
    def price(amount, region="eu"):
        return amount * rate if region in {"eu", "uk", "us"} else tags
    return price

def keys():
    closure = make(frozenset({"a", "b", "c", "d"}), 0.9)
    square = cached_stampede_safe(backend=MemoryBackend())(lambda x: x * x)
    return [closure.cache_key(100), square.cache_key(3)]
"""


@pytest.mark.timeout(60)
def test_default_keys_of_closures_and_lambdas_are_the_same_in_every_process(
    tmp_path: Path,
) -> None:
    """A closure over a frozenset, and a lambda, get one key in every process and hash seed."""
    (tmp_path / "pricing.py").write_text(CROSS_PROCESS)
    spec = importlib.util.spec_from_file_location("pricing", tmp_path / "pricing.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    here = repr(module.keys())
    assert "#" in here
    for seed in ("1", "2", "3"):
        run = subprocess.run(
            [sys.executable, "-c", "import pricing; print(pricing.keys())"],
            env={"PYTHONHASHSEED": seed, "PATH": "", "PYTHONPATH": str(tmp_path)},
            capture_output=True,
            text=True,
            check=True,
            timeout=50,
        )
        assert run.stdout.strip() == here


# The property test builds a module from random pieces, each defining functions of one
# shape through `track`, which decorates them with default keys on one backend.

constants = st.sampled_from(
    [0, 1, -1, 0.8, 0.9, 1.0, "gbp", "eur", (1, 2), (2, 1), None, True]
)
BODIES = ("(c, x)", "(x, c)", "[c, x]", "{'c': c, 'x': x}")


@st.composite
def pieces(draw: st.DrawFn) -> str:
    """Draw the source of one shape of function, decorated through `track`."""
    c, other = draw(constants), draw(constants)
    body = draw(st.sampled_from(BODIES))
    name = draw(st.sampled_from(["make", "build"]))  # factories are redefined too
    shapes = {
        "closures": f"""
            def {name}(c):
                @track
                def inner(x):
                    return {body}
                return inner
            {name}({c!r})
            {name}({other!r})
            {name}({c!r})
            PAIRS.append((len(RESULTS) - 3, len(RESULTS) - 1))
            """,
        "lambda closure": f"(lambda c: track(lambda x: {body}))({c!r})",
        "two lambdas on a line": f"track(lambda x: ({c!r}, x)); track(lambda x: ({other!r}, x))",
        "nested": f"""
            def {name}():
                @track
                def inner(x):
                    c = {c!r}
                    return {body}
                return inner
            {name}()
            """,
        "redefined": f"""
            @track
            def again(x):
                c = {c!r}
                return {body}
            """,
        "methods": f"""
            class {draw(st.sampled_from(["A", "B"]))}:
                @track_method
                def total(self, x):
                    c = {c!r}
                    return {body}
            """,
        "partial": f"track(functools.partial(base, c={c!r}))",
        "callable object": f"track(Rate({c!r}), refused=True)",
        "closure over a lock": f"""
            def {name}(c):
                lock = threading.Lock()
                @track_refused
                def inner(x):
                    with lock:
                        return {body}
                return inner
            {name}({c!r})
            """,
        "closure over a function": f"""
            def {name}(fn):
                @track
                def inner(x):
                    return ("applied", fn(x))
                return inner
            {name}(lambda x: ({c!r}, x))
            {name}(twice)
            """,
        "recursive": f"""
            def {name}(c):
                @track
                def inner(x):
                    return {body} if x <= 0 else inner(x - 1)
                return inner
            {name}({c!r})
            """,
    }
    return textwrap.dedent(shapes[draw(st.sampled_from(sorted(shapes)))])


PRELUDE = """
import functools
import threading

def base(x, c):
    return ("base", c, x)

def twice(x):
    return ("twice", x, x)

class Rate:
    def __init__(self, c):
        self.c = c
    def __call__(self, x):
        return (self.c, x)
"""


class Record:
    """One function a generated module decorated, or tried to."""

    def __init__(self, fn: Any, args: tuple[Any, ...], refused: bool) -> None:
        self.fn, self.args, self.expect_refusal = fn, args, refused
        self.cached: Any = None
        self.error: TypeError | None = None


def _track(backend: MemoryBackend, records: list[Record]) -> dict[str, Any]:
    def track(fn: Any, *, refused: bool = False, args: tuple[Any, ...] = (3,)) -> Any:
        record = Record(fn, args, refused)
        records.append(record)
        try:
            record.cached = cached_stampede_safe(backend=backend)(fn)
        except TypeError as exc:
            record.error = exc
            return fn
        return record.cached

    return {
        "track": track,
        "track_method": lambda fn: track(fn, args=(None, 3)),
        "track_refused": lambda fn: track(fn, refused=True),
    }


modules = itertools.count()


@settings(max_examples=200, deadline=None)
@given(st.lists(pieces(), min_size=2, max_size=8))
def test_distinct_functions_never_share_a_default_key(parts: list[str]) -> None:
    """Equal keys mean equal values, refusals name key= and namespace=, equal closures share a key."""
    backend, records = MemoryBackend(), list[Record]()
    module = types.ModuleType(f"shapes{next(modules)}")
    vars(module).update(_track(backend, records), RESULTS=records)
    sys.modules[module.__name__] = module  # as during an import
    try:
        source = "\n".join([PRELUDE, "PAIRS = []", *parts])
        exec(compile(source, "shapes.py", "exec"), vars(module))  # noqa: S102
    finally:
        del sys.modules[module.__name__]
    for record in records:
        if record.expect_refusal:
            assert record.error is not None, f"{record.fn!r} was not refused"
        if record.error is not None:
            assert "key=" in str(record.error)
            assert "namespace=" in str(record.error)
    cached = [r for r in records if r.cached is not None]
    keys = [r.cached.cache_key(*r.args) for r in cached]
    values = [repr(r.fn(*r.args)) for r in cached]  # repr: 1, 1.0 and True differ
    for (key_a, value_a), (key_b, value_b) in itertools.combinations(
        zip(keys, values, strict=True), 2
    ):
        assert key_a != key_b or value_a == value_b, key_a
    for order in (cached, cached[::-1]):  # each serves its own value from one backend
        served = [repr(r.cached(*r.args)) for r in order]
        assert served == [repr(r.fn(*r.args)) for r in order]
    for first, last in vars(module)["PAIRS"]:
        equal = records[first], records[last]
        assert equal[0].cached.cache_key(3) == equal[1].cached.cache_key(3)
