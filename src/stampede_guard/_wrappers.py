"""The objects `cached_stampede_safe` puts in place of functions (see `_types`).

Both wrappers do the same few things around the one algorithm in `_plan`: read (step 1,
the hot path), share concurrent calls of a key (`_coalesce`), run the plan on a miss,
and hand a due refresh to the background or run it inline. Only how they wait differs.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import threading
import types
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Generic, ParamSpec, TypeVar, cast

from stampede_guard._coalesce import AsyncFlights, Refreshing, SyncFlights
from stampede_guard._drivers import run_async, run_sync
from stampede_guard._errors import BackendError
from stampede_guard._freshness import RefreshDue, stale_value
from stampede_guard._keys import KeyMaker
from stampede_guard._plan import (
    MISS,
    Context,
    Flight,
    GaveUp,
    Served,
    Via,
    first_look,
    join,
    plan,
    refresh,
    refresh_now,
    take_over,
    without_cache,
)
from stampede_guard._reentry import check_reentry
from stampede_guard._types import AsyncCachedFunction, CachedFunction
from stampede_guard.backends._protocol import AsyncBackend, Backend, Entry

__all__ = ["make_async", "make_sync"]

logger = logging.getLogger("stampede_guard")

P = ParamSpec("P")
R = TypeVar("R")

Args = tuple[Any, ...]
Kwargs = Mapping[str, Any]


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
        self._refreshing = Refreshing()
        # An in-memory backend answers a hit faster than a flight can be joined.
        self._local = bool(getattr(backend, "local", False))

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        key = self._keys(args, kwargs)
        check_reentry(self._backend, key)
        flights, context = self._flights, self._context
        if not self._local:  # a remote read: concurrent callers share it
            value = flights.run(
                key, args, kwargs, context, self._serve, self._join, self._take_over
            )
        else:
            value = first_look(key, self._backend.get(key), context)
            if value is MISS:
                value = flights.run(
                    key, args, kwargs, context, self._miss, self._join, self._take_over
                )
        if value.__class__ is RefreshDue:
            return cast("R", self._refresh_due(key, value, args, kwargs))
        return cast("R", value)

    def _serve(
        self, key: str, args: Args, kwargs: Kwargs, flight: Flight | None = None
    ) -> Served:
        breaker = self._context.breaker_for(key)
        if not breaker.allow():
            return self._without_cache(key, None, args, kwargs, flight)
        try:
            found = self._backend.get(key)
        except BackendError as exc:
            return self._without_cache(key, exc, args, kwargs, flight)
        if found is not None:  # a read that found nothing proves no write works
            breaker.succeeded()
        value = first_look(key, found, self._context)
        if value is not MISS:
            return value, Via.CACHE
        return self._miss(key, args, kwargs, flight)

    def _without_cache(
        self,
        key: str,
        error: BackendError | None,
        args: Args,
        kwargs: Kwargs,
        flight: Flight | None = None,
    ) -> Served:
        compute = functools.partial(self._fn, *args, **kwargs)
        steps = without_cache(key, self._context, error, flight)
        return run_sync(steps, self._backend, compute, ctx=self._context)

    def _miss(
        self, key: str, args: Args, kwargs: Kwargs, flight: Flight | None = None
    ) -> Served:
        compute = functools.partial(self._fn, *args, **kwargs)
        steps = plan(key, self._context, flight)
        return run_sync(steps, self._backend, compute, ctx=self._context)

    def _join(
        self, key: str, args: Args, kwargs: Kwargs, flight: Flight, arrived: float
    ) -> Served | GaveUp | None:
        compute = functools.partial(self._fn, *args, **kwargs)
        steps = join(key, self._context, flight, arrived)
        return run_sync(steps, self._backend, compute, ctx=self._context)

    def _take_over(
        self, key: str, args: Args, kwargs: Kwargs, flight: Flight, gave_up: GaveUp
    ) -> Served:
        compute = functools.partial(self._fn, *args, **kwargs)
        steps = take_over(key, self._context, flight, gave_up)
        return run_sync(steps, self._backend, compute, ctx=self._context)

    def _refresh_due(
        self, key: str, due: RefreshDue, args: Args, kwargs: Kwargs
    ) -> object:
        """Serve *due*'s value; the first caller of this process to see it refreshes it."""
        if not self._refreshing.claim(key):
            return stale_value(key, due, self._context)
        if self._context.policy.background_refresh:
            threading.Thread(
                target=self._refresh_in_background,
                args=(key, due, args, kwargs),
                name="stampede_guard-refresh",
                daemon=True,
            ).start()
            return stale_value(key, due, self._context)
        try:
            value, via = self._refresh(key, due, args, kwargs)
        finally:
            self._refreshing.release(key)
        return stale_value(key, due, self._context) if via is Via.CACHE else value

    def _refresh(self, key: str, due: RefreshDue, args: Args, kwargs: Kwargs) -> Served:
        compute = functools.partial(self._fn, *args, **kwargs)
        steps = refresh(key, due, self._context)
        return run_sync(steps, self._backend, compute, ctx=self._context)

    def _refresh_in_background(
        self, key: str, due: RefreshDue, args: Args, kwargs: Kwargs
    ) -> None:
        try:
            self._refresh(key, due, args, kwargs)
        except Exception:  # nobody is left to raise to; RefreshFailed was reported
            logger.warning("background refresh of %r failed", key, exc_info=True)
        finally:
            self._refreshing.release(key)

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> None:
        key = self._keys(args, kwargs)
        self._backend.delete(key)
        self._flights.forget(key)  # later callers must not join an older computation

    def cache_key(self, *args: P.args, **kwargs: P.kwargs) -> str:
        return self._keys(args, kwargs)

    def refresh(self, *args: P.args, **kwargs: P.kwargs) -> R:
        key = self._keys(args, kwargs)
        check_reentry(self._backend, key)
        compute = functools.partial(self._fn, *args, **kwargs)
        steps = refresh_now(key, self._context)
        value, _ = run_sync(steps, self._backend, compute, ctx=self._context)
        self._flights.forget(key)  # later callers must not join an older computation
        return cast("R", value)

    def get_cached(self, *args: P.args, **kwargs: P.kwargs) -> Entry | None:
        return self._backend.get(self._keys(args, kwargs))

    def bypass(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self._fn(*args, **kwargs)

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
        self._refreshing = Refreshing()
        self._background: set[asyncio.Task[Any]] = set()  # strong refs until done
        self._local = bool(getattr(backend, "local", False))

    async def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        key = self._keys(args, kwargs)
        check_reentry(self._backend, key)
        flights, context = self._flights, self._context
        if not self._local:  # a remote read: concurrent callers share it
            value = await flights.run(
                key, args, kwargs, context, self._serve, self._join, self._take_over
            )
        else:
            value = first_look(key, await self._backend.aget(key), context)
            if value is MISS:
                value = await flights.run(
                    key, args, kwargs, context, self._miss, self._join, self._take_over
                )
        if value.__class__ is RefreshDue:
            due = value
            return cast("R", await self._refresh_due(key, due, args, kwargs))
        return cast("R", value)

    async def _serve(
        self, key: str, args: Args, kwargs: Kwargs, flight: Flight | None = None
    ) -> Served:
        breaker = self._context.breaker_for(key)
        if not breaker.allow():
            return await self._without_cache(key, None, args, kwargs, flight)
        try:
            found = await self._backend.aget(key)
        except BackendError as exc:
            return await self._without_cache(key, exc, args, kwargs, flight)
        if found is not None:  # a read that found nothing proves no write works
            breaker.succeeded()
        value = first_look(key, found, self._context)
        if value is not MISS:
            return value, Via.CACHE
        return await self._miss(key, args, kwargs, flight)

    async def _run(self, steps: Any, args: Args, kwargs: Kwargs) -> Any:
        compute = functools.partial(self._fn, *args, **kwargs)
        return await run_async(
            steps, self._backend, compute, self._background, ctx=self._context
        )

    async def _without_cache(
        self,
        key: str,
        error: BackendError | None,
        args: Args,
        kwargs: Kwargs,
        flight: Flight | None = None,
    ) -> Served:
        steps = without_cache(key, self._context, error, flight)
        served: Served = await self._run(steps, args, kwargs)
        return served

    async def _miss(
        self, key: str, args: Args, kwargs: Kwargs, flight: Flight | None = None
    ) -> Served:
        served: Served = await self._run(plan(key, self._context, flight), args, kwargs)
        return served

    async def _join(
        self, key: str, args: Args, kwargs: Kwargs, flight: Flight, arrived: float
    ) -> Served | GaveUp | None:
        steps = join(key, self._context, flight, arrived)
        joined: Served | GaveUp | None = await self._run(steps, args, kwargs)
        return joined

    async def _take_over(
        self, key: str, args: Args, kwargs: Kwargs, flight: Flight, gave_up: GaveUp
    ) -> Served:
        steps = take_over(key, self._context, flight, gave_up)
        served: Served = await self._run(steps, args, kwargs)
        return served

    async def _refresh_due(
        self, key: str, due: RefreshDue, args: Args, kwargs: Kwargs
    ) -> object:
        """Serve *due*'s value; the first task of this process to see it refreshes it."""
        if not self._refreshing.claim(key):
            return stale_value(key, due, self._context)
        if self._context.policy.background_refresh:
            task = asyncio.get_running_loop().create_task(
                self._refresh_in_background(key, due, args, kwargs)
            )
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            return stale_value(key, due, self._context)
        try:
            value, via = await self._refresh(key, due, args, kwargs)
        finally:
            self._refreshing.release(key)
        return stale_value(key, due, self._context) if via is Via.CACHE else value

    async def _refresh(
        self, key: str, due: RefreshDue, args: Args, kwargs: Kwargs
    ) -> Served:
        served: Served = await self._run(refresh(key, due, self._context), args, kwargs)
        return served

    async def _refresh_in_background(
        self, key: str, due: RefreshDue, args: Args, kwargs: Kwargs
    ) -> None:
        try:
            await self._refresh(key, due, args, kwargs)
        except Exception:  # nobody is left to raise to; RefreshFailed was reported
            logger.warning("background refresh of %r failed", key, exc_info=True)
        finally:
            self._refreshing.release(key)

    async def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> None:
        key = self._keys(args, kwargs)
        await self._backend.adelete(key)
        self._flights.forget(key)  # later callers must not join an older computation

    def cache_key(self, *args: P.args, **kwargs: P.kwargs) -> str:
        return self._keys(args, kwargs)

    async def refresh(self, *args: P.args, **kwargs: P.kwargs) -> R:
        key = self._keys(args, kwargs)
        check_reentry(self._backend, key)
        value, _ = await self._run(refresh_now(key, self._context), args, kwargs)
        self._flights.forget(key)  # later callers must not join an older computation
        return cast("R", value)

    async def get_cached(self, *args: P.args, **kwargs: P.kwargs) -> Entry | None:
        return await self._backend.aget(self._keys(args, kwargs))

    async def bypass(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return await self._fn(*args, **kwargs)

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

    def refresh(self, *args: Any, **kwargs: Any) -> Any:
        return self._cached.refresh(self._instance, *args, **kwargs)

    def get_cached(self, *args: Any, **kwargs: Any) -> Any:
        return self._cached.get_cached(self._instance, *args, **kwargs)

    def bypass(self, *args: Any, **kwargs: Any) -> Any:
        return self._cached.bypass(self._instance, *args, **kwargs)

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
