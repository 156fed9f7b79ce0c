"""Hypothesis strategies for interleavings of calls, invalidations and refreshes.

Needs hypothesis: ``pip install 'stampede-guard[testing]'``.
"""

from __future__ import annotations

try:
    from hypothesis import strategies as st
except ImportError as exc:  # pragma: no cover - the extra is installed for the tests
    msg = (
        "stampede_guard.testing.strategies needs hypothesis: "
        "pip install 'stampede-guard[testing]'"
    )
    raise ImportError(msg, name=exc.name) from exc

from stampede_guard.testing._interleaving import (
    Advance,
    Call,
    Invalidate,
    Operation,
    Refresh,
)

__all__ = ["interleavings", "operations"]


def operations(
    *, keys: int = 3, max_advance: float = 120.0
) -> st.SearchStrategy[Operation]:
    """Return a strategy for one `Operation` on one of *keys* keys (0 to keys - 1).

    Args:
        keys: How many distinct keys the operations touch.
        max_advance: The longest clock move, in seconds; pick it past your ttl and
            stale window so that expiry and staleness are explored.

    Raises:
        ValueError: If *keys* is below 1 or *max_advance* negative.
    """
    if keys < 1:
        msg = f"operations(keys={keys!r}): needs at least one key"
        raise ValueError(msg)
    if max_advance < 0:
        msg = f"operations(max_advance={max_advance!r}): the clock only moves forward"
        raise ValueError(msg)
    key = st.integers(min_value=0, max_value=keys - 1)
    return st.one_of(
        st.builds(Call, key),
        st.builds(Invalidate, key),
        st.builds(Refresh, key),
        st.builds(
            Advance,
            st.floats(min_value=0, max_value=max_advance, allow_nan=False),
        ),
    )


def interleavings(
    *, keys: int = 3, max_size: int = 40, max_advance: float = 120.0
) -> st.SearchStrategy[list[Operation]]:
    """Return a strategy for lists of up to *max_size* operations (see `operations`).

    Apply them in order with `stampede_guard.testing.perform`; hypothesis shrinks a
    failing list to the few operations that break your invariant.
    """
    return st.lists(
        operations(keys=keys, max_advance=max_advance), min_size=1, max_size=max_size
    )
