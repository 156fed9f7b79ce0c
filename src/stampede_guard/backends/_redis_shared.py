"""What the sync and asyncio Redis backends share: keys, Lua scripts and the codec.

Everything here is free of I/O, so each backend method stays one command or script.
"""

from __future__ import annotations

import hashlib
import logging
import re
from typing import Any

from stampede_guard._clock import StepFreeClock
from stampede_guard._errors import SerializationError
from stampede_guard._reporting import report_unreadable
from stampede_guard.backends._kept import AsyncKeptConnections, KeptConnections
from stampede_guard.backends._protocol import (
    RELEASED,
    Claim,
    Entry,
    Notice,
)
from stampede_guard.serializers import (
    MAGIC,
    Envelope,
    JsonSerializer,
    Serializer,
)

__all__ = [
    "EXTEND",
    "GET_OR_LOCK",
    "INVALIDATE",
    "SET_AND_NOTIFY",
    "SET_AND_UNLOCK",
    "UNLOCK",
    "RedisCodec",
    "Scripts",
    "check_serializer",
]

logger = logging.getLogger("stampede_guard")

# Both keys of one cache key carry the same hash tag, a digest of the cache key, so a
# script touching both stays inside one Redis Cluster slot whatever the key contains
# (a raw "{" or "}" in user text could otherwise make the tag empty or differ).


def _tag(key: str) -> str:
    return hashlib.blake2b(key.encode(), digest_size=8).hexdigest()


def value_key(prefix: str, key: str) -> str:
    """Return the Redis key holding the value of cache key *key*."""
    return f"{prefix}:{{{_tag(key)}}}:v:{key}"


def lock_key(prefix: str, key: str) -> str:
    """Return the Redis key holding the lock of cache key *key*."""
    return f"{prefix}:{{{_tag(key)}}}:l:{key}"


_PREFIX = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def validate_prefix(prefix: object) -> str:
    """Return *prefix* if it is safe to put before every key, else raise ValueError."""
    if not isinstance(prefix, str) or not _PREFIX.fullmatch(prefix):
        msg = (
            f"prefix={prefix!r} is not a valid key prefix: use 1 to 64 characters "
            "from A-Z a-z 0-9 _ . : - (no braces: they would change Redis Cluster slots)"
        )
        raise ValueError(msg)
    return prefix


def milliseconds(seconds: float) -> int:
    """Convert a positive duration to whole milliseconds, never 0 (PX 0 is an error)."""
    return max(1, round(seconds * 1000))


# Tickets order computations: a ticket is the server's clock, in microseconds, at the
# look that preceded a computation (TIME inside the script, so one clock for every
# client). The floor key (":f:") holds the ticket of the stored value, or the time of
# the last invalidation; a store whose ticket is below it is refused, so an older value
# never replaces a newer one and nothing computed before an invalidation is stored
# after it. The floor lives as long as the value, or the invalidation's fence if longer
# (a client never stores a computation that ran longer than the fence: see _plan).
# Anything at the floor key that is not a number (written by someone else, a key of
# another type) counts as no floor and is replaced: hostile data there must not make
# every store and invalidation fail.
_FLOOR = """
local function read_floor(floor_key)
    local floor = redis.pcall('GET', floor_key)
    if type(floor) ~= 'string' then
        return nil
    end
    return tonumber(floor)
end
"""

_FENCE = (
    _FLOOR
    + """
local function fence(floor_key, ticket)
    if ticket == '' then
        return false, false
    end
    local floor = read_floor(floor_key)
    if not floor then
        return false, false
    end
    return floor > tonumber(ticket), true
end
local function raise_floor(floor_key, ticket, ttl_ms, had_floor)
    if ticket == '' then
        return
    end
    local ms = tonumber(ttl_ms)
    if had_floor then
        local left = redis.call('PTTL', floor_key)
        if left > ms then
            ms = left
        end
    end
    redis.call('SET', floor_key, ticket, 'PX', ms)
end
"""
)

_NOW = """
local function now_us()
    local t = redis.call('TIME')
    return t[1] * 1000000 + t[2]
end
"""

# KEYS[1] value key, KEYS[2] lock key; ARGV[1] token, ARGV[2] lock ttl (ms),
# ARGV[3] the envelope's magic prefix, ARGV[4] "1" to ignore the value.
# Returns {1, value} if there is a value, else {0, token of the lock's holder, ticket},
# having taken the lock if it was free (then the holder is ARGV[1]).
# Checking the value and taking the lock in one step is the double-check of the
# classic algorithm with no window between the two. Bytes that are not an envelope
# at all (foreign or corrupt) count as no value, so they get recomputed and replaced.
# SET ... NX GET (Redis 7) takes a free lock or reads its holder in one command.
GET_OR_LOCK = (
    _NOW
    + """
if ARGV[4] ~= '1' then
    local value = redis.call('GET', KEYS[1])
    if value and string.sub(value, 1, string.len(ARGV[3])) == ARGV[3] then
        return {1, value}
    end
end
local holder = redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2], 'GET')
return {0, holder or ARGV[1], now_us()}
"""
)

# KEYS[1] value key, KEYS[2] lock key, KEYS[3] floor key; ARGV[1] payload, ARGV[2] ttl
# (ms), ARGV[3] token, ARGV[4] notice channel, ARGV[5] ticket ('' for none).
# A fenced write. Refused for its ticket (see above): nothing stored or announced, and
# the lock, if still ours, released (announced as such). Otherwise the value is stored
# if the lock is still ours, or free (our lease ran out and nobody took it). If another
# caller holds the lock, it is computing a newer value; ours must not overwrite it, and
# its lock must not be deleted. The value is announced either way: it is no older than
# the stored one, and waiting callers can use it now.
# Returns 1 if stored, 0 if fenced off by another holder, -1 if refused for its ticket.
SET_AND_UNLOCK = (
    _FENCE
    + """
local refused, had_floor = fence(KEYS[3], ARGV[5])
if refused then
    if redis.call('GET', KEYS[2]) == ARGV[3] then
        redis.call('DEL', KEYS[2])
        redis.call('PUBLISH', ARGV[4], '')
    end
    return -1
end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[3] then
    redis.call('PUBLISH', ARGV[4], ARGV[1])
    return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
raise_floor(KEYS[3], ARGV[5], ARGV[2], had_floor)
if holder then
    redis.call('DEL', KEYS[2])
end
redis.call('PUBLISH', ARGV[4], ARGV[1])
return 1
"""
)

# KEYS[1] value key, KEYS[2] floor key; ARGV[1] payload, ARGV[2] ttl (ms), ARGV[3]
# notice channel, ARGV[4] ticket ('' for none).
# A store without the lock (a waiter that timed out, a refresh), announced like any
# other, and refused like any other for its ticket. Returns 1 if stored, -1 if refused.
SET_AND_NOTIFY = (
    _FENCE
    + """
local refused, had_floor = fence(KEYS[2], ARGV[4])
if refused then
    return -1
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
raise_floor(KEYS[2], ARGV[4], ARGV[2], had_floor)
redis.call('PUBLISH', ARGV[3], ARGV[1])
return 1
"""
)

# KEYS[1] value key, KEYS[2] lock key, KEYS[3] floor key; ARGV[1] notice channel,
# ARGV[2] fence (ms). Invalidation, final: drop the value, revoke the lock (its holder's
# store will be refused, and the next caller need not wait for it), and raise the floor
# to now for the length of the fence. A revoked lock is announced as released, so its
# waiters look again at once. Returns 1 if a lock was revoked.
INVALIDATE = (
    _NOW
    + _FLOOR
    + """
redis.call('DEL', KEYS[1])
local revoked = redis.call('DEL', KEYS[2])
local now = now_us()
local floor = read_floor(KEYS[3])
if floor and floor > now then
    now = floor
end
redis.call('SET', KEYS[3], string.format('%.0f', now), 'PX', ARGV[2])
if revoked == 1 then
    redis.call('PUBLISH', ARGV[1], '')
end
return revoked
"""
)

# KEYS[1] lock key; ARGV[1] token, ARGV[2] lease (ms). Compare-and-extend: renews the
# lease of a lock we still hold, never one that passed to somebody else.
EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS[1] lock key; ARGV[1] token, ARGV[2] notice channel. Compare-and-delete; a real
# release is announced with an empty message ("released": look now, take over).
UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('DEL', KEYS[1])
    redis.call('PUBLISH', ARGV[2], '')
    return 1
end
return 0
"""


class Scripts:
    """A backend's server-side scripts, each called as ``script(keys, args)``.

    Registered with the client, which sends each once and then calls it by digest;
    `send_on` moves the calls to kept connections (see `_kept`). Both client packages'
    Script objects work alike, sync or asyncio; their typing does not, hence Any.
    """

    __slots__ = (
        "extend",
        "get_or_lock",
        "invalidate",
        "set_and_notify",
        "set_and_unlock",
        "unlock",
    )

    def __init__(self, client: Any) -> None:
        self.get_or_lock: Any = client.register_script(GET_OR_LOCK)
        self.invalidate: Any = client.register_script(INVALIDATE)
        self.set_and_unlock: Any = client.register_script(SET_AND_UNLOCK)
        self.set_and_notify: Any = client.register_script(SET_AND_NOTIFY)
        self.unlock: Any = client.register_script(UNLOCK)
        self.extend: Any = client.register_script(EXTEND)

    def send_on(self, kept: KeptConnections | AsyncKeptConnections) -> None:
        """Call every script on *kept* connections instead of through the client."""
        self.get_or_lock = kept.script(self.get_or_lock)
        self.invalidate = kept.script(self.invalidate)
        self.set_and_unlock = kept.script(self.set_and_unlock)
        self.set_and_notify = kept.script(self.set_and_notify)
        self.unlock = kept.script(self.unlock)
        self.extend = kept.script(self.extend)


def check_serializer(serializer: object) -> Serializer:
    """Return *serializer*, JSON if None; raise TypeError if it is not a Serializer."""
    if serializer is None:
        return JsonSerializer()
    if not isinstance(serializer, Serializer):
        msg = f"serializer={serializer!r} needs a name and dumps() and loads() methods (see stampede_guard.Serializer)"
        raise TypeError(msg)
    return serializer


class RedisCodec:
    """Key names, script arguments and value encoding for one prefix and serializer."""

    # Redis names of recently used cache keys: hashing the tag on every hit costs more
    # than a lookup. Cleared when full, so it never outgrows the working set much.
    _NAMES_KEPT = 4096

    def __init__(self, prefix: object, serializer: object) -> None:
        self.prefix = validate_prefix(prefix)
        self.serializer = check_serializer(serializer)
        self._envelope = Envelope(self.serializer)
        self._names: dict[str, tuple[str, str, str, str]] = {}
        # Stamps and judges entries by the server's clock, learned from the tickets.
        self.clock = StepFreeClock()

    def _names_of(self, key: str) -> tuple[str, str, str, str]:
        names = self._names.get(key)
        if names is None:
            head = f"{self.prefix}:{{{_tag(key)}}}:"
            names = (
                f"{head}v:{key}",
                f"{head}l:{key}",
                f"{head}n:{key}",
                f"{head}f:{key}",
            )
            if len(self._names) >= self._NAMES_KEPT:
                self._names.clear()
            self._names[key] = names
        return names

    def value_key(self, key: str) -> str:
        return self._names_of(key)[0]

    def lock_key(self, key: str) -> str:
        return self._names_of(key)[1]

    def both_keys(self, key: str) -> tuple[str, str]:
        value, lock, _, _ = self._names_of(key)
        return value, lock

    def fenced_keys(self, key: str) -> tuple[str, str, str]:
        """Return the value, lock and floor keys of *key* (see the scripts' tickets)."""
        value, lock, _, floor = self._names_of(key)
        return value, lock, floor

    def store(
        self, key: str, entry: Entry, ttl: float, ticket: int | None
    ) -> tuple[tuple[str, str], tuple[bytes, int, str, str | int], Entry]:
        """Return SET_AND_NOTIFY's keys and arguments, and the entry readers will get."""
        data, stored = self.encode(key, entry)
        value, _, _, floor = self._names_of(key)
        fence = "" if ticket is None else ticket
        return (
            (value, floor),
            (data, milliseconds(ttl), self.channel(key), fence),
            stored,
        )

    def store_and_unlock(
        self, key: str, entry: Entry, ttl: float, token: str, ticket: int | None
    ) -> tuple[tuple[str, str, str], tuple[bytes, int, str, str, str | int], Entry]:
        """Return SET_AND_UNLOCK's keys and arguments, and the entry readers will get."""
        data, stored = self.encode(key, entry)
        fence = "" if ticket is None else ticket
        args = (data, milliseconds(ttl), token, self.channel(key), fence)
        return self.fenced_keys(key), args, stored

    @staticmethod
    def stored(result: object) -> bool:
        """Read a store script's reply: False if it refused the value for its ticket."""
        return result != -1

    def channel(self, key: str) -> str:
        """Return the pub/sub channel announcing stores and releases of *key*."""
        return self._names_of(key)[2]

    def notice(self, key: str, payload: bytes) -> Notice:
        """Read a message from `channel`: the announced entry, or RELEASED.

        An unreadable payload counts as RELEASED: the waiter looks for itself. A
        notice carries the very bytes stored, so it is read bound to the value key.
        It is not reported: it is read by the listener, on behalf of no one call.
        """
        if not payload:
            return RELEASED
        entry = self.decode(key, payload, report=False)
        return RELEASED if entry is None else entry

    @staticmethod
    def get_or_lock_args(
        token: str, lock_ttl: float, *, ignore_value: bool = False
    ) -> list[bytes | str | int]:
        return [token, milliseconds(lock_ttl), MAGIC, int(ignore_value)]

    def claim(self, key: str, reply: Any) -> Entry | Claim | None:
        """Read a GET_OR_LOCK reply: the entry, the holder's token, or None to ask again.

        None means the script returned an envelope that does not decode (another
        serializer's, a later version's, a damaged payload, a signed one forged or
        moved from another key): the caller repeats the
        script with ``ignore_value=True``, and its result will replace the entry.
        """
        if reply[0]:
            return self.decode(key, reply[1])
        _, found, ticket = reply
        # Time stands still inside a script, so a lock that SET NX found held still
        # has its holder for the GET; the empty fallback only keeps the types honest.
        self.clock.learn(int(ticket))
        return Claim(found.decode() if isinstance(found, bytes) else "", int(ticket))

    def encode(self, key: str, entry: Entry) -> tuple[bytes, Entry]:
        """Return the bytes to store and the entry readers will decode from them.

        Decoding here too means a value the serializer cannot read back is refused
        before it is stored, and the computing caller gets what everyone else gets.
        The entry is bound to the value key's full name, prefix included: a signing
        serializer then refuses it anywhere else (copied to another key or prefix).
        """
        name = self.value_key(key)
        try:
            data = self._envelope.encode(entry, key=name)
            return data, self._envelope.decode(data, key=name)
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            raise SerializationError(
                key, type(entry.value), self.serializer.name, str(exc)
            ) from exc

    def decode(
        self, key: str, data: bytes | None, *, report: bool = True
    ) -> Entry | None:
        """Return the entry in *data*, or None if there is none or it is unreadable.

        An unreadable entry is logged and, with *report*, reported to the metrics hook
        of the call reading it (see `_reporting`).
        """
        if data is None:
            return None
        try:
            return self._envelope.decode(data, key=self.value_key(key))
        except ValueError as exc:
            # Never log the bytes: they may hold someone's data.
            logger.warning(
                "unreadable cache entry for key %r treated as a miss: %s", key, exc
            )
            # The type of what the serializer raised, if it raised (see Envelope).
            if report:
                cause = exc if exc.__cause__ is None else exc.__cause__
                report_unreadable(key, type(cause).__name__)
            return None
