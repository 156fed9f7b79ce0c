"""In-process coalescing for batch calls, per id: overlapping calls share the overlap.

A batch call claims every key it must look up remotely that no other call of this
process is looking up already, all at once under one mutex, and joins the others.
It settles its own keys (value, no value, or error) before it waits for any it
joined, so two calls can never wait for each other. A joiner waits for at most
*wait_timeout*; then, or if the owner failed, it serves the key by itself (through
the lock, so still once across processes).
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["AsyncBatchFlights", "BatchFlights", "Outcome"]


@dataclass(slots=True)
class Outcome:
    """How one key's flight ended: its stored form, or the error that ended it."""

    form: list[Any] | None = None
    error: BaseException | None = None


@dataclass(slots=True)
class _Slot:
    done: threading.Event = field(default_factory=threading.Event)
    outcome: Outcome | None = None


class BatchFlights:
    """The keys this process's batch calls of one function are looking up (threads)."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._slots: dict[str, _Slot] = {}

    def claim(self, keys: Sequence[str]) -> tuple[list[str], dict[str, _Slot]]:
        """Return the keys this call owns now, and the slots of those it joins."""
        mine: list[str] = []
        joined: dict[str, _Slot] = {}
        with self._mutex:
            for key in keys:
                slot = self._slots.get(key)
                if slot is None:
                    self._slots[key] = _Slot()
                    mine.append(key)
                else:
                    joined[key] = slot
        return mine, joined

    def settle(self, key: str, outcome: Outcome) -> None:
        """End this call's flight of *key*: its joiners get *outcome*."""
        with self._mutex:
            slot = self._slots.pop(key, None)
        if slot is not None:
            slot.outcome = outcome
            slot.done.set()

    def forget(self, key: str) -> None:
        """Let later calls of *key* not join the flight in progress (see ``_coalesce``)."""
        with self._mutex:
            self._slots.pop(key, None)

    @staticmethod
    def wait(slot: _Slot, seconds: float) -> Outcome | None:
        """Return the outcome of a joined flight, or None if it did not end in time."""
        return slot.outcome if slot.done.wait(seconds) else None


@dataclass(slots=True)
class _AsyncSlot:
    done: asyncio.Event = field(default_factory=asyncio.Event)
    outcome: Outcome | None = None


class AsyncBatchFlights:
    """`BatchFlights` for asyncio: per event loop (a loop's events are its own)."""

    def __init__(self) -> None:
        self._by_loop: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, dict[str, _AsyncSlot]
        ] = weakref.WeakKeyDictionary()

    def _slots(self) -> dict[str, _AsyncSlot]:
        loop = asyncio.get_running_loop()
        slots = self._by_loop.get(loop)
        if slots is None:
            slots = self._by_loop[loop] = {}
        return slots

    def claim(self, keys: Sequence[str]) -> tuple[list[str], dict[str, _AsyncSlot]]:
        """See `BatchFlights.claim` (no mutex: one loop runs one task at a time)."""
        slots = self._slots()
        mine: list[str] = []
        joined: dict[str, _AsyncSlot] = {}
        for key in keys:
            slot = slots.get(key)
            if slot is None:
                slots[key] = _AsyncSlot()
                mine.append(key)
            else:
                joined[key] = slot
        return mine, joined

    def settle(self, key: str, outcome: Outcome) -> None:
        """See `BatchFlights.settle`."""
        slot = self._slots().pop(key, None)
        if slot is not None:
            slot.outcome = outcome
            slot.done.set()

    def forget(self, key: str) -> None:
        """See `BatchFlights.forget`."""
        for slots in list(self._by_loop.values()):
            slots.pop(key, None)

    @staticmethod
    async def wait(slot: _AsyncSlot, seconds: float) -> Outcome | None:
        """See `BatchFlights.wait`."""
        try:
            await asyncio.wait_for(slot.done.wait(), seconds)
        except TimeoutError:
            return None
        return slot.outcome
