"""Key layout and Lua sources shared by the Redis backends (sync today, async later)."""

from __future__ import annotations

import hashlib
import re

__all__ = [
    "GET_OR_LOCK",
    "SET_AND_UNLOCK",
    "UNLOCK",
    "lock_key",
    "milliseconds",
    "validate_prefix",
    "value_key",
]

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


# KEYS[1] value key, KEYS[2] lock key; ARGV[1] token, ARGV[2] lock ttl (ms),
# ARGV[3] the envelope's magic prefix, ARGV[4] "1" to ignore the value.
# Returns {1, value} if there is a value, else {0, token of the lock's holder}, having
# taken the lock if it was free (then the holder is ARGV[1]).
# Checking the value and taking the lock in one step is the double-check of the
# classic algorithm with no window between the two. Bytes that are not an envelope
# at all (foreign or corrupt) count as no value, so they get recomputed and replaced.
GET_OR_LOCK = """
if ARGV[4] ~= '1' then
    local value = redis.call('GET', KEYS[1])
    if value and string.sub(value, 1, string.len(ARGV[3])) == ARGV[3] then
        return {1, value}
    end
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
    return {0, ARGV[1]}
end
return {0, redis.call('GET', KEYS[2])}
"""

# KEYS[1] value key, KEYS[2] lock key; ARGV[1] payload, ARGV[2] ttl (ms), ARGV[3] token.
# Stores the value, then deletes the lock only if it still carries our token: a leader
# whose lease ran out must never delete the lock of the leader that replaced it.
SET_AND_UNLOCK = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if redis.call('GET', KEYS[2]) == ARGV[3] then
    redis.call('DEL', KEYS[2])
    return 1
end
return 0
"""

# KEYS[1] lock key; ARGV[1] token. Compare-and-delete.
UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('DEL', KEYS[1])
    return 1
end
return 0
"""
