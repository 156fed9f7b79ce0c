"""The exceptions stampede_guard raises.

The tree::

    StampedeGuardError
    ├── LockTimeoutError        (also a TimeoutError) a waiter gave up on another caller's lock
    ├── BackendError            the cache backend failed; raised from the original error
    ├── SerializationError      a value could not be encoded for the backend
    ├── ReentrantCallError      a computation called its own key, which would deadlock
    ├── InterruptedComputationError
    │                           the computation a caller waited on was interrupted
    │                           (KeyboardInterrupt, SystemExit...), twice in a row
    └── CachedFailureError      a failure kept by cache_errors, whose exception could
                                not be rebuilt

Misconfiguration is a plain ``ValueError`` or ``TypeError`` raised at decoration time.
The decorated function's own exceptions pass through unchanged; they are cached only
if ``cache_errors`` names their class.
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "CachedFailureError",
    "InterruptedComputationError",
    "LockTimeoutError",
    "ReentrantCallError",
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
    """The cache backend failed while handling *key*; ``__cause__`` holds the original.

    Its message names the server (*server*, ``host:port``, never a password) and the
    cause (the client's exception type and message), so a log line says why without
    a traceback: a reply such as ``READONLY`` or ``OOM`` names no server by itself.

    Attributes:
        key: The cache key the call was for.
        operation: The backend method that failed (``get``, ``set_and_unlock``...).
        server: Where the command went, if the backend knows.
        refused: The server's reason when it refused a write it can still be asked to
            read (``READONLY``, ``OOM``...): reads keep working, so such failures are
            counted apart (see the circuit breaker) and logged once.
    """

    def __init__(
        self,
        key: str,
        operation: str,
        *,
        server: str | None = None,
        refused: str | None = None,
    ) -> None:
        self.key = key
        self.operation = operation
        self.server = server
        self.refused = refused
        where = f" on {server}" if server else ""
        super().__init__(
            f"cache backend failed during {operation} of key {key!r}{where}"
        )

    def __str__(self) -> str:
        # Read when shown, since `raise ... from` sets the cause after __init__.
        message = super().__str__()
        cause = self.__cause__
        if cause is None:
            return message
        return f"{message}: {type(cause).__name__}: {cause}"


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


class ReentrantCallError(StampedeGuardError):
    """The computation of *key* called itself with the same key (in its thread or task).

    Waiting would be a deadlock: the inner call would wait for a lock, or an in-process
    call, that only the outer one releases. Nothing is locked or cached by the inner
    call; the outer computation gets the error unless it catches it.
    """

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(
            f"the computation of cache key {key!r} called itself with the same key "
            "(directly, or through another function cached on the same key and "
            "backend); it would wait for its own lock for ever. Give the inner call "
            "another key, or call the undecorated function (fn.bypass(...))."
        )


class InterruptedComputationError(StampedeGuardError):
    """The computation this call waited on was interrupted; ``__cause__`` says how.

    A BaseException that is not an Exception (KeyboardInterrupt, SystemExit, a
    custom one) ended the function in the caller that ran it. Callers waiting on it in
    the same process run it once more; if that run is interrupted too, they get this
    error instead of running it once each. Nothing was cached.
    """

    def __init__(self, key: str, cause: BaseException) -> None:
        self.key = key
        super().__init__(
            f"the computation of cache key {key!r} was interrupted twice by "
            f"{type(cause).__qualname__} in the callers running it; nothing was cached. "
            "Call again to retry."
        )


class CachedFailureError(StampedeGuardError):
    """A failure of *key* served from the cache whose exception could not be rebuilt.

    Raised in place of the original exception when its class is not one this
    process's decorator caches (nor a subclass of one), or will not be built from a
    message alone.

    Attributes:
        key: The cache key whose computation failed.
        type_name: The original exception's class, as ``module.QualifiedName``.
        message: The original exception's message.
    """

    def __init__(self, key: str, type_name: str, message: str) -> None:
        self.key = key
        self.type_name = type_name
        self.message = message
        super().__init__(
            f"{type_name}: {message} (a failure of cache key {key!r}, served from the "
            "cache: cache_errors keeps it for its period)"
        )
