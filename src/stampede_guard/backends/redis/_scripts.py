"""The Lua scripts of the Redis backends, and a backend's registered copies of them.

Each backend method that does more than a ``GET`` is one of these scripts: atomic on
the server, and touching only keys of one Redis Cluster slot (see ``_codec``).
"""

from __future__ import annotations

from typing import Any, Final, Literal

from stampede_guard.backends.redis._kept import AsyncKeptConnections, KeptConnections

__all__ = ["SOURCES", "ScriptName", "Scripts"]

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
# ARGV[6] the near caches' channel, ARGV[7] the cache key: a stored value is announced
# there too, so that every process drops its near copy (see stampede_guard._near).
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
redis.call('PUBLISH', ARGV[6], ARGV[7])
return 1
"""
)

# KEYS[1] value key, KEYS[2] floor key; ARGV[1] payload, ARGV[2] ttl (ms), ARGV[3]
# notice channel, ARGV[4] ticket ('' for none), ARGV[5] the near caches' channel,
# ARGV[6] the cache key.
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
redis.call('PUBLISH', ARGV[5], ARGV[6])
return 1
"""
)

# KEYS[1] value key, KEYS[2] lock key, KEYS[3] floor key; ARGV[1] notice channel,
# ARGV[2] fence (ms), ARGV[3] the near caches' channel, ARGV[4] the cache key.
# Invalidation, final: drop the value, revoke the lock (its holder's
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
redis.call('PUBLISH', ARGV[3], ARGV[4])
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


# KEYS[1] value key. A near cache's read: the value and its remaining time (ms; -1
# for none, -2 for no key), so that the near copy never outlives it.
READ = """
return {redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1])}
"""


ScriptName = Literal[
    "extend",
    "get_or_lock",
    "invalidate",
    "read",
    "set_and_notify",
    "set_and_unlock",
    "unlock",
]

# Every script by the name a `Call` gives (see ``_codec``).
SOURCES: Final[dict[ScriptName, str]] = {
    "extend": EXTEND,
    "get_or_lock": GET_OR_LOCK,
    "invalidate": INVALIDATE,
    "read": READ,
    "set_and_notify": SET_AND_NOTIFY,
    "set_and_unlock": SET_AND_UNLOCK,
    "unlock": UNLOCK,
}


class Scripts:
    """A backend's server-side scripts, each called as ``script(keys, args)``.

    Registered with the client, which sends each once and then calls it by digest;
    `send_on` moves the calls to kept connections (see ``_kept``). Both client
    packages' Script objects work alike, sync or asyncio; their typing does not, hence
    Any: `run` returns the reply, or for asyncio clients an awaitable of it.
    """

    __slots__ = ("_calls",)

    def __init__(self, client: Any) -> None:
        self._calls: dict[ScriptName, Any] = {
            name: client.register_script(source) for name, source in SOURCES.items()
        }

    def send_on(self, kept: KeptConnections | AsyncKeptConnections) -> None:
        """Call every script on *kept* connections instead of through the client."""
        self._calls = {name: kept.script(s) for name, s in self._calls.items()}

    def run(
        self, name: ScriptName, keys: tuple[str, ...], args: tuple[Any, ...]
    ) -> Any:
        """Call the script *name* with *keys* and *args* (see `SOURCES`)."""
        return self._calls[name](keys, args)
