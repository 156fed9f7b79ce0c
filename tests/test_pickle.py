"""The signed pickle serializer: any picklable value, and a forged entry never runs."""

from __future__ import annotations

import pickle
import secrets
import sys
import types
from pathlib import Path

import pytest
import redis

from stampede_guard import RedisBackend, SignedPickleSerializer, cached_stampede_safe
from stampede_guard.serializers import decode_entry

SECRET = secrets.token_bytes(32)


class Planted:
    """A pickle payload that writes a marker file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (Path.write_text, (str(self.marker), "pwned"))


def test_short_or_missing_secret_is_refused() -> None:
    """A secret shorter than 32 bytes fails at construction, naming the fix."""
    with pytest.raises(ValueError, match="at least 32 bytes"):
        SignedPickleSerializer(b"short")


def test_values_json_cannot_hold_round_trip_through_redis(
    redis_url: str, redis_prefix: str
) -> None:
    """Sets, tuples and datetimes come back as they were, for every caller."""
    import datetime as dt

    backend = RedisBackend.from_url(
        redis_url, prefix=redis_prefix, serializer=SignedPickleSerializer(SECRET)
    )
    value = {
        "ids": {1, 2},
        "pair": (1, 2),
        "at": dt.datetime(2026, 11, 26, tzinfo=dt.UTC),
    }

    @cached_stampede_safe(key="k", backend=backend)
    def f() -> dict[str, object]:
        return value

    assert f() == value
    assert f() == value
    backend.close()


@pytest.mark.parametrize("forgery", ["unsigned", "wrong-secret", "truncated-mac"])
def test_a_forged_pickle_is_never_unpickled(
    forgery: str,
    redis_url: str,
    redis_client: redis.Redis,
    redis_prefix: str,
    tmp_path: Path,
) -> None:
    """A payload that would run code, written to Redis by an attacker, is a miss: it never runs."""
    marker = tmp_path / "marker"
    serializer = SignedPickleSerializer(SECRET)
    backend = RedisBackend.from_url(
        redis_url, prefix=redis_prefix, serializer=serializer
    )

    @cached_stampede_safe(key="k", backend=backend)
    def f() -> str:
        return "honest"

    assert f() == "honest"
    (value_key,) = redis_client.scan_iter(match=f"{redis_prefix}:*:v:*")
    honest = redis_client.get(value_key)
    assert isinstance(honest, bytes)
    prefix_len = len(b"SG\x01") + 1 + len(serializer.name.encode()) + 16
    payload = pickle.dumps(Planted(marker))
    if forgery == "unsigned":
        body = payload
    elif forgery == "wrong-secret":
        body = SignedPickleSerializer(secrets.token_bytes(32)).dumps(Planted(marker))
    else:
        body = b"\x00" * 8 + payload
    redis_client.set(value_key, honest[:prefix_len] + body)
    assert f() == "honest", "the forged entry was refused and recomputed"
    assert not marker.exists()
    stored = redis_client.get(value_key)
    assert isinstance(stored, bytes)
    assert decode_entry(stored, serializer, key=value_key.decode()).value == "honest"
    backend.close()


def test_rotated_secret_still_reads_old_entries() -> None:
    """previous= keeps entries signed with the old secret readable during a rotation."""
    old, new = secrets.token_bytes(32), secrets.token_bytes(32)
    data = SignedPickleSerializer(old).dumps({"a": 1})
    assert SignedPickleSerializer(new, previous=(old,)).loads(data) == {"a": 1}
    with pytest.raises(ValueError, match="signature"):
        SignedPickleSerializer(new).loads(data)


def test_a_pickle_of_a_class_that_is_gone_reads_as_a_miss_and_is_replaced(
    redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    """A signed entry whose class no longer imports is a poison entry: a miss, replaced."""
    gone = types.ModuleType("stampede_guard_gone_module")

    class Old:
        pass

    Old.__module__ = gone.__name__
    Old.__qualname__ = "Old"
    gone.Old = Old  # type: ignore[attr-defined]
    sys.modules[gone.__name__] = gone
    backend = RedisBackend.from_url(
        redis_url, prefix=redis_prefix, serializer=SignedPickleSerializer(SECRET)
    )
    calls = [0]

    @cached_stampede_safe(key="profile", backend=backend)
    def profile() -> object:
        calls[0] += 1
        return Old() if calls[0] == 1 else {"fresh": True}

    try:
        assert isinstance(profile(), Old)
    finally:
        del sys.modules[gone.__name__]  # the class's module is gone, as after a deploy
    try:
        assert profile() == {"fresh": True}
        assert profile() == {"fresh": True}
        assert calls[0] == 2, "recomputed once, then a hit"
        entry = profile.get_cached()
        assert entry is not None
        assert entry.value == {"fresh": True}
    finally:
        backend.close()
