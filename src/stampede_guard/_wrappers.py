"""The objects `cached_stampede_safe` puts in place of functions (see `_types`).

Thin shells: each method makes the key and runs a plan (`_call`, `_plan`) with the
sync or the asyncio driver, through the in-process flights (`_coalesce`) where calls
are shared. They decide nothing. One I/O is theirs, for speed: step 1's read, whose
result `_call` decides (`first_look` in memory; `gate` and `looked` on a remote
backend), so that a hit builds no plan. The two classes differ in I/O syntax only.
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Awaitable, Callable, Generator, Mapping
from typing import Any, Generic, ParamSpec, TypeVar, cast

from stampede_guard._call import (
    bypass,
    first_look,
    gate,
    get_cached,
    invalidate,
    looked,
    refresh_key,
    serve_due,
)
from stampede_guard._coalesce import AsyncFlights, Refreshing, SyncFlights
from stampede_guard._context import Context, Plan, Served
from stampede_guard._drivers import run_async, run_sync
from stampede_guard._entry import CachedFailure, Entry
from stampede_guard._errors import BackendError
from stampede_guard._freshness import RefreshDue
from stampede_guard._keys import KeyMaker
from stampede_guard._ops import Op
from stampede_guard._plan import Flight, plan, without_cache
from stampede_guard._reentry import check_reentry, computing_any
from stampede_guard._tags import TagMaker
from stampede_guard._types import AsyncCachedFunction, CachedFunction
from stampede_guard.backends._protocol import AsyncBackend, Backend

__all__ = ["make_async", "make_sync"]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

Call = tuple[tuple[Any, ...], Mapping[str, Any]]  # a call's arguments
NearLookup = Callable[[str], Entry | None]  # a near cache's read: no I/O


class _Cached(Generic[P, R]):
    """The object put in place of a sync function."""

    def __init__(
        self,
        fn: Callable[P, R],
        keys: KeyMaker,
        backend: Backend,
        context: Context,
        tags: TagMaker | None = None,
    ) -> None:
        functools.update_wrapper(self, fn)
        self._fn = fn
        self._tags = tags
        self._keys = keys
        self._make_key = keys.make
        self._backend = backend
        self._context = context
        self._flights = SyncFlights()
        self._refreshing = Refreshing()
        # An in-memory backend, or a near cache (`RedisBackend(near_cache=...)`),
        # answers a hit faster than a flight can be joined: it is read first.
        self._local = bool(getattr(backend, "local", False))
        self._quick, self._near = _quick_read(backend)
        self._lead = _plan_lead if self._local else self._look
        _watch_near(backend, self._flights)

    def _run(self, call: Call, steps: Generator[Op, Any, T]) -> T:
        args, kwargs = call
        compute: Callable[[], object] = functools.partial(self._fn, *args, **kwargs)
        if self._tags is not None:
            compute = self._tags.computing(compute, args, kwargs)
        return run_sync(steps, self._backend, compute, ctx=self._context)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        key = self._make_key(args, kwargs)
        ctx = self._context
        value: Any = None
        if self._quick is not None:  # the hot path: a hit in memory needs no plan
            found = self._quick(key)
            if found is not None:
                # `first_look`'s first decisions, inlined (a failure: it raises it)
                if ctx.plain_hits and type(found.value) is not CachedFailure:
                    return found.value  # type: ignore[return-value]
                value = first_look(key, found, ctx, near=self._near)
                if type(value) is Entry:
                    return value.value  # type: ignore[return-value]
        # A hit is served even to a call made by its own computation; anything that
        # might wait is not (see `_reentry`).
        if computing_any():  # almost never: spare the common path a call
            check_reentry(self._backend, key)
        call = (args, kwargs)
        if value is None:  # a miss, or a remote read: concurrent callers share it
            value = self._flights.run(key, ctx, self._run, call, self._lead)
        if type(value) is RefreshDue:
            value = self._run(call, serve_due(key, value, ctx, self._refreshing))
        return value  # type: ignore[no-any-return]

    def _look(self, key: str, ctx: Context, flight: Flight | None) -> Served | Plan:
        """Step 1 on a remote backend: one read, decided by `_call`."""
        breaker = gate(key, ctx)
        if breaker is None:
            return without_cache(key, ctx, None, flight)
        try:
            found = self._backend.get(key)
        except BackendError as exc:
            return without_cache(key, ctx, exc, flight)
        return looked(key, found, ctx, breaker, flight)

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> None:
        self._run((args, kwargs), invalidate(self._keys(args, kwargs), self._flights))

    def cache_key(self, *args: P.args, **kwargs: P.kwargs) -> str:
        return self._keys(args, kwargs)

    def refresh(self, *args: P.args, **kwargs: P.kwargs) -> R:
        key = self._keys(args, kwargs)
        check_reentry(self._backend, key)
        steps = refresh_key(key, self._context, self._flights)
        return cast("R", self._run((args, kwargs), steps))

    def get_cached(self, *args: P.args, **kwargs: P.kwargs) -> Entry | None:
        return self._run((args, kwargs), get_cached(self._keys(args, kwargs)))

    def bypass(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return cast("R", self._run((args, kwargs), bypass()))

    def __get__(self, instance: object, owner: type[Any] | None = None) -> Any:
        return self if instance is None else _Bound(self, instance)

    def __repr__(self) -> str:
        return f"<stampede-safe {self._fn!r} on {self._backend!r}>"


class _AsyncCached(Generic[P, R]):
    """The object put in place of an ``async def``; awaiting it runs the same plans."""

    def __init__(
        self,
        fn: Callable[P, Awaitable[R]],
        keys: KeyMaker,
        backend: AsyncBackend,
        context: Context,
        tags: TagMaker | None = None,
    ) -> None:
        functools.update_wrapper(self, fn)
        self.__code__, self.__defaults__, self.__kwdefaults__ = _function_face(fn)
        self.__name__: str = getattr(fn, "__name__", type(fn).__name__)
        self._fn = fn
        self._tags = tags
        self._keys = keys
        self._make_key = keys.make
        self._backend = backend
        self._context = context
        self._flights = AsyncFlights()
        self._refreshing = Refreshing()
        self._background: set[Any] = set()  # spawned tasks: strong refs until done
        self._local = bool(getattr(backend, "local", False))
        # A memory backend's sync read serves here too: it never waits on I/O.
        self._quick, self._near = _quick_read(backend)
        self._lead = _async_plan_lead if self._local else self._look
        _watch_near(backend, self._flights)

    async def _run(self, call: Call, steps: Generator[Op, Any, T]) -> T:
        args, kwargs = call
        compute: Callable[[], Awaitable[object]] = functools.partial(
            self._fn, *args, **kwargs
        )
        if self._tags is not None:
            compute = self._tags.acomputing(compute, args, kwargs)
        return await run_async(
            steps, self._backend, compute, self._background, ctx=self._context
        )

    async def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        key = self._make_key(args, kwargs)
        ctx = self._context
        value: Any = None
        if self._quick is not None:  # the hot path: a hit in memory needs no plan
            found = self._quick(key)
            if found is not None:
                # `first_look`'s first decisions, inlined (a failure: it raises it)
                if ctx.plain_hits and type(found.value) is not CachedFailure:
                    return found.value  # type: ignore[return-value]
                value = first_look(key, found, ctx, near=self._near)
                if type(value) is Entry:
                    return value.value  # type: ignore[return-value]
        # A hit is served even to a call made by its own computation; anything that
        # might wait is not (see `_reentry`).
        if computing_any():  # almost never: spare the common path a call
            check_reentry(self._backend, key)
        call = (args, kwargs)
        if value is None:  # a miss, or a remote read: concurrent callers share it
            value = await self._flights.run(key, ctx, self._run, call, self._lead)
        if type(value) is RefreshDue:
            value = await self._run(call, serve_due(key, value, ctx, self._refreshing))
        return value  # type: ignore[no-any-return]

    async def _look(
        self, key: str, ctx: Context, flight: Flight | None
    ) -> Served | Plan:
        """Step 1 on a remote backend: one read, decided by `_call`."""
        breaker = gate(key, ctx)
        if breaker is None:
            return without_cache(key, ctx, None, flight)
        try:
            found = await self._backend.aget(key)
        except BackendError as exc:
            return without_cache(key, ctx, exc, flight)
        return looked(key, found, ctx, breaker, flight)

    async def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> None:
        key = self._keys(args, kwargs)
        await self._run((args, kwargs), invalidate(key, self._flights))

    def cache_key(self, *args: P.args, **kwargs: P.kwargs) -> str:
        return self._keys(args, kwargs)

    async def refresh(self, *args: P.args, **kwargs: P.kwargs) -> R:
        key = self._keys(args, kwargs)
        check_reentry(self._backend, key)
        steps = refresh_key(key, self._context, self._flights)
        return cast("R", await self._run((args, kwargs), steps))

    async def get_cached(self, *args: P.args, **kwargs: P.kwargs) -> Entry | None:
        return await self._run((args, kwargs), get_cached(self._keys(args, kwargs)))

    async def bypass(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return cast("R", await self._run((args, kwargs), bypass()))

    def __get__(self, instance: object, owner: type[Any] | None = None) -> Any:
        return self if instance is None else _AsyncBound(self, instance)

    def __repr__(self) -> str:
        return f"<stampede-safe {self._fn!r} on {self._backend!r}>"


def _quick_read(backend: object) -> tuple[NearLookup | None, bool]:
    """Return the backend's read that needs no I/O, if any, and whether it is near.

    A memory backend's store (which serves asyncio too: it never blocks), or a Redis
    backend's near cache.
    """
    read: NearLookup | None = getattr(backend, "local_read", None)
    return read, read is not None and getattr(backend, "near_cache", None) is not None


def _watch_near(backend: object, flights: SyncFlights | AsyncFlights) -> None:
    """Let a near cache forget *flights* of a key another process changed."""
    watch = getattr(backend, "near_watch", None)
    if watch is not None:
        watch(flights)


def _plan_lead(key: str, ctx: Context, flight: Flight | None) -> Plan:
    return plan(key, ctx, flight)  # after a miss in memory


async def _async_plan_lead(key: str, ctx: Context, flight: Flight | None) -> Plan:
    return plan(key, ctx, flight)


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
    """`_Bound` that is a coroutine function to `inspect`, as `_AsyncCached` is."""

    __slots__ = ()

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return await self._cached(self._instance, *args, **kwargs)

    # See `_function_face`: the code of the coroutine that a call runs.
    __code__ = __call__.__code__
    __defaults__ = None
    __kwdefaults__ = None

    @property
    def __name__(self) -> str:
        return self.__wrapped__.__name__


FunctionFace = tuple[types.CodeType, tuple[Any, ...] | None, dict[str, Any] | None]


def _function_face(fn: Callable[..., Any]) -> FunctionFace:
    """Return the ``__code__``, ``__defaults__`` and ``__kwdefaults__`` for *fn*'s wrapper.

    Frameworks ask ``inspect.iscoroutinefunction`` whether to await a callable (so do
    ``asyncio.iscoroutinefunction`` and asgiref's, which Django uses). For an object
    it says True only if the object looks like a function whose code has the coroutine
    flag: a ``__name__`` (a callable object's is its class's), a ``__code__``, and ``__defaults__``/``__kwdefaults__`` of the
    right types. ``markcoroutinefunction`` would do on 3.12+, but not on 3.11. So the
    wrapper carries *fn*'s own (which also keeps ``inspect.signature(...,
    follow_wrapped=False)`` true), or, for a callable that is not a plain function,
    those of the wrapper's own coroutine, `_AsyncCached.__call__`.
    """
    if inspect.isfunction(fn) and fn.__code__.co_flags & inspect.CO_COROUTINE:
        return fn.__code__, fn.__defaults__, fn.__kwdefaults__
    return _AsyncCached.__call__.__code__, None, None


def make_sync(
    fn: Callable[P, R],
    keys: KeyMaker,
    backend: Backend,
    context: Context,
    tags: TagMaker | None = None,
) -> CachedFunction[P, R]:
    """Wrap a sync function."""
    cached = _Cached(fn, keys, backend, context, tags)
    return cast("CachedFunction[P, R]", cached)


def make_async(
    fn: Callable[P, Awaitable[R]],
    keys: KeyMaker,
    backend: AsyncBackend,
    context: Context,
    tags: TagMaker | None = None,
) -> AsyncCachedFunction[P, R]:
    """Wrap an ``async def``."""
    cached = _AsyncCached(fn, keys, backend, context, tags)
    return cast("AsyncCachedFunction[P, R]", cached)
