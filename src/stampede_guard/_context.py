"""What a plan runs with: the validated policy, the context, and the types they share."""

from __future__ import annotations

import enum
import hashlib
import logging
import math
import os
import random
import secrets
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any, Final

from stampede_guard._breaker import CircuitBreaker
from stampede_guard._cache_options import (
    DEFAULTS,
    MAX_SECONDS,
    OnBackendError,
    OnCancel,
    OnTimeout,
    Seconds,
)
from stampede_guard._entry import CachedFailure, Entry
from stampede_guard._failures import NO_FAILURES, Failures
from stampede_guard._ops import Op
from stampede_guard.metrics import _Emit

__all__ = [
    "MISS",
    "RENEWAL_LIMIT",
    "Context",
    "Plan",
    "Policy",
    "Served",
    "Via",
    "own_breaker",
]

# With lock_renewal, a lock is renewed for at most this many leases: a computation
# that hangs cannot keep the key from everyone else for ever.
RENEWAL_LIMIT = 10


class Via(enum.Enum):
    """How a plan came by the value it returns, which tells who else may have it."""

    CACHE = "cache"  # read from the cache: a hit
    COMPUTED = "computed"  # computed, or waited for, and stored (or not to be stored)
    PRIVATE = "private"  # computed but refused by the store: its own caller's only


# What a plan returns: the value and how it came by it. Callers that shared this call
# in-process count themselves by it, and do not take a PRIVATE value: the backend
# refused it because a newer value or an invalidation came after it began.
Served = tuple[object, Via]
Plan = Generator[Op, Any, Served]


class _Miss(enum.Enum):
    MISS = "miss"


MISS: Final = _Miss.MISS


@dataclass(frozen=True, slots=True)
class Policy:
    """The decorator's validated options (durations in seconds), as the plan reads them.

    Built by `validated_policy` from `CacheOptions`; the defaults are the decorator's
    own (`DEFAULTS`), so a test's ``Policy(...)`` behaves as the decorator would.
    *ttl* and *stale_ttl* may be functions of the value (see `store_ttl_for`): every
    question of how long a value lives goes through `fresh_for` and `store_ttl_for`.
    """

    ttl: Seconds
    lock_timeout: float
    wait_timeout: float  # resolved: never None
    base_delay: float
    max_delay: float
    max_retries: int | None
    on_timeout: OnTimeout
    on_backend_error: OnBackendError = DEFAULTS["on_backend_error"]
    on_cancel: OnCancel = DEFAULTS["on_cancel"]
    lock_renewal: bool = DEFAULTS["lock_renewal"]
    stale_ttl: Seconds = DEFAULTS["stale_ttl"]
    stale_if_error: bool = DEFAULTS["stale_if_error"]
    background_refresh: bool = DEFAULTS["background_refresh"]
    beta: float | None = None  # early_refresh and beta in one: XFetch's beta, or None
    cache_none: bool = DEFAULTS["cache_none"]
    should_cache: Callable[[Any], bool] | None = DEFAULTS["should_cache"]
    ttl_jitter: float = DEFAULTS["ttl_jitter"]
    failures: Failures = NO_FAILURES  # cache_errors: which failures are stored
    refresh_backoff: float = DEFAULTS["refresh_backoff"]

    @property
    def refreshes(self) -> bool:
        """Whether a stored value can be due for a refresh (stale or early)."""
        # A stale_ttl of the value may give some values a stale period: judge them all.
        return callable(self.stale_ttl) or self.stale_ttl > 0 or self.beta is not None

    @property
    def lease_limit(self) -> float:
        """The longest a computation may keep its lock: one lease, or the renewals'."""
        return self.lock_timeout * (RENEWAL_LIMIT if self.lock_renewal else 1)

    def fresh_for(self, key: str, entry: Entry) -> float:
        """Seconds *entry* (stored under *key*) stays fresh after its ``created_at``.

        Its ``ttl`` (asked of its value, if *ttl* is a function of the value: the
        writer and every reader ask the same function of the same value, so they
        agree, and no field is added to what is stored). With *ttl_jitter*, shortened
        by a fraction of up to *ttl_jitter*, drawn from a digest of the key and the
        store's time: keys stored together expire apart, and every process, reading
        the same entry, judges it alike. 0 for a value whose ttl says not to cache it.

        Raises:
            TypeError, ValueError: A *ttl* function returned no number of seconds.
        """
        if type(entry.value) is CachedFailure:  # not the function's: it lives as stored
            return float(MAX_SECONDS)
        return self._jittered(key, entry.created_at, self._ttl_of(key, entry.value))

    def store_ttl_for(self, key: str, entry: Entry) -> float | None:
        """How long the backend keeps *entry*: fresh (`fresh_for`), then stale; or None.

        None: the value is not to be stored at all (``cache_none``, ``should_cache``,
        or a *ttl* function that returned 0 for it). The one place a store is decided,
        so the single plan and the batch decide alike.

        Raises:
            TypeError, ValueError: A *ttl* or *stale_ttl* function returned no number
                of seconds; whatever such a function raised, with a note. Raised after
                the computation, so the caller that computed releases its lock.
        """
        if not self.caches(entry.value):
            return None
        ttl = self._ttl_of(key, entry.value)
        if not ttl:
            return None
        fresh = self._jittered(key, entry.created_at, ttl)
        return fresh + _asked("stale_ttl", self.stale_ttl, key, entry.value)

    def caches(self, value: object) -> bool:
        """Whether *value* is to be stored at all, by ``cache_none`` and ``should_cache``."""
        if value is None and not self.cache_none:
            return False
        return self.should_cache is None or bool(self.should_cache(value))

    def _ttl_of(self, key: str, value: object) -> float:
        return _asked("ttl", self.ttl, key, value)

    def _jittered(self, key: str, created_at: float, ttl: float) -> float:
        if not self.ttl_jitter:
            return ttl
        digest = hashlib.blake2b(f"{key}\0{created_at!r}".encode(), digest_size=8)
        fraction = int.from_bytes(digest.digest()) / 2**64
        return ttl * (1.0 - self.ttl_jitter * fraction)


# A duration under a millisecond, the backends' resolution (Redis's PX), is kept as 0.
_SHORTEST = 0.001


def _asked(name: str, setting: Seconds, key: str, value: object) -> float:
    """Return *setting*'s seconds for *value*: the number, or the function's answer.

    A function's answer is checked as the decorator checks a number, except that 0
    is allowed (*ttl*: not stored; *stale_ttl*: no stale period), and so is anything
    under a millisecond, which counts as 0: a value good for less than the backends
    can keep it is not kept, rather than kept past the lifetime it states.
    """
    if not callable(setting):
        return setting
    try:
        seconds = setting(value)
    except Exception as exc:
        exc.add_note(
            f"raised by the {name} function, asked how long the value of cache key "
            f"{key!r} lives; it must return seconds for any value the function returns"
        )
        raise
    what = (
        f"the {name} function returned {seconds!r} for the value of cache key {key!r}"
    )
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        msg = f"{what}, not a number of seconds; return an int or a float (0: {_ZERO[name]})"
        raise TypeError(msg)
    if not math.isfinite(seconds) or not 0 <= seconds <= MAX_SECONDS:
        msg = (
            f"{what}, out of range; return a finite number of seconds from 0 "
            f"({_ZERO[name]}) to {MAX_SECONDS:,} (100 years)"
        )
        raise ValueError(msg)
    return float(seconds) if seconds >= _SHORTEST else 0.0


_ZERO: Final = {"ttl": "do not cache this value", "stale_ttl": "no stale period"}


def own_breaker(
    clock: Callable[[], float] = time.monotonic,
    logger: logging.Logger = logging.getLogger("stampede_guard"),  # noqa: B008 - one, shared
) -> Callable[[str], CircuitBreaker]:
    """One breaker for every key: for a backend that brings none (see `Context`).

    A test passes the plan's *clock* (and *logger*), so the breaker opens and closes
    on the same fake time as the plan that feeds it.
    """
    breaker = CircuitBreaker(clock=clock, logger=logger)
    return lambda _key: breaker


# The library's own draws (backoff jitter, XFetch), apart from the `random` module's
# shared generator: a user who seeds it for a reproducible run is not thrown off by
# cache waits, and nothing the library does moves it (Hypothesis reports a strategy
# whose global random state moved meanwhile). Reseeded in a forked child, as the
# module's is, so forked workers do not draw the same jitter.
_DRAWS = random.Random()  # noqa: S311 - jitter, not security
os.register_at_fork(after_in_child=_DRAWS.seed)


def _new_token() -> str:
    # 128 random bits per acquisition; unlike uuid1 it leaks no MAC address or time.
    return secrets.token_hex(16)


@dataclass(frozen=True, slots=True)
class Context:
    """What a plan needs besides its key: the policy, where events go, and clocks.

    Everything a plan would otherwise take from the process (the clocks, the token
    and jitter sources, its logger) is a parameter, so a test can step a plan exactly
    and the same answers always give the same operations.
    *breaker_for* returns the circuit breaker of the server a key's commands go to:
    the backend's own (shared by every function on it, one per node of a cluster),
    or, for a backend that brings none, one of this function's.
    """

    policy: Policy
    emit: _Emit
    observed: bool = True  # False when no metrics hook listens
    clock: Callable[[], float] = time.monotonic
    wall_clock: Callable[[], float] = time.time
    new_token: Callable[[], str] = field(default=_new_token)
    random: Callable[[], float] = _DRAWS.random  # jitter and XFetch draws, in [0, 1)
    logger: logging.Logger = field(
        default_factory=lambda: logging.getLogger("stampede_guard")
    )
    breaker_for: Callable[[str], CircuitBreaker] = field(default_factory=own_breaker)
    # Derived, for the hot path: a hit is served as found, with nothing to report and
    # no refresh to judge (see `_call.first_look`).
    plain_hits: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        plain = not self.observed and not self.policy.refreshes
        object.__setattr__(self, "plain_hits", plain)
