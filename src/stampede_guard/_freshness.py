"""Whether a found entry is to be refreshed: stale (past ``ttl``) or early (XFetch)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from stampede_guard._context import Context
from stampede_guard._entry import Entry
from stampede_guard.metrics import StaleServed

__all__ = ["RefreshDue", "refresh_reason", "stale_value"]


@dataclass(frozen=True, slots=True)
class RefreshDue:
    """A stored entry to serve now and to refresh: it is *reason* ("stale" or "early")."""

    entry: Entry
    reason: Literal["stale", "early"]


def refresh_reason(
    key: str, entry: Entry, ctx: Context
) -> Literal["stale", "early"] | None:
    policy = ctx.policy
    now = ctx.wall_clock()
    expiry = entry.created_at + policy.fresh_for(key, entry)
    if now >= expiry:
        return "stale"
    # XFetch (Vattani et al., VLDB 2015): refresh early with a probability that grows
    # as expiry nears, faster for values that took long to compute. 1 - random() is
    # in (0, 1], so the logarithm is defined.
    if policy.beta is not None:
        gap = -entry.compute_seconds * policy.beta * math.log(1.0 - ctx.random())
        if now + gap >= expiry:
            return "early"
    return None


def stale_value(key: str, due: RefreshDue, ctx: Context) -> object:
    """Return the value of *due* to a caller served it while it gets refreshed."""
    if due.reason == "stale" and ctx.observed:
        ctx.emit(
            StaleServed(
                key,
                ctx.wall_clock()
                - due.entry.created_at
                - ctx.policy.fresh_for(key, due.entry),
            )
        )
    return due.entry.value
