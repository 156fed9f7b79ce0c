"""`cached_stampede_safe`: the one decorator, for sync and async functions."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, Protocol, TypeVar, overload

from typing_extensions import Unpack, deprecated

from stampede_guard._cache_options import CacheOptions
from stampede_guard._context import Context
from stampede_guard._keys import KeyMaker, validate_namespace
from stampede_guard._options import (
    breakers_of,
    check_backend,
    check_function,
    check_key,
    check_metrics,
    check_option_names,
    check_pairing,
    check_tag_backend,
    clock_of,
    validated_policy,
)
from stampede_guard._tags import TagMaker
from stampede_guard._types import (
    AsyncCachedFunction,
    AsyncFunctionOnSyncBackend,
    CachedFunction,
)
from stampede_guard._wrappers import make_async, make_sync
from stampede_guard.backends._protocol import AsyncBackend, Backend
from stampede_guard.metrics import safe_emitter

__all__ = ["cached_stampede_safe"]

P = ParamSpec("P")
R = TypeVar("R")


class DualBackend(Backend, AsyncBackend, Protocol):
    """A backend that serves sync and async functions alike, as `MemoryBackend` does."""


class Decorator(Protocol):
    """Decorates a sync or an async function (the backend serves both)."""

    @overload
    def __call__(  # type: ignore[overload-overlap]
        self, fn: Callable[P, Coroutine[Any, Any, R]], /
    ) -> AsyncCachedFunction[P, R]: ...
    @overload
    def __call__(self, fn: Callable[P, R], /) -> CachedFunction[P, R]: ...


class SyncDecorator(Protocol):
    """Decorates a sync function (the backend has no async methods)."""

    @overload
    @deprecated(
        "an async function needs a backend with async methods: AsyncRedisBackend or MemoryBackend"
    )
    def __call__(  # type: ignore[overload-overlap]  # on purpose: see the return type
        self, fn: Callable[P, Coroutine[Any, Any, R]], /
    ) -> AsyncFunctionOnSyncBackend: ...
    @overload
    def __call__(self, fn: Callable[P, R], /) -> CachedFunction[P, R]: ...


class AsyncDecorator(Protocol):
    """Decorates an ``async def`` (the backend has async methods only)."""

    def __call__(
        self, fn: Callable[P, Coroutine[Any, Any, R]], /
    ) -> AsyncCachedFunction[P, R]: ...


@overload
def cached_stampede_safe(  # type: ignore[overload-overlap]
    *, backend: DualBackend | None = None, **options: Unpack[CacheOptions]
) -> Decorator: ...
@overload
def cached_stampede_safe(
    *, backend: Backend, **options: Unpack[CacheOptions]
) -> SyncDecorator: ...
@overload
def cached_stampede_safe(
    *, backend: AsyncBackend, **options: Unpack[CacheOptions]
) -> AsyncDecorator: ...
def cached_stampede_safe(
    *,
    backend: Backend | AsyncBackend | None = None,
    **options: Unpack[CacheOptions],
) -> Decorator | SyncDecorator | AsyncDecorator:
    """Cache a function so that concurrent misses of one key compute it only once.

    The first caller to miss takes a lock, computes and stores the value; the others
    wait (backing off from *base_delay* to *max_delay*, with jitter) and are served
    the stored value. Works on plain functions, ``async def`` functions and methods.

    Args:
        backend: Where values and locks live: one in-memory backend per process by
            default; `RedisBackend` (sync) or `AsyncRedisBackend` (asyncio) to
            coordinate processes and hosts. Defaults to ``None``.
        **options: The keyword options below, all optional, typed by `CacheOptions`.

    Keyword Args:
        key (str | Callable[..., str] | None): How a call's arguments become its cache
            key: a ``str.format`` template over parameter names (``"weather:{city}"``,
            ``"user:{user.id}"``), a callable taking the function's arguments and
            returning a str, or None for ``module:qualname:<digest of the arguments>``,
            the same in every process. Defaults to ``None``.
        ttl (float | Callable[[Any], float]): Seconds a value stays cached; then the
            next call computes it again. Or a function of the computed value returning
            its seconds (``lambda r: r.max_age``, a token's ``expires_in``); 0 means
            "do not cache this one". It must depend on the value alone (readers ask
            it again to judge freshness) and be cheap. A bad answer (not a number,
            negative, over 100 years) or an exception raises to the caller that
            computed, with the lock released and nothing stored; under 0.001 counts
            as 0. Defaults to ``900``.
        lock_timeout (float): Seconds the lock outlives a holder that died. Must exceed
            the computation time, or one more caller starts computing while the first
            still runs. Defaults to ``10``.
        wait_timeout (float | None): Seconds a caller waits for another's computation,
            in another process or its own, before *on_timeout* applies; counted afresh
            when the lock passes to a new holder. Defaults to ``None``: *lock_timeout*
            (ten times it with *lock_renewal*).
        base_delay (float): First backoff delay, in seconds; each next one doubles.
            Defaults to ``0.1``.
        max_delay (float): Longest backoff delay, in seconds. Defaults to ``1.6``.
        max_retries (int | None): If given, a waiter also gives up after this many
            retries. Defaults to ``None``.
        on_timeout (OnTimeout): What a waiter does when its wait runs out: ``"compute"``
            the value itself (and store it, unless a newer value was stored), or
            ``"raise"`` `LockTimeoutError`. Callers waiting for another caller of their
            own process give up the same way, and then compute once for the process.
            Defaults to ``"compute"``.
        on_backend_error (OnBackendError): When the backend fails (down, timing out):
            ``"compute"`` serves the call without the cache (computed once per key per
            process at a time; a circuit breaker skips a backend that keeps failing for
            5 s), or ``"raise"`` `BackendError`. Defaults to ``"compute"``.
        on_cancel (OnCancel): When an asyncio caller that is computing the value is
            cancelled (a client disconnected, a ``wait_for`` ran out): ``"finish"`` lets
            the computation go on in a task of its own, for at most its lease, and store
            the value for everyone else, while the caller returns at once; ``"cancel"``
            cancels the computation with the caller (the lock is released). Sync
            functions cannot be cancelled. Defaults to ``"finish"``.
        lock_renewal (bool): Renew the lock's lease every third of *lock_timeout* while
            the function runs (for at most 10 leases), so a computation longer than
            *lock_timeout* keeps its lock, while a crashed holder's still runs out after
            *lock_timeout*. Defaults to ``False``.
        stale_ttl (float | Callable[[Any], float]): Seconds a value may still be
            served after *ttl* (stale while revalidate): the caller gets it at once and
            one caller refreshes it. After ``ttl + stale_ttl`` it is gone and the next
            call is a miss. 0: never stale. Or a function of the computed value, as
            for *ttl* (0: no stale period for that value). Defaults to ``0``.
        stale_if_error (bool): If a refresh raises, keep serving the stale value (and
            report it) instead of raising to the caller that refreshed inline. Defaults
            to ``True``.
        background_refresh (bool): Refresh a stale or early value in a background thread
            (or task), so every caller gets the stored value at once. False: the first
            caller in each process that sees it refreshes inline and gets the new value.
            Defaults to ``True``.
        early_refresh (bool): Refresh hot values before *ttl* with XFetch's probability,
            which grows as expiry nears and with the stored computation time, so a hot
            key is recomputed (once, under the lock) before anyone misses it. Defaults
            to ``False``.
        beta (float): XFetch's eagerness (only with *early_refresh*): above 1 refreshes
            earlier, below 1 later. A factor, not seconds. Defaults to ``1.0``.
        cache_none (bool): Store a None result like any other (True), or not at all;
            applies before *should_cache*. Defaults to ``True``.
        should_cache (Callable[[Any], bool] | None): Called with each computed value;
            store it only if it returns True (e.g. ``lambda r: r.ok``). Values not
            stored are still returned. Defaults to ``None``.
        ttl_jitter (float): Cut each stored value's *ttl* (a function's answer too) by
            a fraction of up to this much (0.1: up to a tenth), drawn per key and
            store, so that keys stored together do not expire together; every process
            judges an entry alike. 0 to 0.9. Defaults to ``0``.
        tags (Sequence[str] | Callable[..., Iterable[str]] | None): Tags of each
            stored value: ``str.format`` templates over parameter names
            (``("user:{user_id}", "org:{org}")``), or a callable taking the computed
            value and then the function's arguments, returning tags.
            ``backend.invalidate_tag("user:42")`` then invalidates every value
            carrying the tag, in every process, as finally as ``invalidate()``, in
            one write. On a Redis Cluster a tagged hit or store takes one more
            round trip (a tag's stamp lives in a slot of its own). Defaults to
            ``None``.
        cache_errors (Mapping[type[Exception], float] | None): Failures to cache,
            by exception class (subclasses included): ``{TimeoutError: 5.0}`` stores
            a ``TimeoutError`` for 5 s in place of the value, so every caller, in
            every process, gets it raised again (rebuilt from its type and message;
            `CachedFailureError` if it cannot be) and the function is called at most
            once per key per period. Never over a stored value: a failed refresh
            serves the stale one. Defaults to ``None``.
        refresh_backoff (float): Seconds this process serves the stale value
            without calling the function again after a refresh failed, so a failing
            origin is not called on every request. 0 retries at once. Defaults to
            ``5.0``.
        metrics (MetricsHook | None): Called with every `stampede_guard.metrics` event,
            e.g. `StampedeStats`. Defaults to ``None``.
        namespace (str | None): Put before every key (``"<namespace>:<key>"``), e.g. a
            version or tenant. Defaults to ``None``.

    Returns:
        A decorator; the decorated function keeps its signature (an ``async def``
        stays awaitable) and gains ``invalidate``, ``refresh``, ``get_cached`` and
        ``bypass`` (awaitable for an ``async def``) and ``cache_key``, all taking the
        function's arguments.

    Raises:
        ValueError: A number is out of range, *on_timeout* is unknown, or *key* names a
            parameter the function lacks.
        TypeError: An option is misspelled or unknown (the message names the nearest
            one), an argument has the wrong type, the function is a generator
            function, or the backend cannot serve the function (an ``async def`` on
            `RedisBackend`, a plain function on `AsyncRedisBackend`).
    """
    check_option_names(options)
    checked_backend = check_backend(backend)
    metrics = options.get("metrics")
    context = Context(
        validated_policy(options),
        safe_emitter(check_metrics(metrics)),
        observed=metrics is not None,
        breaker_for=breakers_of(checked_backend),
        wall_clock=clock_of(checked_backend),
    )
    checked_key = check_key(options.get("key"))
    checked_namespace = validate_namespace(options.get("namespace"))
    tags = options.get("tags")
    if tags is not None:
        check_tag_backend(checked_backend)

    def decorate(fn: Callable[..., Any]) -> Any:
        check_function(fn)
        is_async = check_pairing(fn, checked_backend)
        keys = KeyMaker(fn, checked_key, checked_namespace)
        tagger = None if tags is None else TagMaker(fn, tags, keys.function_id)
        if is_async:
            return make_async(fn, keys, checked_backend, context, tagger)  # type: ignore[arg-type]
        return make_sync(fn, keys, checked_backend, context, tagger)  # type: ignore[arg-type]

    return decorate
