"""Cache keys: templates, callables, and default keys that are stable and collision-free."""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import functools
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stampede_guard import Backend, MemoryBackend, cached_stampede_safe


def keyed(**options: Any) -> Any:
    def f(x: object, y: object = 2, *args: object, **kwargs: object) -> None:
        del x, y, args, kwargs

    return cached_stampede_safe(backend=MemoryBackend(), **options)(f)


def test_default_key_names_the_function() -> None:
    """Without key=, the key is 'module:qualname#<definition>:<32 hex digits>' for a nested function."""
    key = keyed().cache_key(1)
    module, qualname, digest = key.split(":")
    name, definition = qualname.split("#")
    assert module == __name__
    assert name == "keyed.<locals>.f"
    assert len(definition) == 16
    assert len(digest) == 32
    assert int(definition + digest, 16) >= 0


def test_positional_keyword_and_default_spellings_share_a_key() -> None:
    """f(1), f(x=1), f(1, 2) and f(1, y=2) are one call, so one key."""
    f = keyed()
    assert (
        len({f.cache_key(1), f.cache_key(x=1), f.cache_key(1, 2), f.cache_key(1, y=2)})
        == 1
    )


@pytest.mark.parametrize(
    ("left", "right"),
    [
        (("a b",), ("a", "b")),
        (("1:b:2", "3"), ("1", "2:b:3")),
        ((1,), (1.0,)),
        ((1,), (True,)),
        ((1,), ("1",)),
        ((-1,), (-2,)),
        ((None,), ("None",)),
        (((1, 2),), ([1, 2],)),
        (({"a": 1},), ({"a": "1"},)),
        ((b"x",), ("x",)),
        ((1, 2, 3), (1, 2, (3,))),
    ],
)
def test_different_arguments_never_share_a_default_key(
    left: tuple[object, ...], right: tuple[object, ...]
) -> None:
    """Argument lists that collide in other libraries get different keys here."""
    f = keyed()
    assert f.cache_key(*left) != f.cache_key(*right)


def test_dict_and_set_order_do_not_matter() -> None:
    """Equal dicts and sets give one key whatever their insertion order."""
    f = keyed()
    assert f.cache_key({"a": 1, "b": 2}) == f.cache_key({"b": 2, "a": 1})
    assert f.cache_key({3, 1, 2}) == f.cache_key({2, 3, 1})


class Color(enum.Enum):
    RED = 1


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: int


def test_enums_and_dataclasses_have_stable_keys() -> None:
    """Enums and dataclass instances are encoded by type and content."""
    f = keyed()
    assert f.cache_key(Color.RED) == f.cache_key(Color.RED)
    assert f.cache_key(Color.RED) != f.cache_key(1)
    assert f.cache_key(Point(1, 2)) == f.cache_key(Point(1, 2))
    assert f.cache_key(Point(1, 2)) != f.cache_key(Point(2, 1))


def test_object_without_stable_form_needs_an_explicit_key() -> None:
    """An argument whose repr holds an address is refused with a message naming key=."""
    f = keyed()
    with pytest.raises(TypeError, match=r"argument 'x' is a builtins.object.*key="):
        f.cache_key(object())


def test_bad_call_raises_the_usual_type_error() -> None:
    """Calling with arguments the function does not take fails like calling the function."""
    f = keyed()
    with pytest.raises(TypeError, match="multiple values"):
        f.cache_key(1, x=1)
    with pytest.raises(TypeError, match="missing a required argument"):
        f.cache_key()


def test_method_receiver_is_left_out_of_default_keys() -> None:
    """Two instances share a default key: self is not part of it."""

    class Repo:
        @cached_stampede_safe(backend=MemoryBackend())
        def find(self, ident: int) -> int:
            return ident

    assert Repo().find.cache_key(3) == Repo().find.cache_key(3)


def test_template_supports_attributes_and_format_specs() -> None:
    """Templates are str.format: attribute access and format specs work."""

    @cached_stampede_safe(key="user:{user.x}:{ratio:.2f}", backend=MemoryBackend())
    def f(user: Point, ratio: float) -> None:
        del user, ratio

    assert f.cache_key(Point(7, 0), 0.5) == "user:7:0.50"


def test_template_using_no_parameter_warns() -> None:
    """A constant template on a function with parameters shares one entry: a warning at the decorator line."""
    with pytest.warns(UserWarning, match="uses none of the parameters") as record:

        @cached_stampede_safe(key="constant", backend=MemoryBackend())
        def f(x: int) -> int:
            return x

    assert record[0].filename == __file__


def test_key_callable_gets_the_call_arguments() -> None:
    """key=callable receives the same arguments as the function."""

    @cached_stampede_safe(
        key=lambda city, units="metric": f"w:{city.lower()}:{units}",
        backend=MemoryBackend(),
    )
    def f(city: str, units: str = "metric") -> str:
        return city

    assert f.cache_key("PARIS") == "w:paris:metric"


def test_key_callable_must_return_a_string() -> None:
    """A key callable returning a non-str is a TypeError at call time."""

    @cached_stampede_safe(key=lambda x: x, backend=MemoryBackend())
    def f(x: int) -> int:
        return x

    with pytest.raises(TypeError, match="returned int, not str"):
        f(1)


scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary()
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.tuples(inner, inner),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None)
@given(st.tuples(values, values), st.tuples(values, values))
def test_default_keys_are_injective(
    left: tuple[object, object], right: tuple[object, object]
) -> None:
    """Two argument pairs share a key exactly when they are the same arguments."""
    f = keyed()
    same_arguments = _canonical(left) == _canonical(right)
    assert (f.cache_key(*left) == f.cache_key(*right)) == same_arguments


def _canonical(value: object) -> object:
    """What makes two arguments 'the same' for a cache: type and content."""
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_canonical(v) for v in value))
    if isinstance(value, float) and value == 0:
        return (float, str(value))  # 0.0 and -0.0 are different keys
    return (type(value), value)


@pytest.mark.timeout(60)
def test_default_keys_are_the_same_in_every_process() -> None:
    """Processes with different PYTHONHASHSEED values build identical keys (no salted hash())."""
    script = textwrap.dedent(
        """
        from stampede_guard import MemoryBackend, cached_stampede_safe

        @cached_stampede_safe(backend=MemoryBackend())
        def f(a, b=None):
            return a

        print(f.cache_key("tenant-a", {"k": ("v", 1.5, None)}))
        print(f.cache_key(frozenset({"x", "y", "z"})))
        """
    )
    outputs = set()
    for seed in ("1", "2", "3"):
        run = subprocess.run(
            [sys.executable, "-c", script],
            env={"PYTHONHASHSEED": seed, "PATH": ""},
            capture_output=True,
            text=True,
            check=True,
            timeout=50,
        )
        outputs.add(run.stdout)
    assert len(outputs) == 1


def test_long_keys_are_shortened_to_a_readable_head_and_a_digest() -> None:
    """A template filled with a 1 MB argument gives a bounded key; different ones differ."""

    @cached_stampede_safe(key="doc:{text}", backend=MemoryBackend())
    def f(text: str) -> int:
        return len(text)

    long_a, long_b = "a" * 1_000_000, "a" * 999_999 + "b"
    key_a, key_b = f.cache_key(long_a), f.cache_key(long_b)
    assert key_a.startswith("doc:aaaa")
    assert len(key_a) <= 256
    assert key_a != key_b
    assert f.cache_key("short") == "doc:short"
    assert f(long_a) == 1_000_000


def test_keys_with_any_characters_are_kept_apart() -> None:
    """Spaces, newlines, NUL, braces and unicode in template values are used as they are."""

    @cached_stampede_safe(key="k:{x}", backend=MemoryBackend())
    def f(x: str) -> str:
        return x

    values = ["a b", "a\nb", "a\x00b", "{a}", "}{", "é", "日本"]
    assert [f(v) for v in values] == values
    assert len({f.cache_key(v) for v in values}) == len(values)


def test_a_key_with_a_lone_surrogate_is_a_value_error_alike_on_every_backend(
    make_backend: Callable[[], Backend],
) -> None:
    """No backend can carry a lone surrogate: a ValueError naming the key, nothing locked."""
    calls = []

    @cached_stampede_safe(key="user:{name}", backend=make_backend())
    def user(name: str) -> str:
        calls.append(name)
        return name

    with pytest.raises(ValueError, match=r"'user:a\\udc80b'.*not valid Unicode"):
        user("a\udc80b")
    assert calls == []
    assert user("zoë") == "zoë", "other non-ASCII keys are fine"


def test_partials_of_one_function_never_share_a_default_key() -> None:
    """partial(price, rate=0.8) and partial(price, rate=0.9) keep their own values."""
    backend = MemoryBackend()

    def price(amount: float, rate: float) -> float:
        return amount * rate

    gbp = cached_stampede_safe(backend=backend)(functools.partial(price, rate=0.8))
    eur = cached_stampede_safe(backend=backend)(functools.partial(price, rate=0.9))
    assert eur(100) == 90.0
    assert gbp(100) == 80.0
    assert gbp.cache_key(100) != eur.cache_key(100)


def test_a_callable_object_needs_a_key_or_a_namespace() -> None:
    """Its instances have no stable identity: TypeError naming key= and namespace=."""

    class Rate:
        def __init__(self, rate: float) -> None:
            self.rate = rate

        def __call__(self, amount: float) -> float:
            return amount * self.rate

    backend = MemoryBackend()
    with pytest.raises(TypeError, match=r"Rate default cache keys.*key=.*namespace="):
        cached_stampede_safe(backend=backend)(Rate(0.8))
    gbp = cached_stampede_safe(backend=backend, namespace="gbp")(Rate(0.8))
    eur = cached_stampede_safe(backend=backend, key="eur:{amount}")(Rate(0.9))
    assert (gbp(100), eur(100)) == (80.0, 90.0)


def test_an_async_callable_object_is_awaited_and_a_generator_one_refused() -> None:
    """A callable object is judged by its __call__: async is awaited, a generator refused."""

    class Double:
        async def __call__(self, x: int) -> int:
            await asyncio.sleep(0)  # a real suspension: the object must be awaited
            return 2 * x

    class Numbers:
        def __call__(self) -> Iterator[int]:
            yield 1

    double = cached_stampede_safe(backend=MemoryBackend(), key="d:{x}")(Double())
    assert asyncio.run(double(4)) == 8
    with pytest.raises(TypeError, match="generator"):
        cached_stampede_safe(backend=MemoryBackend(), key="n")(Numbers())


_FIELD = st.sampled_from(
    ["{a}", "{b}", "{a!r}", "{b!s}", "{a!a}", "{a:>6}", "{b:^9}", "{a!r:<12}", "{b:.3}"]
)
_LITERAL = st.text(alphabet="xyz:-{}é ", max_size=4).map(
    lambda text: text.replace("{", "{{").replace("}", "}}")
)
_VALUE = st.one_of(
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.booleans(),
    st.none(),
    st.sampled_from([Color.RED, 1.5, (1, 2)]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_LITERAL, _FIELD), min_size=1, max_size=4), _VALUE, _VALUE)
def test_keys_of_positional_calls_are_exactly_what_str_format_makes(
    pieces: list[tuple[str, str]], a: object, b: object
) -> None:
    """The hot path's key maker (an f-string) agrees with str.format on every value.

    Conversions and format specs included, and whether the arguments come by position
    or by name.
    """
    template = "".join(literal + field for literal, field in pieces)
    if "{b" not in template:
        template += "{b}"  # every parameter named (an unused one only warns)

    @cached_stampede_safe(key=template, backend=MemoryBackend())
    def f(a: object, b: object) -> None:
        del a, b

    try:
        expected = template.format(a=a, b=b)
    except (ValueError, TypeError):  # a spec the value does not take: both refuse
        with pytest.raises((ValueError, TypeError)):
            f.cache_key(a, b)
        return
    if len(expected) > 256:  # shortened to a head and a digest: the same either way
        assert f.cache_key(a, b) == f.cache_key(a=a, b=b)
        return
    assert f.cache_key(a, b) == expected
    assert f.cache_key(a=a, b=b) == expected
