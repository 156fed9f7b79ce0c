"""The decorator's options, declared once: their types and their defaults.

`CacheOptions` types the ``**options`` of every `cached_stampede_safe` overload
(PEP 692), `DEFAULTS` says what an option left out means, `validated_policy` reads
both, and `Policy` takes its defaults from `DEFAULTS`. Tests hold the decorator's
docstring and the README's option table to these two, so none can drift. Only
*backend* is declared apart, because the overloads tell sync from async by its type.

This module imports no backend, so the plan's `Policy` can import it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final, Literal, TypeAlias, TypedDict

from stampede_guard.metrics import MetricsHook

__all__ = [
    "DEFAULTS",
    "MAX_SECONDS",
    "CacheOptions",
    "OnBackendError",
    "OnCancel",
    "OnTimeout",
    "Seconds",
]

OnTimeout = Literal["compute", "raise"]
"""What a waiter does when its wait runs out."""

OnBackendError = Literal["compute", "raise"]
"""What a call does when the backend fails."""

OnCancel = Literal["finish", "cancel"]
"""What becomes of a cancelled asyncio caller's computation."""

Seconds: TypeAlias = float | Callable[[Any], float]
"""A duration set per value (*ttl*, *stale_ttl*): seconds, or a function of the value."""

# The longest duration any option takes: a hundred years. Every backend holds it
# (Redis's PX takes up to 2**63 ms, about 292 million years, minus the clock); a
# larger one, such as 1e16, overflowed Redis's expiry and every store failed.
MAX_SECONDS: Final = 100 * 365 * 24 * 3600


class CacheOptions(TypedDict, total=False):
    """The keyword options of `cached_stampede_safe`, all optional, besides *backend*.

    Also for code that wraps the decorator and passes options on, typed:
    ``def my_cache(**options: Unpack[CacheOptions])``. What each one does, and its
    default, is in `cached_stampede_safe`'s docstring.
    """

    key: str | Callable[..., str] | None
    ttl: float | Callable[[Any], float]
    lock_timeout: float
    wait_timeout: float | None
    base_delay: float
    max_delay: float
    max_retries: int | None
    on_timeout: OnTimeout
    on_backend_error: OnBackendError
    on_cancel: OnCancel
    lock_renewal: bool
    stale_ttl: float | Callable[[Any], float]
    stale_if_error: bool
    background_refresh: bool
    early_refresh: bool
    beta: float
    cache_none: bool
    should_cache: Callable[[Any], bool] | None
    ttl_jitter: float
    tags: Sequence[str] | Callable[..., Iterable[str]] | None
    cache_errors: Mapping[type[Exception], float] | None
    refresh_backoff: float
    metrics: MetricsHook | None
    namespace: str | None


# What each option left out means. Never mutated: readers merge it, as in
# `{**DEFAULTS, **options}`. A test checks that it has every key of CacheOptions.
DEFAULTS: Final[CacheOptions] = {
    "key": None,
    "ttl": 900,
    "lock_timeout": 10,
    "wait_timeout": None,  # lock_timeout, or RENEWAL_LIMIT leases with lock_renewal
    "base_delay": 0.1,
    "max_delay": 1.6,
    "max_retries": None,
    "on_timeout": "compute",
    "on_backend_error": "compute",
    "on_cancel": "finish",
    "lock_renewal": False,
    "stale_ttl": 0,
    "stale_if_error": True,
    "background_refresh": True,
    "early_refresh": False,
    "beta": 1.0,
    "cache_none": True,
    "should_cache": None,
    "ttl_jitter": 0,
    "tags": None,
    "cache_errors": None,
    "refresh_backoff": 5.0,
    "metrics": None,
    "namespace": None,
}
