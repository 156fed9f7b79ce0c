"""Cached failures (``cache_errors``): which exceptions are kept, and raising them again.

A failure is stored as a `CachedFailure`, the exception's type by name and its
message, never the exception object (it may hold a socket, a frame, a secret in an
attribute). Reading it back never imports anything: the name is looked up among the
classes the decorator was given and their subclasses, and an exception of that class
is built from the message. A class that is not among them, or that will not be built
from a message alone, is raised as `CachedFailureError` instead, which names it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from stampede_guard._entry import CachedFailure
from stampede_guard._errors import CachedFailureError, StampedeGuardError

__all__ = ["NO_FAILURES", "Failures", "check_cache_errors"]

#: The longest message kept: a failure's message is stored and sent to every reader.
MAX_MESSAGE: Final = 2000


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def check_cache_errors(value: object) -> dict[type[Exception], float]:
    """Validate ``cache_errors``: exception classes to seconds; raise with the fix."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        msg = f"cache_errors must map exception classes to seconds, e.g. {{TimeoutError: 5.0}}, not {type(value).__qualname__}"
        raise TypeError(msg)
    checked: dict[type[Exception], float] = {}
    for cls, seconds in value.items():
        if not (isinstance(cls, type) and issubclass(cls, Exception)):
            msg = f"cache_errors key {cls!r} is not an exception class: give classes such as TimeoutError (subclasses of Exception)"
            raise TypeError(msg)
        if issubclass(cls, StampedeGuardError):
            msg = f"cache_errors cannot keep {cls.__qualname__}: it is stampede_guard's own error, about the cache, not the function's failure"
            raise TypeError(msg)
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, (int, float))
            or not math.isfinite(seconds)
            or not 0.001 <= seconds <= 24 * 3600  # noqa: PLR2004
        ):
            msg = f"cache_errors[{cls.__qualname__}]={seconds!r} is not a number of seconds from 0.001 to 86400 (a day): how long the failure is served before the function is called again"
            raise ValueError(msg)
        checked[cls] = float(seconds)
    return checked


@dataclass(frozen=True, slots=True)
class Failures:
    """The failures one decorated function caches, and for how long each."""

    periods: Mapping[type[Exception], float]

    def period(self, exc: BaseException) -> float | None:
        """Seconds to keep *exc*, or None: the nearest class in its MRO decides."""
        if not self.periods:
            return None
        for cls in type(exc).__mro__:
            seconds = self.periods.get(cls)
            if seconds is not None:
                return seconds
        return None

    def kept(self, exc: BaseException) -> CachedFailure:
        """Return what is stored of *exc*: its class's name and its message."""
        message = str(exc)
        if len(message) > MAX_MESSAGE:
            message = message[:MAX_MESSAGE] + "..."
        return CachedFailure(_name(type(exc)), message)

    def rebuilt(self, key: str, failure: CachedFailure) -> Exception:
        """Return the exception to raise for *failure*, read back from the cache."""
        cls = self._known(failure.type_name)
        exc: Exception | None = None
        if cls is not None:
            try:
                exc = cls(failure.message)
            except Exception:  # noqa: BLE001 - a constructor wanting more than a message
                exc = None
        if exc is None:
            return CachedFailureError(key, failure.type_name, failure.message)
        exc.add_note(
            f"stampede_guard: served from the cache for key {key!r}: the computation "
            "failed and cache_errors keeps the failure for its period"
        )
        return exc

    def _known(self, name: str) -> type[Exception] | None:
        """The class named *name* among the cached ones and their subclasses."""
        seen: set[type] = set()
        todo: list[type] = list(self.periods)
        while todo:
            cls = todo.pop()
            if cls in seen:
                continue
            seen.add(cls)
            if _name(cls) == name:
                return cls
            todo.extend(cls.__subclasses__())
        return None


#: A function's failures when it caches none: read back, a failure is still rebuilt.
NO_FAILURES: Final = Failures({})
