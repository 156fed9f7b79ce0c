"""The exceptions stampede_guard raises.

The tree::

    StampedeGuardError
    ├── LockTimeoutError        (also a TimeoutError) a waiter gave up on another caller's lock
    ├── BackendError            the cache backend failed; raised from the original error
    └── SerializationError      a value could not be encoded for the backend

Misconfiguration is a plain ``ValueError`` or ``TypeError`` raised at decoration time.
The decorated function's own exceptions pass through unchanged and are never cached.
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "LockTimeoutError",
    "SerializationError",
    "StampedeGuardError",
]


class StampedeGuardError(Exception):
    """Root of every exception stampede_guard raises itself."""


class LockTimeoutError(StampedeGuardError, TimeoutError):
    """A waiter waited *waited* seconds for another caller's lock on *key* and gave up.

    Raised only with ``on_timeout="raise"``; the default, ``"compute"``, computes instead.
    """

    def __init__(self, key: str, waited: float) -> None:
        self.key = key
        self.waited = waited
        super().__init__(
            f"gave up after waiting {waited:.3f}s for the lock on cache key {key!r}: "
            "another caller is still computing it. Raise wait_timeout (it must cover "
            "the computation time) or use on_timeout='compute'."
        )


class BackendError(StampedeGuardError):
    """The cache backend failed while handling *key*; ``__cause__`` holds the original."""

    def __init__(self, key: str, operation: str) -> None:
        self.key = key
        self.operation = operation
        super().__init__(f"cache backend failed during {operation} of key {key!r}")


class SerializationError(StampedeGuardError):
    """The value computed for *key* cannot be encoded by the backend's serializer.

    Nothing was cached and the lock was released; the caller that computed the value
    gets this error, other callers compute again.
    """

    def __init__(
        self, key: str, value_type: type, serializer: str, reason: str
    ) -> None:
        self.key = key
        self.value_type = value_type
        self.serializer = serializer
        type_name = f"{value_type.__module__}.{value_type.__qualname__}"
        super().__init__(
            f"cannot cache the value for key {key!r}: the {serializer} serializer cannot "
            f"encode {type_name} ({reason}). Return plain JSON data (dict, list, str, int, "
            "float, bool, None) from the function, or pass a serializer that handles "
            f"{value_type.__qualname__} to the backend (serializer=...)."
        )
