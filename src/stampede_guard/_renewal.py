"""Lease renewal while the function runs: a watchdog, as Redisson's, as a plan.

Every third of the lease, the watchdog extends the lock to a full lease, so a long
computation keeps its lock while a dead holder's lock still runs out quickly. It stops
when the computation ends, when the lock turns out to be lost, or when one more
extension would carry the lease past *limit* (``lease_limit``, what joiners and
waiters are promised), so a hung computation cannot hold the key for ever. A failed
renewal is logged, never raised: the worst outcome is one more computation elsewhere.

One plan for both drivers (`Compute.watchdog`): the sync driver runs it in a thread,
the asyncio driver in a task, so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from stampede_guard._context import Context
from stampede_guard._ops import Extend, Op, Tick

__all__ = ["renew"]


def renew(
    key: str, token: str, lock_ttl: float, limit: float, ctx: Context
) -> Generator[Op, Any, None]:
    """Keep *token*'s lock on *key* for up to *limit* seconds from now (see the module).

    Each round waits first (the lock was just taken with a full lease), then extends.
    """
    started, every = ctx.clock(), lock_ttl / 3
    while (yield Tick(every)) and ctx.clock() - started + lock_ttl <= limit:
        try:
            held = yield Extend(key, token, lock_ttl)
        except Exception:  # logged; the next round tries again
            ctx.logger.warning("could not renew the lock on %r", key, exc_info=True)
            continue
        if not held:
            ctx.logger.warning("lost the lock on %r while computing", key)
            return
