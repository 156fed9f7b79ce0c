"""A `MetricsHook` that logs every event on one line, with the standard `logging` module.

For example, this function:

    import logging

    from stampede_guard import cached_stampede_safe
    from stampede_guard.contrib.logging import LoggingHook

    logging.basicConfig(level=logging.DEBUG)


    @cached_stampede_safe(key="weather:{city}", metrics=LoggingHook())
    def get_weather(city: str) -> dict[str, object]: ...

logs lines such as:

    DEBUG:stampede_guard.events:miss key=weather:Oslo
    DEBUG:stampede_guard.events:lock_wait key=weather:Oslo seconds=0.201 outcome=value

A line names the event and the cache key (quoted and escaped if it holds a line break
or another unprintable character), or with ``digest_keys=True`` a digest of the key
(for keys made from personal data), and the event's own fields. It never holds
a cached value, and of an exception only its type: a message can quote the data that
caused it.

Each record also carries the event name and the key (as logged) in the attributes
``stampede_guard_event`` and ``stampede_guard_key``, for filters and structured
formatters.
"""

from __future__ import annotations

import hashlib
import logging

from stampede_guard.metrics import (
    BackendFailed,
    BackendSkipped,
    Computed,
    ComputeError,
    Event,
    FailureCached,
    FailureServed,
    Hit,
    LockAcquired,
    LockWait,
    Miss,
    NearEvent,
    NearEviction,
    NearFlush,
    NearInvalidation,
    Refresh,
    RefreshFailed,
    StaleServed,
    Timeout,
    UnreadableEntry,
)

__all__ = ["LoggingHook", "key_digest"]

_EVENT_NAMES: dict[type[object], str] = {
    Hit: "hit",
    Miss: "miss",
    LockAcquired: "lock_acquired",
    LockWait: "lock_wait",
    Timeout: "timeout",
    Computed: "computed",
    ComputeError: "compute_error",
    StaleServed: "stale_served",
    Refresh: "refresh",
    RefreshFailed: "refresh_failed",
    BackendFailed: "backend_failed",
    BackendSkipped: "backend_skipped",
    UnreadableEntry: "unreadable_entry",
    FailureCached: "failure_cached",
    FailureServed: "failure_served",
    NearEviction: "near_eviction",
    NearInvalidation: "near_invalidation",
    NearFlush: "near_flush",
}


def key_digest(key: str) -> str:
    """Return a short, stable digest of *key*: ``blake2b:`` and 16 hex digits.

    The same key gives the same digest in every process, so the lines of one key can
    be followed without logging the key itself.
    """
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8)
    return f"blake2b:{digest.hexdigest()}"


def _error_type(error: BaseException) -> str:
    cls = type(error)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def _stored_type(name: str) -> str:
    """A stored failure's type name (``module.QualName``), as `_error_type` writes it."""
    return name.removeprefix("builtins.")


def _fields(event: Event | NearEvent) -> str:  # noqa: C901 - a case per event
    """Return the event's fields other than the key, as `` name=value`` pairs."""
    match event:
        case (
            Hit()
            | Miss()
            | LockAcquired()
            | BackendSkipped()
            | NearEviction()
            | NearInvalidation()
        ):
            return ""
        case LockWait(seconds=seconds, outcome=outcome):
            return f" seconds={seconds:.3f} outcome={outcome}"
        case Timeout(seconds=seconds, action=action):
            return f" seconds={seconds:.3f} action={action}"
        case Computed(seconds=seconds) | StaleServed(seconds=seconds):
            return f" seconds={seconds:.3f}"
        case ComputeError(seconds=seconds, error=error):
            return f" seconds={seconds:.3f} error={_error_type(error)}"
        case Refresh(reason=reason):
            return f" reason={reason}"
        case RefreshFailed(error=error) | BackendFailed(error=error):
            return f" error={_error_type(error)}"
        case UnreadableEntry(reason=reason):
            return f" reason={reason}"
        case FailureCached(error=error, seconds=seconds):
            return f" error={_stored_type(error)} seconds={seconds:.3f}"
        case FailureServed(error=error):
            return f" error={_stored_type(error)}"
        case NearFlush(reason=reason, entries=entries):
            return f" reason={reason} entries={entries}"


class LoggingHook:
    """A `MetricsHook` that logs each event on one line: event, key, fields.

    Args:
        logger: Where to log; defaults to the ``stampede_guard.events`` logger.
        level: The level of every line. The default, ``DEBUG``, suits a hook that
            logs every call; a hook that logs at a level the logger drops costs one
            level check per event.
        digest_keys: Log `key_digest` of each key instead of the key, for keys that
            hold data that must stay out of logs.
    """

    def __init__(
        self,
        logger: logging.Logger | None = None,
        level: int = logging.DEBUG,
        *,
        digest_keys: bool = False,
    ) -> None:
        if isinstance(level, bool) or not isinstance(level, int):
            msg = f"level must be a logging level (an int), not {level!r}"
            raise TypeError(msg)
        self._logger = (
            logging.getLogger("stampede_guard.events") if logger is None else logger
        )
        self._level = level
        self._digest_keys = digest_keys

    def __repr__(self) -> str:
        return (
            f"LoggingHook(logger={self._logger.name!r}, "
            f"level={logging.getLevelName(self._level)!r}, "
            f"digest_keys={self._digest_keys!r})"
        )

    def __call__(self, event: Event | NearEvent, /) -> None:
        """Log *event* on one line."""
        if not self._logger.isEnabledFor(self._level):
            return
        name = _EVENT_NAMES[type(event)]
        if isinstance(event, NearFlush):  # the one event about no key
            self._logger.log(
                self._level,
                "%s%s",
                name,
                _fields(event),
                extra={"stampede_guard_event": name},
            )
            return
        key = event.key
        if self._digest_keys:
            key = key_digest(key)
        elif not key.isprintable():
            key = repr(key)  # escaped, so that a key cannot break the line
        self._logger.log(
            self._level,
            "%s key=%s%s",
            name,
            key,
            _fields(event),
            extra={"stampede_guard_event": name, "stampede_guard_key": key},
        )
