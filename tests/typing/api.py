"""Public typing, checked by mypy (never executed): signatures survive decoration."""

from __future__ import annotations

from collections.abc import Callable
from typing import assert_type

from stampede_guard import (
    CachedFunction,
    MemoryBackend,
    StampedeStats,
    cached_stampede_safe,
)


@cached_stampede_safe(key="weather:{city}", ttl=900, lock_timeout=10)
def get_weather(city: str, units: str = "metric") -> dict[str, float]:
    return {city: 1.0, units: 2.0}


as_callable: Callable[[str, str], dict[str, float]] = get_weather
as_protocol: CachedFunction[[str], dict[str, float]] = get_weather
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

cached_stampede_safe(on_timeout="wait")  # type: ignore[arg-type]
cached_stampede_safe(ttl="900")  # type: ignore[arg-type]
cached_stampede_safe(backend=object())  # type: ignore[arg-type]
