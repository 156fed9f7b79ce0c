"""Validation of the decorator's options, at decoration time, with messages that say the fix."""

from __future__ import annotations

import difflib
import inspect
import math
import warnings
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, cast

from stampede_guard._breaker import CircuitBreaker
from stampede_guard._cache_options import (
    DEFAULTS,
    MAX_SECONDS,
    OnBackendError,
    OnCancel,
    OnTimeout,
    Seconds,
)
from stampede_guard._clock import StepFreeClock
from stampede_guard._context import RENEWAL_LIMIT, Policy, own_breaker
from stampede_guard._failures import Failures, check_cache_errors
from stampede_guard.backends._protocol import (
    AsyncBackend,
    AsyncTagBackend,
    Backend,
    TagBackend,
)
from stampede_guard.backends.memory import default_backend
from stampede_guard.metrics import MetricsHook

__all__ = [
    "breakers_of",
    "check_backend",
    "check_function",
    "check_key",
    "check_metrics",
    "check_option_names",
    "check_pairing",
    "check_tag_backend",
    "clock_of",
    "validated_policy",
]

# The checks below take `object`: they exist for callers whose types mypy never saw.


def check_backend(backend: object) -> Backend | AsyncBackend:
    if backend is None:
        return default_backend()
    if not isinstance(backend, Backend | AsyncBackend):
        msg = (
            f"backend={backend!r} is not a stampede_guard backend (it needs get, "
            "get_or_lock, set, set_and_unlock, unlock and delete, or their async "
            "a-prefixed twins); use MemoryBackend(), RedisBackend.from_url(url) or "
            "AsyncRedisBackend.from_url(url)"
        )
        raise TypeError(msg)
    return backend


def check_tag_backend(backend: Backend | AsyncBackend) -> None:
    """Refuse ``tags=`` on a backend that cannot keep them, naming the fix."""
    if not isinstance(backend, TagBackend | AsyncTagBackend):
        msg = f"tags= needs a backend that keeps tags, and backend={backend!r} has no invalidate_tag; use MemoryBackend, RedisBackend or AsyncRedisBackend"
        raise TypeError(msg)


def breakers_of(backend: Backend | AsyncBackend) -> Callable[[str], CircuitBreaker]:
    """Return the backend's circuit breakers (shared by its functions), or our own.

    A backend offers them as a ``breaker_for(key)`` method; one that offers none (an
    in-memory or third-party backend) gets one breaker for this function.
    """
    breaker_for = getattr(backend, "breaker_for", None)
    if callable(breaker_for):
        return cast("Callable[[str], CircuitBreaker]", breaker_for)
    return own_breaker()


def clock_of(backend: Backend | AsyncBackend) -> Callable[[], float]:
    """Return the clock entries on *backend* are stamped and judged fresh by.

    The backend's ``now()`` if it has one (Redis: the server's clock), else a clock of
    this function's that never steps with the host's.
    """
    now = getattr(backend, "now", None)
    if callable(now):
        return cast("Callable[[], float]", now)
    return StepFreeClock()


def check_function(fn: object) -> None:
    if not callable(fn):
        msg = f"@cached_stampede_safe(...) decorates a function, not {type(fn).__qualname__}"
        raise TypeError(msg)


def check_metrics(metrics: object) -> MetricsHook | None:
    if metrics is None or callable(metrics):
        return cast("MetricsHook | None", metrics)
    msg = f"metrics must be a MetricsHook (a callable taking an event), not {type(metrics).__qualname__}"
    raise TypeError(msg)


def check_key(key: object) -> str | Callable[..., str] | None:
    if key is None or isinstance(key, str) or callable(key):
        return cast("str | Callable[..., str] | None", key)
    msg = (
        f"key must be a str template, a callable or None, not {type(key).__qualname__}"
    )
    raise TypeError(msg)


def check_option_names(options: Mapping[str, object]) -> None:
    """Refuse an option the decorator does not have, naming the nearest one.

    ``**options`` would otherwise swallow a misspelling such as ``tll=60``, and the
    function would be cached with the default instead.
    """
    unknown = sorted(options.keys() - DEFAULTS.keys())
    if not unknown:
        return
    name = unknown[0]
    known = sorted([*DEFAULTS, "backend"])
    close = difflib.get_close_matches(name, known, n=1)
    fix = (
        f"did you mean {close[0]}=?" if close else f"its options are {', '.join(known)}"
    )
    msg = f"cached_stampede_safe() got an unexpected keyword argument {name!r}; {fix}"
    raise TypeError(msg)


def validated_policy(options: Mapping[str, object]) -> Policy:
    """Validate the decorator's options into a `Policy`; raise with the fix on bad ones.

    An option left out takes its value from `DEFAULTS`; *key*, *tags*, *metrics* and
    *namespace* are not the policy's and are checked elsewhere.
    """
    given: dict[str, object] = {**DEFAULTS, **options}
    lock = _seconds("lock_timeout", given["lock_timeout"])
    renewal = _flag("lock_renewal", given["lock_renewal"])
    # A renewed lock can stay alive for RENEWAL_LIMIT leases; waiters wait as long.
    patience = lock * RENEWAL_LIMIT if renewal else lock
    wait_timeout = given["wait_timeout"]
    beta = _seconds("beta", given["beta"])
    early = _flag("early_refresh", given["early_refresh"])
    if beta != 1.0 and not early:
        warnings.warn(
            f"beta={beta} has no effect without early_refresh=True", stacklevel=3
        )
    should_cache = given["should_cache"]
    if should_cache is not None and not callable(should_cache):
        msg = f"should_cache must be a callable taking the value and returning a bool, not {type(should_cache).__qualname__}"
        raise TypeError(msg)
    validated = Policy(
        ttl=_per_value("ttl", given["ttl"]),
        lock_timeout=lock,
        wait_timeout=patience
        if wait_timeout is None
        else _seconds("wait_timeout", wait_timeout),
        base_delay=_seconds("base_delay", given["base_delay"]),
        max_delay=_seconds("max_delay", given["max_delay"]),
        max_retries=_retries(given["max_retries"]),
        on_timeout=_on_timeout(given["on_timeout"]),
        on_backend_error=_on_backend_error(given["on_backend_error"]),
        on_cancel=_on_cancel(given["on_cancel"]),
        lock_renewal=renewal,
        stale_ttl=_per_value("stale_ttl", given["stale_ttl"], zero=True),
        stale_if_error=_flag("stale_if_error", given["stale_if_error"]),
        background_refresh=_flag("background_refresh", given["background_refresh"]),
        beta=beta if early else None,
        cache_none=_flag("cache_none", given["cache_none"]),
        should_cache=cast("Callable[[Any], bool] | None", should_cache),
        ttl_jitter=_jitter(given["ttl_jitter"]),
        failures=Failures(check_cache_errors(given["cache_errors"])),
        refresh_backoff=0.0
        if given["refresh_backoff"] == 0
        else _seconds("refresh_backoff", given["refresh_backoff"]),
    )
    if validated.max_delay < validated.base_delay:
        msg = (
            f"max_delay={validated.max_delay} is shorter than base_delay={validated.base_delay}; "
            "max_delay caps the backoff, so make it at least base_delay"
        )
        raise ValueError(msg)
    if not callable(validated.ttl) and validated.ttl < validated.lock_timeout:
        warnings.warn(
            f"ttl={validated.ttl} is shorter than lock_timeout={validated.lock_timeout}: a value "
            "may expire before a crashed holder's lock does; usually ttl is much longer",
            stacklevel=3,
        )
    return validated


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        msg = f"{name} must be True or False, not {value!r}"
        raise TypeError(msg)
    return value


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


def _on_backend_error(value: object) -> OnBackendError:
    if value == "compute" or value == "raise":  # noqa: PLR1714 - narrows to the Literal
        return value
    msg = f"on_backend_error={value!r} is not one of 'compute' (serve the call without the cache) or 'raise' (BackendError)"
    raise ValueError(msg)


def _on_cancel(value: object) -> OnCancel:
    if value == "finish" or value == "cancel":  # noqa: PLR1714 - narrows to the Literal
        return value
    msg = f"on_cancel={value!r} is not one of 'finish' (a cancelled caller's computation goes on and is stored) or 'cancel' (it is cancelled with the caller)"
    raise ValueError(msg)


def _jitter(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        msg = f"ttl_jitter must be a fraction of ttl (a number from 0 to 0.9), not {type(value).__qualname__}"
        raise TypeError(msg)
    if not 0 <= value <= 0.9:  # noqa: PLR2004 - a ttl cut to nothing is no ttl
        msg = f"ttl_jitter={value!r} is out of range: give the most of ttl to cut, from 0 (none) to 0.9; 0.1 spreads expiries over the last tenth of ttl"
        raise ValueError(msg)
    return float(value)


def _per_value(name: str, value: object, *, zero: bool = False) -> Seconds:
    """Check *ttl* or *stale_ttl*: seconds (0 allowed with *zero*), or a function of the value.

    A function is called with each computed value, and its answer is checked then
    (see `Policy.store_ttl_for`); here, only that it takes one argument.
    """
    if callable(value):
        try:
            inspect.signature(value).bind(None)
        except TypeError:
            msg = f"{name}={value!r} must take one argument, the computed value, and return its seconds: lambda value: value.max_age"
            raise TypeError(msg) from None
        except ValueError:  # no signature to read (some builtins): asked at run time
            pass
        return cast("Callable[[Any], float]", value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        msg = f"{name} must be a number of seconds or a function of the computed value returning seconds (lambda value: value.max_age), not {type(value).__qualname__}"
        raise TypeError(msg)
    return 0.0 if zero and value == 0 else _seconds(name, value)


def _seconds(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        msg = f"{name} must be a number of seconds, not {type(value).__qualname__}"
        raise TypeError(msg)
    if not math.isfinite(value) or not 0.001 <= value <= MAX_SECONDS:  # noqa: PLR2004
        msg = (
            f"{name}={value!r} is out of range: give a finite number of seconds, at "
            f"least 0.001 and at most {MAX_SECONDS:,} (100 years)"
        )
        raise ValueError(msg)
    return float(value)


def check_pairing(fn: Callable[..., object], backend: Backend | AsyncBackend) -> bool:
    """Return whether *fn* is async, after checking that *backend* can serve it.

    Raises:
        TypeError: *fn* is a generator function, or *backend* lacks the methods for
            *fn*'s kind (an async function on `RedisBackend`, a sync one on
            `AsyncRedisBackend`).
    """
    name = getattr(fn, "__qualname__", repr(fn))
    # A callable object is judged by its __call__ (partials are unwrapped by inspect).
    call = fn if inspect.isroutine(fn) or isinstance(fn, partial) else type(fn).__call__
    if inspect.isgeneratorfunction(call) or inspect.isasyncgenfunction(call):
        msg = f"{name} is a generator function: its generator cannot be cached; return a list instead"
        raise TypeError(msg)
    is_async = inspect.iscoroutinefunction(call)
    if is_async and not isinstance(backend, AsyncBackend):
        msg = f"{name} is async, but backend={backend!r} has no async methods; use AsyncRedisBackend (or MemoryBackend, which serves both)"
        raise TypeError(msg)
    if not is_async and not isinstance(backend, Backend):
        msg = f"{name} is not async, but backend={backend!r} only serves async functions; use RedisBackend (or MemoryBackend, which serves both)"
        raise TypeError(msg)
    return is_async
