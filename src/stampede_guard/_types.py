"""The typed faces of decorated functions: what mypy sees, sync and async."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, Protocol, Self, TypeVar, final, overload

from stampede_guard._entry import Entry

__all__ = ["AsyncCachedFunction", "AsyncFunctionOnSyncBackend", "CachedFunction"]

P = ParamSpec("P")
P2 = ParamSpec("P2")
R_co = TypeVar("R_co", covariant=True)
S = TypeVar("S")


class CachedFunction(Protocol[P, R_co]):
    """A function decorated by `cached_stampede_safe`: same signature, plus helpers.

    Calling it and each of its helpers take the decorated function's own
    arguments: ``(*args, **kwargs)`` below stands for its parameters, checked by type
    checkers as such (a ``ParamSpec``), and ``R_co`` for its return type. So
    ``get_weather.invalidate("Paris")`` drops what ``get_weather("Paris")`` stored.
    Accessed through an instance, a decorated method binds like a plain method,
    helpers included (``obj.method.invalidate(x)``).
    """

    __wrapped__: Callable[..., Any]

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R_co:
        """Return the cached value, computing it once among concurrent callers."""

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> None:
        """Drop the cached entry for these arguments; the next call computes again."""

    def cache_key(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """Return the cache key these arguments map to."""

    def refresh(self, *args: P.args, **kwargs: P.kwargs) -> R_co:
        """Compute the value again under the lock, store it and return it.

        If another caller is computing it already, wait for that value instead.
        """

    def get_cached(self, *args: P.args, **kwargs: P.kwargs) -> Entry | None:
        """Return the stored entry (fresh or stale) without computing anything."""

    def bypass(self, *args: P.args, **kwargs: P.kwargs) -> R_co:
        """Call the function itself: no cache read, no lock, nothing stored."""

    @overload
    def __get__(self, instance: None, owner: type[Any] | None = None) -> Self: ...
    @overload
    def __get__(
        self: CachedFunction[Concatenate[S, P2], R_co],
        instance: S,
        owner: type[Any] | None = None,
    ) -> CachedFunction[P2, R_co]: ...


class AsyncCachedFunction(Protocol[P, R_co]):
    """An ``async def`` decorated by `cached_stampede_safe`; `CachedFunction`'s twin.

    The helpers take the function's own arguments, as `CachedFunction`'s do, and are
    awaited, but for `cache_key`.
    """

    __wrapped__: Callable[..., Any]

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, R_co]:
        """Return the cached value, computing it once among concurrent callers."""

    async def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> None:
        """Drop the cached entry for these arguments; the next call computes again."""

    def cache_key(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """Return the cache key these arguments map to (no I/O, so not async)."""

    async def refresh(self, *args: P.args, **kwargs: P.kwargs) -> R_co:
        """See `CachedFunction.refresh`."""

    async def get_cached(self, *args: P.args, **kwargs: P.kwargs) -> Entry | None:
        """See `CachedFunction.get_cached`."""

    async def bypass(self, *args: P.args, **kwargs: P.kwargs) -> R_co:
        """See `CachedFunction.bypass`."""

    @overload
    def __get__(self, instance: None, owner: type[Any] | None = None) -> Self: ...
    @overload
    def __get__(
        self: AsyncCachedFunction[Concatenate[S, P2], R_co],
        instance: S,
        owner: type[Any] | None = None,
    ) -> AsyncCachedFunction[P2, R_co]: ...


@final
class AsyncFunctionOnSyncBackend:
    """What a type checker sees for an ``async def`` decorated with a sync backend.

    `RedisBackend` has no async methods: use `AsyncRedisBackend` (or `MemoryBackend`,
    which serves both). At run time the decoration raises `TypeError`. For a type
    checker this type is not callable, so every call (or ``await``) of the decorated
    function is an error, whatever the checker's settings; the decoration itself is
    also reported where deprecation reports are enabled (mypy's ``deprecated`` error
    code, pyright's ``reportDeprecated``). A plain `NoReturn` would not do: mypy takes
    the code after the decorated function to be unreachable and checks none of it.
    """

    __slots__ = ()
