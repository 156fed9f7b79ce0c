"""Drivers: carry out a plan's operations against a backend. No cache decisions here.

Every exception an operation raises, cancellation included, is thrown back into the
plan, and a suspended plan is never closed early, so its lock release always runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import assert_never

from stampede_guard._ops import (
    Compute,
    Get,
    GetOrLock,
    Op,
    Set,
    SetAndUnlock,
    Sleep,
    Unlock,
)
from stampede_guard._plan import Plan
from stampede_guard.backends._protocol import Backend

__all__ = ["run_sync"]


def run_sync(plan: Plan, backend: Backend, compute: Callable[[], object]) -> object:
    """Run *plan* to completion in this thread and return its result."""
    result: object = None
    error: BaseException | None = None
    while True:
        try:
            op = plan.send(result) if error is None else plan.throw(error)
        except StopIteration as stop:
            return stop.value
        result = error = None
        try:
            result = _perform(op, backend, compute)
        except BaseException as exc:  # noqa: BLE001 - the plan decides what to do with it
            error = exc


def _perform(op: Op, backend: Backend, compute: Callable[[], object]) -> object:
    match op:
        case Get(key):
            return backend.get(key)
        case GetOrLock(key, token, lock_ttl):
            return backend.get_or_lock(key, token, lock_ttl)
        case Compute():
            return compute()
        case Set(key, entry, ttl):
            return backend.set(key, entry, ttl)
        case SetAndUnlock(key, entry, ttl, token):
            return backend.set_and_unlock(key, entry, ttl, token)
        case Unlock(key, token):
            return backend.unlock(key, token)
        case Sleep(seconds):
            time.sleep(seconds)
            return None
        case _:
            assert_never(op)
