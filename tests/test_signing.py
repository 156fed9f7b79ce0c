"""Signed entries are bound to their key and header: a moved or edited entry is a miss.

Each forgery is planted on a real redis-server, the way someone with write access to it
would: the next call computes instead of serving it, reports it, replaces it with a
readable entry of its own, and leaves no lock behind.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import pickle
import secrets
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
import redis

from stampede_guard import (
    Entry,
    JsonSerializer,
    RedisBackend,
    SignedPickleSerializer,
    cached_stampede_safe,
)
from stampede_guard.backends.redis._codec import lock_key, value_key
from stampede_guard.metrics import Event, UnreadableEntry
from stampede_guard.serializers import (
    MAGIC,
    BadSignatureError,
    BoundSerializer,
    Envelope,
    Serializer,
    decode_entry,
    encode_entry,
)

pytestmark = pytest.mark.timeout(30)

SECRET = secrets.token_bytes(32)
TEN_YEARS = 10 * 365.25 * 24 * 3600
_TIMES = struct.Struct("!dd")


@dataclass
class Profiles:
    """A cached ``profile(user)`` on one backend, counting its computations by user."""

    backend: RedisBackend
    prefix: str
    calls: dict[str, int] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)

    def __post_init__(self) -> None:
        @cached_stampede_safe(
            key="profile:{user}", backend=self.backend, metrics=self.events.append
        )
        def profile(user: str) -> dict[str, object]:
            self.calls[user] = self.calls.get(user, 0) + 1
            return {"user": user, "ids": {1, 2}}

        self.profile = profile

    def value_key(self, user: str) -> str:
        return value_key(self.prefix, self.profile.cache_key(user))

    def lock_key(self, user: str) -> str:
        return lock_key(self.prefix, self.profile.cache_key(user))

    def unreadable(self) -> list[UnreadableEntry]:
        return [e for e in self.events if isinstance(e, UnreadableEntry)]


@pytest.fixture
def profiles(redis_url: str, redis_prefix: str) -> Iterator[Callable[..., Profiles]]:
    """Make `Profiles` on the session's server, under this test's prefix (or below it)."""
    made: list[RedisBackend] = []

    def make(
        serializer: Serializer | None = None, prefix: str = redis_prefix
    ) -> Profiles:
        backend = RedisBackend.from_url(
            redis_url,
            prefix=prefix,
            serializer=SignedPickleSerializer(SECRET)
            if serializer is None
            else serializer,
        )
        made.append(backend)
        return Profiles(backend, prefix)

    yield make
    for backend in made:
        backend.close()


def stored_bytes(client: redis.Redis, name: str) -> bytes:
    data = client.get(name)
    assert isinstance(data, bytes)
    return data


def plant(client: redis.Redis, name: str, data: bytes) -> None:
    client.set(name, data, px=60_000)


def with_times(data: bytes, serializer: Serializer, **times: float) -> bytes:
    """Return *data* with its header's created_at and/or compute_seconds replaced."""
    at = len(MAGIC) + 1 + len(serializer.name.encode())
    created_at, compute_seconds = _TIMES.unpack_from(data, at)
    new = _TIMES.pack(
        times.get("created_at", created_at),
        times.get("compute_seconds", compute_seconds),
    )
    return data[:at] + new + data[at + _TIMES.size :]


def assert_recomputed_and_replaced(
    world: Profiles,
    client: redis.Redis,
    user: str,
    reason: str = "BadSignatureError",
    serializer: Serializer | None = None,
) -> None:
    """The forged entry of *user* was a miss: computed once, replaced, no lock left."""
    assert world.profile(user) == {"user": user, "ids": {1, 2}}
    assert world.calls.get(user) == 1, "computed exactly once, never served the forgery"
    assert world.unreadable() == [
        UnreadableEntry(world.profile.cache_key(user), reason)
    ]
    name = world.value_key(user)
    entry = decode_entry(
        stored_bytes(client, name),
        SignedPickleSerializer(SECRET) if serializer is None else serializer,
        key=name,
    )
    assert entry.value == {"user": user, "ids": {1, 2}}
    assert math.isfinite(entry.created_at)
    assert 0 <= entry.compute_seconds < 60
    assert client.exists(world.lock_key(user)) == 0
    assert world.profile(user) == {"user": user, "ids": {1, 2}}
    assert world.calls[user] == 1, "the replacement is a hit"


def test_an_entry_copied_to_another_key_is_never_served_there(
    profiles: Callable[..., Profiles], redis_client: redis.Redis
) -> None:
    """Alice's entry copied to Bob's key: Bob is computed, never served Alice's value."""
    world = profiles()
    world.profile("alice")
    plant(
        redis_client,
        world.value_key("bob"),
        stored_bytes(redis_client, world.value_key("alice")),
    )
    assert_recomputed_and_replaced(world, redis_client, "bob")


def test_an_entry_copied_under_another_prefix_with_the_same_secret_is_a_miss(
    profiles: Callable[..., Profiles], redis_client: redis.Redis, redis_prefix: str
) -> None:
    """A second app sharing the secret never reads the first app's entries."""
    first = profiles()
    second = profiles(prefix=f"{redis_prefix}:second")
    first.profile("alice")
    plant(
        redis_client,
        second.value_key("alice"),
        stored_bytes(redis_client, first.value_key("alice")),
    )
    assert_recomputed_and_replaced(second, redis_client, "alice")


def test_a_forged_created_at_is_a_miss(
    profiles: Callable[..., Profiles], redis_client: redis.Redis
) -> None:
    """created_at moved 10 years ahead (fresh for ever) is refused, not served."""
    world = profiles()
    world.profile("alice")
    world.calls.clear()
    data = stored_bytes(redis_client, world.value_key("alice"))
    created_at = decode_entry(
        data, SignedPickleSerializer(SECRET), key=world.value_key("alice")
    ).created_at
    plant(
        redis_client,
        world.value_key("alice"),
        with_times(
            data, SignedPickleSerializer(SECRET), created_at=created_at + TEN_YEARS
        ),
    )
    assert_recomputed_and_replaced(world, redis_client, "alice")


def test_a_forged_compute_seconds_is_a_miss(
    profiles: Callable[..., Profiles], redis_client: redis.Redis
) -> None:
    """compute_seconds=1e9 (XFetch would refresh on every call) is refused."""
    world = profiles()
    world.profile("alice")
    world.calls.clear()
    data = stored_bytes(redis_client, world.value_key("alice"))
    forged = with_times(data, SignedPickleSerializer(SECRET), compute_seconds=1e9)
    plant(redis_client, world.value_key("alice"), forged)
    assert_recomputed_and_replaced(world, redis_client, "alice")


def test_a_previous_secret_still_reads_and_an_unknown_one_is_a_miss(
    profiles: Callable[..., Profiles], redis_client: redis.Redis
) -> None:
    """Rotation: entries under a `previous` secret are hits; under an unknown one, misses."""
    old, new = secrets.token_bytes(32), secrets.token_bytes(32)
    before = profiles(SignedPickleSerializer(old))
    before.profile("alice")
    before.profile("bob")
    rotating = profiles(SignedPickleSerializer(new, previous=(old,)))
    assert rotating.profile("alice") == {"user": "alice", "ids": {1, 2}}
    assert rotating.calls == {}, "an entry signed with a previous secret is a hit"
    assert rotating.unreadable() == []
    rotated = profiles(SignedPickleSerializer(new))
    assert_recomputed_and_replaced(
        rotated, redis_client, "bob", serializer=SignedPickleSerializer(new)
    )


def test_an_entry_of_the_v1_signing_format_is_a_miss_and_is_replaced(
    profiles: Callable[..., Profiles], redis_client: redis.Redis
) -> None:
    """An entry signed over its payload only (format v1) is recomputed, not trusted."""
    world = profiles()
    serializer = SignedPickleSerializer(SECRET)
    name = serializer.name.encode()
    payload = pickle.dumps({"user": "mallory"}, protocol=pickle.HIGHEST_PROTOCOL)
    domain = b"stampede_guard/pickle-hmac-sha256/v1\x00"
    mac = hmac.new(SECRET, domain + payload, hashlib.sha256).digest()
    header = MAGIC + bytes((len(name),)) + name + _TIMES.pack(time.time(), 0.01)
    plant(redis_client, world.value_key("alice"), header + mac + payload)
    assert_recomputed_and_replaced(world, redis_client, "alice")


def test_a_signed_entry_reads_back_only_under_its_key() -> None:
    """The envelope binds a signed entry to its key; an unsigned one cannot be bound."""
    signed = SignedPickleSerializer(SECRET)
    assert isinstance(signed, BoundSerializer)
    assert not isinstance(JsonSerializer(), BoundSerializer)
    data = encode_entry(Entry({1, 2}, 1e9, 0.5), signed, key="app:v:alice")
    assert decode_entry(data, signed, key="app:v:alice").value == {1, 2}
    for other in ("app:v:bob", "other:v:alice", ""):
        with pytest.raises(ValueError, match="BadSignatureError") as caught:
            decode_entry(data, signed, key=other)
        assert isinstance(caught.value.__cause__, BadSignatureError)


@pytest.mark.parametrize(
    "serializer",
    [JsonSerializer(), SignedPickleSerializer(SECRET)],
    ids=["json", "signed-pickle"],
)
@pytest.mark.parametrize(
    ("created_at", "compute_seconds"),
    [
        (math.nan, 0.5),
        (math.inf, 0.5),
        (-math.inf, 0.5),
        (1e9, math.nan),
        (1e9, math.inf),
        (1e9, -math.inf),
        (1e9, -0.001),
    ],
)
def test_an_envelope_with_times_that_make_no_sense_is_unreadable(
    serializer: Serializer, created_at: float, compute_seconds: float
) -> None:
    """A time that is not finite, or a negative computation time, is refused by any serializer."""
    envelope = Envelope(serializer)
    sane = envelope.encode(Entry([1], 1e9, 0.5), key="k")
    assert envelope.decode(sane, key="k") == Entry([1], 1e9, 0.5)
    # Encoded honestly (so only the times are wrong), then read back.
    data = envelope.encode(Entry([1], created_at, compute_seconds), key="k")
    with pytest.raises(ValueError, match="not finite, or a negative"):
        envelope.decode(data, key="k")
