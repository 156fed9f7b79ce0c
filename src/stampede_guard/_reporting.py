"""Reporting an unreadable entry to the metrics hook of the call that met it.

A backend serves every function decorated with it, each with a hook of its own, and
decodes entries far below the plan: it cannot know whose hook to tell. So the drivers
put the running call's emitter in a context variable for the length of a plan, and a
backend that meets an unreadable entry calls `report_unreadable`. A context variable,
not a thread-local: an asyncio task sees its own, and a task started for the rest of
a plan (see `_drivers`) copies its creator's. A thread does not inherit it, but every
thread that runs a plan (a background refresh) runs it through a driver, which sets it.

Only a call whose function has a hook sets it, so a call without one pays nothing.
The decorated function itself runs with it unset: the cached functions it calls in
turn report to their own hooks, never to this one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextvars import ContextVar, Token
from typing import Protocol, TypeVar

from stampede_guard.metrics import Event, UnreadableEntry, _Emit

__all__ = [
    "Observed",
    "begin",
    "end",
    "report_unreadable",
    "unobserved",
    "unobserved_async",
]

T = TypeVar("T")

_emitter: ContextVar[_Emit | None] = ContextVar("stampede_guard_emitter", default=None)


class Observed(Protocol):
    """What `begin` needs of a plan's `Context`."""

    @property
    def observed(self) -> bool: ...

    @property
    def emit(self) -> _Emit: ...


def begin(ctx: Observed) -> Token[_Emit | None] | None:
    """Send this plan's reports to *ctx*'s hook, if it has one; `end` takes it back.

    A plan may read an unreadable entry more than once (a waiter looks again and again
    while the entry waits for its replacement): its hook hears of each key once per
    plan. Returns None when there is nothing to report to: then nothing was set.
    """
    return _emitter.set(_once_per_key(ctx.emit)) if ctx.observed else None


def _once_per_key(emit: _Emit) -> _Emit:
    reported: set[str] = set()

    def report(event: Event) -> None:
        if isinstance(event, UnreadableEntry):
            if event.key in reported:
                return
            reported.add(event.key)
        emit(event)

    return report


def end(token: Token[_Emit | None] | None) -> None:
    """Undo `begin`."""
    if token is not None:
        _emitter.reset(token)


def unobserved(compute: Callable[[], T]) -> Callable[[], T]:
    """Return *compute*, made to run with nothing to report to (see the module)."""

    def run() -> T:
        token = _emitter.set(None)
        try:
            return compute()
        finally:
            _emitter.reset(token)

    return run


def unobserved_async(
    compute: Callable[[], Awaitable[T]],
) -> Callable[[], Awaitable[T]]:
    """Return *compute*, made to run with nothing to report to (see the module)."""

    async def run() -> T:
        token = _emitter.set(None)
        try:
            return await compute()
        finally:
            _emitter.reset(token)

    return run


def report_unreadable(key: str, reason: str) -> None:
    """Report that *key*'s stored entry was unreadable: *reason* names the exception."""
    emit = _emitter.get()
    if emit is not None:
        emit(UnreadableEntry(key, reason))
