"""``ttl_jitter``: keys stored together expire apart, judged alike by every process."""

from __future__ import annotations

import pytest
import redis

from stampede_guard import Entry, RedisBackend, cached_stampede_safe
from stampede_guard._context import Policy
from stampede_guard._options import validated_policy
from stampede_guard.testing import VirtualClock

TTL = 100.0
KEYS = 200


def test_keys_stored_together_expire_spread_over_the_jittered_part_of_ttl() -> None:
    """200 keys stored at once, ttl 100 s, jitter 0.5: none recomputed before 50 s,
    some but not all by 75 s, all after 100 s."""
    clock = VirtualClock()
    backend = clock.memory_backend()
    computed: list[int] = []

    @cached_stampede_safe(key="k:{n}", ttl=TTL, ttl_jitter=0.5, backend=backend)
    def f(n: int) -> int:
        computed.append(n)
        return n

    def recomputed_after(seconds: float) -> int:
        clock.advance(seconds)
        computed.clear()
        for n in range(KEYS):
            f(n)
        return len(computed)

    assert recomputed_after(0) == KEYS  # the first store, all at one instant
    assert recomputed_after(49.9) == 0
    middle = recomputed_after(25.0)  # 74.9 s after the store
    assert 0 < middle < KEYS
    # The rest expire by 100 s; those recomputed at 74.9 s are fresh again.
    assert recomputed_after(25.2) == KEYS - middle


def test_without_jitter_every_key_lives_exactly_ttl() -> None:
    """The default: ttl_jitter=0 leaves ttl as it is."""
    policy = validated_policy({"ttl": TTL})
    entry = Entry("v", 1.5, 0.1)
    assert {policy.fresh_for(f"k:{n}", entry) for n in range(KEYS)} == {TTL}


def test_every_process_judges_an_entry_alike() -> None:
    """The cut is drawn from the key and the store's time: two policies (two processes)
    with the same options give every entry the same fresh time, within the bound."""
    one: Policy = validated_policy({"ttl": TTL, "ttl_jitter": 0.2})
    other: Policy = validated_policy({"ttl": TTL, "ttl_jitter": 0.2})
    entry = Entry("v", 1_700_000_000.25, 0.1)
    times = [one.fresh_for(f"k:{n}", entry) for n in range(KEYS)]
    assert times == [other.fresh_for(f"k:{n}", entry) for n in range(KEYS)]
    assert all(TTL * 0.8 <= t <= TTL for t in times)
    assert len(set(times)) == KEYS  # spread, not one cut for all


def test_redis_expiries_of_keys_stored_together_are_spread(
    redis_url: str, redis_client: redis.Redis, redis_prefix: str
) -> None:
    """On Redis the value's own expiry is cut too (PTTL), within ttl * (1 - jitter)."""
    backend = RedisBackend.from_url(redis_url, prefix=redis_prefix)

    @cached_stampede_safe(key="k:{n}", ttl=TTL, ttl_jitter=0.3, backend=backend)
    def f(n: int) -> int:
        return n

    try:
        for n in range(50):
            f(n)
        codec = backend._codec
        left = [redis_client.pttl(codec.value_key(f"k:{n}")) for n in range(50)]
    finally:
        backend.close()
    assert all(TTL * 0.7 * 1000 - 1000 <= ms <= TTL * 1000 for ms in left), left
    assert len(set(left)) > 40


@pytest.mark.parametrize(
    ("value", "error"),
    [(1.0, ValueError), (-0.1, ValueError), ("0.1", TypeError), (True, TypeError)],
)
def test_a_bad_ttl_jitter_is_refused_at_decoration(
    value: object, error: type[Exception]
) -> None:
    """Out of 0..0.9, or not a number: refused, naming the option."""
    with pytest.raises(error, match="ttl_jitter"):
        cached_stampede_safe(ttl_jitter=value)  # type: ignore[call-overload]
