"""Public typing, checked by mypy (never executed): signatures survive decoration."""

from __future__ import annotations

from collections.abc import Callable
from typing import assert_type

from typing_extensions import Unpack

from stampede_guard import (
    AsyncCachedFunction,
    AsyncRedisBackend,
    CachedFunction,
    CacheOptions,
    Entry,
    MemoryBackend,
    RedisBackend,
    StampedeStats,
    cached_stampede_safe,
    cached_stampede_safe_batch,
)
from stampede_guard._decorator import Decorator
from stampede_guard._types import AsyncFunctionOnSyncBackend


@cached_stampede_safe(key="weather:{city}", ttl=900, lock_timeout=10)
def get_weather(city: str, units: str = "metric") -> dict[str, float]:
    return {city: 1.0, units: 2.0}


as_callable: Callable[[str, str], dict[str, float]] = get_weather
as_protocol: CachedFunction[[str], dict[str, float]] = get_weather  # pyright: ignore[reportAssignmentType]  # P is invariant to pyright
wrong_return: Callable[[str], int] = get_weather  # type: ignore[assignment]
assert_type(get_weather("Paris"), dict[str, float])
assert_type(get_weather(city="Paris", units="imperial"), dict[str, float])
assert_type(get_weather.cache_key("Paris"), str)
assert_type(get_weather.invalidate("Paris"), None)

get_weather(42)  # type: ignore[arg-type]
get_weather("Paris", "metric", "extra")  # type: ignore[call-arg]
get_weather.invalidate(city=3)  # type: ignore[arg-type]
get_weather.cache_key(town="Paris")  # type: ignore[call-arg]


class Repo:
    @cached_stampede_safe(backend=MemoryBackend(), metrics=StampedeStats())
    def find(self, ident: int) -> str:
        return str(ident)


repo = Repo()
assert_type(repo.find(1), str)
assert_type(repo.find.cache_key(1), str)
assert_type(repo.find.invalidate(1), None)
assert_type(Repo.find(repo, 1), str)
repo.find("1")  # type: ignore[arg-type]
repo.find.invalidate()  # type: ignore[call-arg]


@cached_stampede_safe(key=lambda user_id: f"user:{user_id}", on_timeout="raise")
def load_user(user_id: int) -> list[str]:
    return [str(user_id)]


assert_type(load_user(1), list[str])

cached_stampede_safe(on_timeout="wait")  # type: ignore[call-overload]
cached_stampede_safe(on_backend_error="retry")  # type: ignore[call-overload]
cached_stampede_safe(tll=900)  # type: ignore[call-overload]  # misspelled option
cached_stampede_safe("weather:{city}")  # type: ignore[call-overload]  # keyword-only
cached_stampede_safe(ttl="900")  # type: ignore[call-overload]
cached_stampede_safe(backend=object())  # type: ignore[call-overload]


# --- asyncio ---------------------------------------------------------------------


@cached_stampede_safe(key="forecast:{city}")
async def get_forecast(city: str, days: int = 3) -> list[float]:
    return [float(days)] * len(city)


async def uses_async() -> None:
    assert_type(await get_forecast("Paris"), list[float])
    assert_type(get_forecast.cache_key("Paris"), str)
    assert_type(await get_forecast.invalidate("Paris"), None)
    await get_forecast(3)  # type: ignore[arg-type]
    await get_forecast("Paris", days="3")  # type: ignore[arg-type]


as_async_protocol: AsyncCachedFunction[[str, int], list[float]] = get_forecast


class AsyncRepo:
    @cached_stampede_safe(backend=MemoryBackend())
    async def find(self, ident: int) -> str:
        return str(ident)


async def uses_async_method() -> None:
    repo = AsyncRepo()
    assert_type(await repo.find(1), str)
    assert_type(await repo.find.invalidate(1), None)
    await repo.find("1")  # type: ignore[arg-type]


def pairing(sync_backend: RedisBackend, async_backend: AsyncRedisBackend) -> None:
    async def coro() -> int:
        return 1

    def plain() -> int:
        return 1

    cached_stampede_safe(backend=async_backend)(plain)  # type: ignore[arg-type]
    assert_type(
        cached_stampede_safe(backend=async_backend)(coro), AsyncCachedFunction[[], int]
    )
    assert_type(
        cached_stampede_safe(backend=sync_backend)(plain), CachedFunction[[], int]
    )
    # An async def on a sync-only backend: flagged as deprecated where that is
    # reported, and not callable anywhere, so using it is an error in every setup.
    on_sync = cached_stampede_safe(backend=sync_backend)(coro)  # type: ignore[deprecated]
    assert_type(on_sync, AsyncFunctionOnSyncBackend)
    on_sync()  # type: ignore[operator]


def decorated_mixes(
    sync_backend: RedisBackend, async_backend: AsyncRedisBackend
) -> None:
    @cached_stampede_safe(backend=sync_backend)  # type: ignore[deprecated]
    async def fetch(city: str) -> int:
        return len(city)

    @cached_stampede_safe(backend=async_backend)  # type: ignore[arg-type]
    def load(city: str) -> int:
        return len(city)

    fetch("Paris")  # type: ignore[operator]


def helpers() -> None:
    assert_type(get_weather.refresh("Paris"), dict[str, float])
    assert_type(get_weather.bypass("Paris"), dict[str, float])
    entry = get_weather.get_cached("Paris")
    assert_type(entry, Entry | None)
    get_weather.refresh(3)  # type: ignore[arg-type]


async def async_helpers() -> None:
    assert_type(await get_forecast.refresh("Paris"), list[float])
    assert_type(await get_forecast.bypass("Paris", days=2), list[float])
    assert_type(await get_forecast.get_cached("Paris"), Entry | None)


@cached_stampede_safe(
    key="q:{q}",
    stale_ttl=300,
    early_refresh=True,
    beta=1.5,
    cache_none=False,
    should_cache=bool,
)
def search(q: str) -> list[str]:
    return [q]


assert_type(search("x"), list[str])


def my_cache(**options: Unpack[CacheOptions]) -> Decorator:
    """A wrapper that passes the options on keeps them typed."""
    return cached_stampede_safe(**options)


@my_cache(key="n:{n}", ttl=60)
def wrapped(n: int) -> str:
    return str(n)


assert_type(wrapped(1), str)
my_cache(ttl="60")  # type: ignore[arg-type]
my_cache(tll=60)  # type: ignore[call-arg]
cached_stampede_safe(stale_ttl="5")  # type: ignore[call-overload]


# ttl and stale_ttl may be functions of the value, returning seconds (issue 19).
@cached_stampede_safe(
    key="page:{url}", ttl=lambda v: v["max_age"], stale_ttl=lambda v: v["max_age"] / 10
)
def page(url: str) -> dict[str, int]:
    return {url: 1, "max_age": 60}


assert_type(page("u"), dict[str, int])


def expires_in(token: dict[str, float]) -> float:
    return token["expires_in"]


my_cache(key="token", ttl=expires_in, ttl_jitter=0.1)
cached_stampede_safe_batch(key="user:{}", ttl=lambda _: 60, stale_ttl=0)


def no_value() -> float:
    return 60.0


def as_text(value: object) -> str:
    return str(value)


cached_stampede_safe(ttl=no_value)  # type: ignore[arg-type]
cached_stampede_safe(stale_ttl=as_text)  # type: ignore[arg-type]


# Tags, cached failures and the refresh backoff (issue 19).
@cached_stampede_safe(
    key="orders:{user_id}",
    tags=("user:{user_id}",),
    cache_errors={TimeoutError: 5.0, ConnectionError: 1},
    refresh_backoff=2.0,
    backend=MemoryBackend(),
)
def orders(user_id: int) -> list[int]:
    return [user_id]


assert_type(orders(1), list[int])
my_cache(tags=lambda _value, user_id: [f"user:{user_id}"])
MemoryBackend().invalidate_tag("user:1")
cached_stampede_safe(cache_errors={"TimeoutError": 5.0})  # type: ignore[dict-item]
cached_stampede_safe(refresh_backoff="5")  # type: ignore[call-overload]
cached_stampede_safe_batch(key="user:{}", tags=("user:{}",))
cached_stampede_safe_batch(key="user:{}", tags=lambda _value, id_: [f"org:{id_}"])
