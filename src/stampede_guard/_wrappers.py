"""What `cached_stampede_safe` returns: typed Protocols and the objects behind them."""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import (
    Any,
    Concatenate,
    Generic,
    ParamSpec,
    Protocol,
    Self,
    TypeVar,
    cast,
    overload,
)

from stampede_guard._coalesce import AsyncFlights, SyncFlights
from stampede_guard._drivers import run_async, run_sync
from stampede_guard._keys import KeyMaker
from stampede_guard._plan import MISS, Context, Served, first_look, plan
from stampede_guard.backends._protocol import AsyncBackend, Backend

__all__ = ["AsyncCachedFunction", "CachedFunction", "make_async", "make_sync"]

P = ParamSpec("P")
P2 = ParamSpec("P2")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)
S = TypeVar("S")


class CachedFunction(Protocol[P, R_co]):
    """A function decorated by `cached_stampede_safe`: same signature, plus helpers.

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

    @overload
    def __get__(self, instance: None, owner: type[Any] | None = None) -> Self: ...
    @overload
    def __get__(
        self: CachedFunction[Concatenate[S, P2], R_co],
        instance: S,
        owner: type[Any] | None = None,
    ) -> CachedFunction[P2, R_co]: ...


class AsyncCachedFunction(Protocol[P, R_co]):
    """An ``async def`` decorated by `cached_stampede_safe`; `CachedFunction`'s twin."""

    __wrapped__: Callable[..., Any]

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, R_co]:
        """Return the cached value, computing it once among concurrent callers."""

    async def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> None:
        """Drop the cached entry for these arguments; the next call computes again."""

    def cache_key(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """Return the cache key these arguments map to (no I/O, so not async)."""

    @overload
    def __get__(self, instance: None, owner: type[Any] | None = None) -> Self: ...
    @overload
    def __get__(
        self: AsyncCachedFunction[Concatenate[S, P2], R_co],
        instance: S,
        owner: type[Any] | None = None,
    ) -> AsyncCachedFunction[P2, R_co]: ...


class _Cached(Generic[P, R]):
    """The object put in place of a sync function."""

    def __init__(
        self, fn: Callable[P, R], keys: KeyMaker, backend: Backend, context: Context
    ) -> None:
        functools.update_wrapper(self, fn)
        self._fn = fn
        self._keys = keys
        self._backend = backend
        self._context = context
        self._flights = SyncFlights()
        # An in-memory backend answers a hit faster than a flight can be joined.
        self._local = bool(getattr(backend, "local", False))

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        key = self._keys(args, kwargs)
        if not self._local:  # a remote read: concurrent callers share it
            return cast(
                "R", self._flights.run(key, self._serve, args, kwargs, self._context)
            )
        value = first_look(key, self._backend.get(key), self._context)
        if value is MISS:
            return cast(
                "R", self._flights.run(key, self._miss, args, kwargs, self._context)
            )
        return cast("R", value)

    def _serve(
        self, key: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> Served:
        value = first_look(key, self._backend.get(key), self._context)
        return (value, True) if value is not MISS else self._miss(key, args, kwargs)

    def _miss(
        self, key: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> Served:
        compute = functools.partial(self._fn, *args, **kwargs)
        return run_sync(plan(key, self._context), self._backend, compute)

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> None:
        self._backend.delete(self._keys(args, kwargs))

    def cache_key(self, *args: P.args, **kwargs: P.kwargs) -> str:
        return self._keys(args, kwargs)

    def __get__(self, instance: object, owner: type[Any] | None = None) -> Any:
        return self if instance is None else _Bound(self, instance)

    def __repr__(self) -> str:
        return f"<stampede-safe {self._fn!r} on {self._backend!r}>"


class _AsyncCached(Generic[P, R]):
    """The object put in place of an ``async def``; awaiting it runs the same plan."""

    def __init__(
        self,
        fn: Callable[P, Awaitable[R]],
        keys: KeyMaker,
        backend: AsyncBackend,
        context: Context,
    ) -> None:
        functools.update_wrapper(self, fn)
        _mark_coroutine_function(self)
        self._fn = fn
        self._keys = keys
        self._backend = backend
        self._context = context
        self._flights = AsyncFlights()
        self._local = bool(getattr(backend, "local", False))

    async def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        key = self._keys(args, kwargs)
        flights, context = self._flights, self._context
        if not self._local:  # a remote read: concurrent callers share it
            return cast("R", await flights.run(key, self._serve, args, kwargs, context))
        value = first_look(key, await self._backend.aget(key), context)
        if value is MISS:
            return cast("R", await flights.run(key, self._miss, args, kwargs, context))
        return cast("R", value)

    async def _serve(
        self, key: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> Served:
        value = first_look(key, await self._backend.aget(key), self._context)
        return (
            (value, True) if value is not MISS else await self._miss(key, args, kwargs)
        )

    async def _miss(
        self, key: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> Served:
        compute = functools.partial(self._fn, *args, **kwargs)
        return await run_async(plan(key, self._context), self._backend, compute)

    async def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> None:
        await self._backend.adelete(self._keys(args, kwargs))

    def cache_key(self, *args: P.args, **kwargs: P.kwargs) -> str:
        return self._keys(args, kwargs)

    def __get__(self, instance: object, owner: type[Any] | None = None) -> Any:
        return self if instance is None else _AsyncBound(self, instance)

    def __repr__(self) -> str:
        return f"<stampede-safe {self._fn!r} on {self._backend!r}>"


class _Bound:
    """A decorated method looked up on an instance: every helper gets *instance* first."""

    __slots__ = ("__wrapped__", "_cached", "_instance")

    def __init__(
        self, cached: _Cached[..., Any] | _AsyncCached[..., Any], instance: object
    ) -> None:
        self._cached = cached
        self._instance = instance
        self.__wrapped__ = types.MethodType(cached._fn, instance)  # noqa: SLF001

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._cached(self._instance, *args, **kwargs)

    def invalidate(self, *args: Any, **kwargs: Any) -> Any:
        return self._cached.invalidate(self._instance, *args, **kwargs)

    def cache_key(self, *args: Any, **kwargs: Any) -> str:
        return self._cached.cache_key(self._instance, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<bound {self._cached!r} of {self._instance!r}>"


class _AsyncBound(_Bound):
    """`_Bound` whose call is a coroutine function, so frameworks see it as async."""

    __slots__ = ()

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return await self._cached(self._instance, *args, **kwargs)


def _mark_coroutine_function(obj: object) -> None:
    # Frameworks ask inspect.iscoroutinefunction() whether to await an endpoint.
    # Python 3.12 lets an object say so; before, they look at its async __call__.
    mark = getattr(inspect, "markcoroutinefunction", None)
    if mark is not None:
        mark(obj)


def make_sync(
    fn: Callable[P, R], keys: KeyMaker, backend: Backend, context: Context
) -> CachedFunction[P, R]:
    """Wrap a sync function."""
    return cast("CachedFunction[P, R]", _Cached(fn, keys, backend, context))


def make_async(
    fn: Callable[P, Awaitable[R]],
    keys: KeyMaker,
    backend: AsyncBackend,
    context: Context,
) -> AsyncCachedFunction[P, R]:
    """Wrap an ``async def``."""
    return cast("AsyncCachedFunction[P, R]", _AsyncCached(fn, keys, backend, context))
