"""The `cached_stampede_safe` decorator and the typed object it returns."""

from __future__ import annotations

import functools
import inspect
import math
import types
import warnings
from collections.abc import Callable
from typing import (
    Any,
    Concatenate,
    Generic,
    Literal,
    ParamSpec,
    Protocol,
    Self,
    TypeVar,
    cast,
    overload,
)

from stampede_guard._drivers import run_sync
from stampede_guard._keys import KeyMaker, validate_namespace
from stampede_guard._plan import Context, Policy, plan
from stampede_guard.backends._protocol import Backend
from stampede_guard.backends.memory import default_backend
from stampede_guard.metrics import MetricsHook, safe_emitter

__all__ = ["CachedFunction", "cached_stampede_safe"]

P = ParamSpec("P")
P2 = ParamSpec("P2")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)
S = TypeVar("S")

OnTimeout = Literal["compute", "raise"]


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


class _Cached(Generic[P, R]):
    """The object `cached_stampede_safe` puts in place of the function."""

    def __init__(
        self, fn: Callable[P, R], keys: KeyMaker, backend: Backend, context: Context
    ) -> None:
        functools.update_wrapper(self, fn)
        self._fn = fn
        self._keys = keys
        self._backend = backend
        self._context = context

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        key = self._keys(args, kwargs)
        fn = self._fn
        value = run_sync(
            plan(key, self._context), self._backend, lambda: fn(*args, **kwargs)
        )
        return cast("R", value)

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> None:
        self._backend.delete(self._keys(args, kwargs))

    def cache_key(self, *args: P.args, **kwargs: P.kwargs) -> str:
        return self._keys(args, kwargs)

    def __get__(self, instance: object, owner: type[Any] | None = None) -> Any:
        return self if instance is None else _BoundCached(self, instance)

    def __repr__(self) -> str:
        return f"<stampede-safe {self._fn!r} on {self._backend!r}>"


class _BoundCached:
    """A decorated method looked up on an instance: every helper gets *instance* first."""

    __slots__ = ("__wrapped__", "_cached", "_instance")

    def __init__(self, cached: _Cached[..., Any], instance: object) -> None:
        self._cached = cached
        self._instance = instance
        self.__wrapped__ = types.MethodType(cached.__wrapped__, instance)  # type: ignore[attr-defined]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._cached(self._instance, *args, **kwargs)

    def invalidate(self, *args: Any, **kwargs: Any) -> None:
        self._cached.invalidate(self._instance, *args, **kwargs)

    def cache_key(self, *args: Any, **kwargs: Any) -> str:
        return self._cached.cache_key(self._instance, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<bound {self._cached!r} of {self._instance!r}>"


def cached_stampede_safe(
    *,
    key: str | Callable[..., str] | None = None,
    ttl: float = 900,
    lock_timeout: float = 10,
    wait_timeout: float | None = None,
    base_delay: float = 0.1,
    max_delay: float = 1.6,
    max_retries: int | None = None,
    on_timeout: OnTimeout = "compute",
    backend: Backend | None = None,
    metrics: MetricsHook | None = None,
    namespace: str | None = None,
) -> Callable[[Callable[P, R]], CachedFunction[P, R]]:
    """Cache a function so that concurrent misses of one key compute it only once.

    The first caller to miss takes a lock, computes and stores the value; the others
    wait (backing off from *base_delay* to *max_delay*, with jitter) and are served
    the stored value.

    Args:
        key: How a call's arguments become its cache key: a ``str.format`` template
            over parameter names (``"weather:{city}"``, ``"user:{user.id}"``), a
            callable taking the function's arguments and returning a str, or None for
            ``module:qualname:<digest of the arguments>``, the same in every process.
        ttl: Seconds a value stays cached; then the next call computes it again.
        lock_timeout: Seconds the lock outlives a holder that died. Must exceed the
            computation time, or a second caller starts computing while the first
            still runs.
        wait_timeout: Seconds a caller waits for another's computation before
            *on_timeout* applies. Defaults to *lock_timeout*.
        base_delay: First backoff delay, in seconds; each next one doubles.
        max_delay: Longest backoff delay, in seconds.
        max_retries: If given, a waiter also gives up after this many retries.
        on_timeout: What a waiter does when its wait runs out: ``"compute"`` the value
            itself (and store it), or ``"raise"`` `LockTimeoutError`.
        backend: Where values and locks live. Defaults to one in-memory backend per
            process; use `RedisBackend` to coordinate processes and hosts.
        metrics: Called with every `stampede_guard.metrics` event, e.g. `StampedeStats`.
        namespace: Put before every key (``"<namespace>:<key>"``), e.g. a version
            or tenant.

    Returns:
        A decorator; the decorated function keeps its signature and gains
        ``invalidate(*args, **kwargs)`` and ``cache_key(*args, **kwargs)``.

    Raises:
        ValueError: A number is out of range, *on_timeout* is unknown, or *key* names a
            parameter the function lacks.
        TypeError: An argument has the wrong type, or the function is a coroutine
            function or a generator function.
    """
    policy = _policy(
        ttl=ttl,
        lock_timeout=lock_timeout,
        wait_timeout=wait_timeout,
        base_delay=base_delay,
        max_delay=max_delay,
        max_retries=max_retries,
        on_timeout=on_timeout,
    )
    checked_backend = _check_backend(backend)
    context = Context(policy, safe_emitter(_check_metrics(metrics)))
    checked_key = _check_key(key)
    namespace = validate_namespace(namespace)

    def decorate(fn: Callable[P, R]) -> CachedFunction[P, R]:
        _check_function(fn)
        if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
            msg = f"{fn.__qualname__} is async; async functions are not supported yet"
            raise TypeError(msg)
        if inspect.isgeneratorfunction(fn):
            msg = f"{fn.__qualname__} is a generator function: its generator cannot be cached; return a list instead"
            raise TypeError(msg)
        cached = _Cached(
            fn, KeyMaker(fn, checked_key, namespace), checked_backend, context
        )
        return cast("CachedFunction[P, R]", cached)

    return decorate


# The checks below take `object`: they exist for callers whose types mypy never saw.


def _check_backend(backend: object) -> Backend:
    if backend is None:
        return default_backend()
    if not isinstance(backend, Backend):
        msg = (
            f"backend={backend!r} is not a stampede_guard backend (it needs get, "
            "get_or_lock, set, set_and_unlock, unlock and delete); use MemoryBackend() "
            "or RedisBackend.from_url(url)"
        )
        raise TypeError(msg)
    return backend


def _check_function(fn: object) -> None:
    if not callable(fn):
        msg = f"@cached_stampede_safe(...) decorates a function, not {type(fn).__qualname__}"
        raise TypeError(msg)


def _check_metrics(metrics: object) -> MetricsHook | None:
    if metrics is None or callable(metrics):
        return cast("MetricsHook | None", metrics)
    msg = f"metrics must be a MetricsHook (a callable taking an event), not {type(metrics).__qualname__}"
    raise TypeError(msg)


def _check_key(key: object) -> str | Callable[..., str] | None:
    if key is None or isinstance(key, str) or callable(key):
        return cast("str | Callable[..., str] | None", key)
    msg = (
        f"key must be a str template, a callable or None, not {type(key).__qualname__}"
    )
    raise TypeError(msg)


def _policy(
    *,
    ttl: object,
    lock_timeout: object,
    wait_timeout: object,
    base_delay: object,
    max_delay: object,
    max_retries: object,
    on_timeout: object,
) -> Policy:
    lock = _seconds("lock_timeout", lock_timeout)
    policy = Policy(
        ttl=_seconds("ttl", ttl),
        lock_timeout=lock,
        wait_timeout=lock
        if wait_timeout is None
        else _seconds("wait_timeout", wait_timeout),
        base_delay=_seconds("base_delay", base_delay),
        max_delay=_seconds("max_delay", max_delay),
        max_retries=_retries(max_retries),
        on_timeout=_on_timeout(on_timeout),
    )
    if policy.max_delay < policy.base_delay:
        msg = (
            f"max_delay={policy.max_delay} is shorter than base_delay={policy.base_delay}; "
            "max_delay caps the backoff, so make it at least base_delay"
        )
        raise ValueError(msg)
    if policy.ttl < policy.lock_timeout:
        warnings.warn(
            f"ttl={policy.ttl} is shorter than lock_timeout={policy.lock_timeout}: a value "
            "may expire before a crashed holder's lock does; usually ttl is much longer",
            stacklevel=3,
        )
    return policy


def _retries(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        msg = f"max_retries must be an int or None, not {type(value).__qualname__}"
        raise TypeError(msg)
    if value < 0:
        msg = f"max_retries={value} is negative; use 0 to give up after the first look, or None to wait until wait_timeout"
        raise ValueError(msg)
    return value


def _on_timeout(value: object) -> OnTimeout:
    if value == "compute" or value == "raise":  # noqa: PLR1714 - narrows to the Literal
        return value
    msg = f"on_timeout={value!r} is not one of 'compute' (the waiter computes the value itself) or 'raise' (LockTimeoutError)"
    raise ValueError(msg)


def _seconds(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        msg = f"{name} must be a number of seconds, not {type(value).__qualname__}"
        raise TypeError(msg)
    if not math.isfinite(value) or value < 0.001:  # noqa: PLR2004
        msg = f"{name}={value!r} is out of range: give a finite number of seconds, at least 0.001"
        raise ValueError(msg)
    return float(value)
