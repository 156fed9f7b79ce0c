"""A backend's batch methods where it has them, its single ones otherwise.

One round trip for many keys on a `BatchBackend`; a backend written before batches
still serves a batch call, a key at a time. The releases that follow a failure log
their own failure instead of raising it over the one that brought them.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from stampede_guard._entry import Entry

__all__ = [
    "aget_many",
    "aget_or_lock_many",
    "aquietly",
    "aset_and_unlock_many",
    "aunlock_many",
    "get_many",
    "get_or_lock_many",
    "quietly",
    "set_and_unlock_many",
    "unlock_many",
]

logger = logging.getLogger("stampede_guard")


def get_many(backend: Any, keys: list[str]) -> Sequence[Entry | None]:
    many = getattr(backend, "get_many", None)
    return many(keys) if many is not None else [backend.get(k) for k in keys]


def get_or_lock_many(
    backend: Any, keys: list[str], token: str, ttl: float
) -> Sequence[Any]:
    many = getattr(backend, "get_or_lock_many", None)
    if many is not None:
        return many(keys, token, ttl)  # type: ignore[no-any-return]
    return [backend.get_or_lock(k, token, ttl) for k in keys]


def set_and_unlock_many(
    backend: Any, items: list[tuple[str, Entry, float, int | None]], token: str
) -> Sequence[Entry | None]:
    if not items:
        return []
    many = getattr(backend, "set_and_unlock_many", None)
    if many is not None:
        return many(items, token)  # type: ignore[no-any-return]
    return [
        backend.set_and_unlock(k, e, ttl, token, ticket=t) for k, e, ttl, t in items
    ]


def unlock_many(backend: Any, keys: list[str], token: str) -> object:
    many = getattr(backend, "unlock_many", None)
    if many is not None:
        return many(keys, token)
    return [backend.unlock(k, token) for k in keys]


def quietly(release: Callable[..., object], *args: Any) -> None:
    try:
        release(*args)
    except Exception:  # never hide the error that brought us here; leases end locks
        logger.warning("could not release a batch's locks; they expire", exc_info=True)


async def aget_many(backend: Any, keys: list[str]) -> Sequence[Entry | None]:
    many = getattr(backend, "aget_many", None)
    if many is not None:
        return await many(keys)  # type: ignore[no-any-return]
    return [await backend.aget(k) for k in keys]


async def aget_or_lock_many(
    backend: Any, keys: list[str], token: str, ttl: float
) -> Sequence[Any]:
    many = getattr(backend, "aget_or_lock_many", None)
    if many is not None:
        return await many(keys, token, ttl)  # type: ignore[no-any-return]
    return [await backend.aget_or_lock(k, token, ttl) for k in keys]


async def aset_and_unlock_many(
    backend: Any, items: list[tuple[str, Entry, float, int | None]], token: str
) -> Sequence[Entry | None]:
    if not items:
        return []
    many = getattr(backend, "aset_and_unlock_many", None)
    if many is not None:
        return await many(items, token)  # type: ignore[no-any-return]
    return [
        await backend.aset_and_unlock(k, e, ttl, token, ticket=t)
        for k, e, ttl, t in items
    ]


async def aunlock_many(backend: Any, keys: list[str], token: str) -> object:
    many = getattr(backend, "aunlock_many", None)
    if many is not None:
        return await many(keys, token)
    return [await backend.aunlock(k, token) for k in keys]


async def aquietly(release: Callable[..., Awaitable[object]], *args: Any) -> None:
    try:
        await release(*args)
    except Exception:  # see quietly
        logger.warning("could not release a batch's locks; they expire", exc_info=True)
