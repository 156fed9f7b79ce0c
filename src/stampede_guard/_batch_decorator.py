"""`cached_stampede_safe_batch`: many ids in one call, each computed once across processes."""

from __future__ import annotations

import dataclasses
import difflib
import functools
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from typing import Any, Literal, Protocol, TypedDict, TypeVar, overload

from typing_extensions import Unpack

from stampede_guard._batch import BatchKeys, of_form
from stampede_guard._batch import caches as batch_caches
from stampede_guard._batch_wrappers import AsyncBatchCached, BatchCached
from stampede_guard._context import Context
from stampede_guard._identity import function_id
from stampede_guard._keys import validate_namespace
from stampede_guard._options import (
    breakers_of,
    check_backend,
    check_function,
    check_metrics,
    check_pairing,
    check_tag_backend,
    clock_of,
    validated_policy,
)
from stampede_guard._tags import BatchTags
from stampede_guard.backends._protocol import AsyncBackend, Backend
from stampede_guard.metrics import MetricsHook, safe_emitter

__all__ = [
    "AsyncBatchFunction",
    "BatchFunction",
    "BatchOptions",
    "cached_stampede_safe_batch",
]

K = TypeVar("K")
V = TypeVar("V")


class BatchOptions(TypedDict, total=False):
    """The batch decorator's options: the single decorator's that make sense per id.

    See `cached_stampede_safe_batch` for what each does.
    """

    ttl: float | Callable[[Any], float]
    lock_timeout: float
    wait_timeout: float | None
    base_delay: float
    max_delay: float
    max_retries: int | None
    on_timeout: Literal["compute", "raise"]
    on_backend_error: Literal["compute", "raise"]
    stale_ttl: float | Callable[[Any], float]
    stale_if_error: bool
    background_refresh: bool
    early_refresh: bool
    beta: float
    cache_none: bool
    ttl_jitter: float
    tags: Sequence[str] | Callable[[Any, Any], Iterable[str]] | None
    metrics: MetricsHook | None
    namespace: str | None


_OPTIONS = frozenset(BatchOptions.__annotations__)


class BatchFunction(Protocol[K, V]):
    """A batch function made stampede-safe: ``ids -> {id: value}``."""

    def __call__(self, ids: Iterable[K], /) -> dict[K, V]:
        """Return the values of *ids* that have one, each computed once."""

    def invalidate(self, ids: Iterable[K], /) -> None:
        """Delete the cached values of *ids*."""

    def cache_key(self, id_: K, /) -> str:
        """Return the cache key of one id."""


class AsyncBatchFunction(Protocol[K, V]):
    """`BatchFunction` for an ``async def``."""

    async def __call__(self, ids: Iterable[K], /) -> dict[K, V]:
        """See `BatchFunction.__call__`."""

    async def invalidate(self, ids: Iterable[K], /) -> None:
        """See `BatchFunction.invalidate`."""

    def cache_key(self, id_: K, /) -> str:
        """See `BatchFunction.cache_key`."""


class BatchDecorator(Protocol):
    """Decorates ``def f(ids) -> Mapping[id, value]`` or its ``async def`` twin."""

    @overload
    def __call__(
        self, fn: Callable[[Sequence[K]], Coroutine[Any, Any, Mapping[K, V]]], /
    ) -> AsyncBatchFunction[K, V]: ...
    @overload
    def __call__(
        self, fn: Callable[[Sequence[K]], Mapping[K, V]], /
    ) -> BatchFunction[K, V]: ...


def cached_stampede_safe_batch(
    *,
    key: str,
    backend: Backend | AsyncBackend | None = None,
    **options: Unpack[BatchOptions],
) -> BatchDecorator:
    """Cache a batch function, ``ids -> {id: value}``, id by id, each computed once.

    The function is called with a list of ids and returns a mapping from those ids to
    their values; each id is cached under its own key (*key* filled with the id). A
    call is served from the cache for the ids stored there (one multi-get), and the
    function is called ONCE with exactly the missing ids whose locks this call took
    (one lock script for all of them); ids that another caller (another process, or
    another call of this one) is computing are waited for, as the single decorator's
    callers wait. Concurrent calls with overlapping ids share the overlap. Ids the
    function leaves out of its mapping have no value: they are left out of the result
    too, and remembered as having none (``cache_none=False``: asked for again on the
    next call). Repeated ids in a call are served once.

    Args:
        key: A ``str.format`` template with one field, the id: ``"user:{}"``.
        backend: As for `cached_stampede_safe`. Backends with batch methods
            (`BatchBackend`: the memory and Redis backends) serve a call in O(1) round
            trips; others, a key at a time.
        **options: As for `cached_stampede_safe` (see `BatchOptions`): *ttl*,
            *lock_timeout*, *wait_timeout*, *base_delay*, *max_delay*, *max_retries*,
            *on_timeout*, *on_backend_error*, *stale_ttl*, *stale_if_error*,
            *background_refresh*, *early_refresh*, *beta*, *cache_none*,
            *ttl_jitter*, *tags*, *metrics*, *namespace*. Events are per id (a
            `Hit`, `Miss`, `Computed`... for each). *tags* are templates over the
            id (``("user:{}",)``) or a callable of an id's value (None if it has
            none) and the id: ``backend.invalidate_tag("user:42")`` then
            invalidates that id's value, whatever function stored it.
            A *ttl* or *stale_ttl* function is asked of each id's value; an id with
            no value has none to ask, so with a *ttl* function it is not stored.

    Raises:
        ValueError: *key* has no field or more than one, or an option is out of range.
        TypeError: An option is unknown here (``lock_renewal``, ``on_cancel`` and
            ``should_cache`` are the single decorator's only), or the backend cannot
            serve the function.
    """
    _check_option_names(options)
    checked_backend = check_backend(backend)
    metrics = options.get("metrics")
    policy = validated_policy(options)
    # What the single plan stores for an id is the batch's stored form (see _batch).
    policy = dataclasses.replace(
        policy,
        should_cache=functools.partial(batch_caches, cache_none=policy.cache_none),
        ttl=of_form(policy.ttl),
        stale_ttl=of_form(policy.stale_ttl),
    )
    context = Context(
        policy,
        safe_emitter(check_metrics(metrics)),
        observed=metrics is not None,
        breaker_for=breakers_of(checked_backend),
        wall_clock=clock_of(checked_backend),
    )
    namespace = validate_namespace(options.get("namespace"))
    tags = options.get("tags")
    if tags is not None:
        check_tag_backend(checked_backend)

    def decorate(fn: Callable[..., Any]) -> Any:
        check_function(fn)
        is_async = check_pairing(fn, checked_backend)
        name = function_id(fn, mode="name")
        keys = BatchKeys(key, namespace, name)
        tagger = None if tags is None else BatchTags(tags, name)
        if is_async:
            return AsyncBatchCached(fn, keys, checked_backend, context, tagger)
        return BatchCached(fn, keys, checked_backend, context, tagger)

    return decorate


def _check_option_names(options: Mapping[str, object]) -> None:
    unknown = sorted(options.keys() - _OPTIONS)
    if not unknown:
        return
    name = unknown[0]
    known = sorted([*_OPTIONS, "backend", "key"])
    close = difflib.get_close_matches(name, known, n=1)
    fix = (
        f"did you mean {close[0]}=?" if close else f"its options are {', '.join(known)}"
    )
    msg = f"cached_stampede_safe_batch() got an unexpected keyword argument {name!r}; {fix}"
    raise TypeError(msg)
