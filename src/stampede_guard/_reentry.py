"""Re-entrant calls: a computation that asks for its own key would wait for itself.

While a computation runs, its key is marked in a context variable, which follows the
thread and every task started from it. A call of a marked key fails at once with
`ReentrantCallError` instead of waiting for a lock (or an in-process call) that only
it could release: a deadlock in sync code, a wait until some timeout in asyncio. A
call answered from memory (a memory backend's or a near cache's hit) waits for
nothing, so the decorator serves it before it checks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from stampede_guard._errors import ReentrantCallError

__all__ = ["check_reentry", "computing", "computing_any"]

# (id of the backend, cache key) of every computation running in this context.
_computing: ContextVar[frozenset[tuple[int, str]]] = ContextVar(
    "stampede_guard_computing", default=frozenset()
)


#: Whether this context computes anything at all: the shells' cheap first test.
computing_any = _computing.get


def check_reentry(backend: object, key: str) -> None:
    """Raise `ReentrantCallError` if this context is computing *key* on *backend*."""
    running = _computing.get()
    if running and (id(backend), key) in running:  # empty, so cheap, almost always
        raise ReentrantCallError(key)


@contextmanager
def computing(backend: object, key: str) -> Iterator[None]:
    """Mark *key* on *backend* as being computed in this context, for the block."""
    token = _computing.set(_computing.get() | {(id(backend), key)})
    try:
        yield
    finally:
        _computing.reset(token)
