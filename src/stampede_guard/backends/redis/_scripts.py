"""The Lua scripts of the Redis backends, and a backend's registered copies of them.

Each backend method that does more than a ``GET`` is one of these scripts: atomic on
the server, and touching only keys of one Redis Cluster slot (see ``_codec``). The
batch methods' scripts (``*_many``) run the single scripts' own per-key functions over
many cache keys; on a cluster, a backend sends one per slot (see ``_many``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal

from stampede_guard.backends.redis._kept import AsyncKeptConnections, KeptConnections

__all__ = ["MANY", "SOURCES", "ScriptName", "Scripts"]

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

# Tags (see stampede_guard.backends.TagBackend). A tag key holds a stamp,
# "<invalidated>:<born>" (server microseconds; 0 for never invalidated): the stamp
# changes whenever the tag is invalidated, and a tag key that expired or was evicted
# comes back with another. A tagged value is stored beside a record (a hash in the
# value's slot) of the stamp each of its tags had then; it holds only while every one
# of them is unchanged. So invalidating a tag is one write, whatever the number of
# entries carrying it, and each read checks the tags of what it read in the same
# script. Only a tagged value (a version-2 envelope with flag 2, at a fixed offset
# after the serializer's name) costs the record's look: a plain value holds as is.
# Tag keys are named by the record, not declared in KEYS: a script may reach them on
# one server (or Sentinel), not on a cluster, where a tag's stamp lives in a slot of
# its own. There (*here* is not '1') a read returns the record with the value, and the
# client fetches the stamps and compares them (`_many`: one more round trip); a store
# is given the stamps, which the client fetched first (STAMP_TAG), refusing a ticket
# older than a tag's invalidation. A tag invalidated between the two is still caught:
# the record then holds the older stamp, which no read will find again.
# Anything unexpected (a record or tag key of another type, a stamp that does not
# parse) reads as changed, never as holding: hostile data costs a recomputation. Any
# other error (a user without HGETALL) fails the script: never a silent miss.
_TAGS = (
    _NOW
    + """
local function only_wrongtype(reply)
    if type(reply) == 'table' and reply.err then
        if not string.find(reply.err, 'WRONGTYPE', 1, true) then
            error(reply)
        end
        return true
    end
    return false
end
local function tags_hold(value, record_key, here)
    if string.byte(value, 3) ~= 2 then
        return true
    end
    local flags = string.byte(value, 21 + string.byte(value, 4))
    if not flags or flags % 4 < 2 then
        return true
    end
    local record = redis.pcall('HGETALL', record_key)
    if only_wrongtype(record) or #record == 0 then
        return false
    end
    if here ~= '1' then
        return record
    end
    for i = 1, #record, 2 do
        local stamp = redis.pcall('GET', record[i])
        if only_wrongtype(stamp) or stamp ~= record[i + 1] then
            return false
        end
    end
    return true
end
local function stamp_of(tag_key)
    local stamp = redis.pcall('GET', tag_key)
    if only_wrongtype(stamp) or type(stamp) ~= 'string' then
        return nil, nil
    end
    return stamp, tonumber(string.match(stamp, '^(%d+):%d+$'))
end
local function tags_refuse(tag_keys, ticket)
    if tag_keys == '' or ticket == '' then
        return false
    end
    for tag_key in string.gmatch(tag_keys, '[^\\n]+') do
        local _, invalidated = stamp_of(tag_key)
        if invalidated and invalidated > tonumber(ticket) then
            return true
        end
    end
    return false
end
local function kept_stamp(tag_key, ttl_ms)
    local stamp, invalidated = stamp_of(tag_key)
    if not invalidated then
        stamp = '0:' .. string.format('%.0f', now_us())
        redis.call('SET', tag_key, stamp, 'PX', ttl_ms)
    else
        redis.call('PEXPIRE', tag_key, ttl_ms, 'GT')
    end
    return stamp
end
local function record_tags(record_key, tag_keys, ttl_ms, given)
    if tag_keys == '' and given == '' then
        return
    end
    local stamps = {}
    for part in string.gmatch(given, '[^\\n]+') do
        stamps[#stamps + 1] = part
    end
    for tag_key in string.gmatch(tag_keys, '[^\\n]+') do
        stamps[#stamps + 1] = tag_key
        stamps[#stamps + 1] = kept_stamp(tag_key, ttl_ms)
    end
    redis.call('DEL', record_key)
    redis.call('HSET', record_key, unpack(stamps))
    redis.call('PEXPIRE', record_key, ttl_ms)
end
"""
)

# KEYS[1] value key, KEYS[2] lock key, KEYS[3] tag record key; ARGV[1] token,
# ARGV[2] lock ttl (ms), ARGV[3] the envelopes' magic prefix, ARGV[4] "1" to ignore
# the value, ARGV[5] "1" to check tags here. A tagged value whose tags were
# invalidated counts as none; on a cluster a tagged value comes back as
# {2, value, record} for the client to check (see _TAGS).
# Returns {1, value} if there is a value, else {0, token of the lock's holder, ticket},
# having taken the lock if it was free (then the holder is ARGV[1]).
# Checking the value and taking the lock in one step is the double-check of the
# classic algorithm with no window between the two. Bytes that are not an envelope
# at all (foreign or corrupt) count as no value, so they get recomputed and replaced.
# SET ... NX GET (Redis 7) takes a free lock or reads its holder in one command.
_GET_OR_LOCK = (
    _TAGS
    + """
local function get_or_lock(
    value_key, lock_key, record_key, token, lock_ms, magic, ignore, here
)
    if ignore ~= '1' then
        local value = redis.call('GET', value_key)
        if value and string.sub(value, 1, string.len(magic)) == magic then
            local holds = tags_hold(value, record_key, here)
            if holds == true then
                return {1, value}
            elseif holds then
                return {2, value, holds}
            end
        end
    end
    local holder = redis.call('SET', lock_key, token, 'NX', 'PX', lock_ms, 'GET')
    return {0, holder or token, now_us()}
end
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
# KEYS[4] the tag record key, ARGV[8] the value's tag keys, one per line ('' for
# none): a value is refused like an older one if one of its tags was invalidated
# after its ticket, and stored with the record of its tags' stamps. On a cluster,
# ARGV[9] the record itself (tag key and stamp, one per line; ARGV[8] then '').
# Returns 1 if stored, 0 if fenced off by another holder, -1 if refused for its ticket.
_SET_AND_UNLOCK = (
    _FENCE
    + _TAGS
    + """
local function set_and_unlock(
    value_key, lock_key, floor_key, record_key, payload, ttl_ms, token, channel,
    ticket, near_channel, cache_key, tag_keys, stamps
)
    local refused, had_floor = fence(floor_key, ticket)
    if refused or tags_refuse(tag_keys, ticket) then
        if redis.call('GET', lock_key) == token then
            redis.call('DEL', lock_key)
            redis.call('PUBLISH', channel, '')
        end
        return -1
    end
    local holder = redis.call('GET', lock_key)
    if holder and holder ~= token then
        redis.call('PUBLISH', channel, payload)
        return 0
    end
    redis.call('SET', value_key, payload, 'PX', ttl_ms)
    raise_floor(floor_key, ticket, ttl_ms, had_floor)
    record_tags(record_key, tag_keys, ttl_ms, stamps)
    if holder then
        redis.call('DEL', lock_key)
    end
    redis.call('PUBLISH', channel, payload)
    redis.call('PUBLISH', near_channel, cache_key)
    return 1
end
"""
)

# KEYS[1] value key, KEYS[2] floor key; ARGV[1] payload, ARGV[2] ttl (ms), ARGV[3]
# notice channel, ARGV[4] ticket ('' for none), ARGV[5] the near caches' channel,
# ARGV[6] the cache key; KEYS[3] the tag record key, ARGV[7] the tag keys, ARGV[8]
# the record on a cluster (as above).
# A store without the lock (a waiter that timed out, a refresh), announced like any
# other, and refused like any other for its ticket. Returns 1 if stored, -1 if refused.
_SET_AND_NOTIFY = (
    _FENCE
    + _TAGS
    + """
local function set_and_notify(
    value_key, floor_key, record_key, payload, ttl_ms, channel, ticket,
    near_channel, cache_key, tag_keys, stamps
)
    local refused, had_floor = fence(floor_key, ticket)
    if refused or tags_refuse(tag_keys, ticket) then
        return -1
    end
    redis.call('SET', value_key, payload, 'PX', ttl_ms)
    raise_floor(floor_key, ticket, ttl_ms, had_floor)
    record_tags(record_key, tag_keys, ttl_ms, stamps)
    redis.call('PUBLISH', channel, payload)
    redis.call('PUBLISH', near_channel, cache_key)
    return 1
end
"""
)

# KEYS[1] a tag key; ARGV[1] a store's ticket ('' for none), ARGV[2] its ttl (ms).
# A cluster store's first step (see _TAGS): the tag's stamp, made if there is none and
# kept at least as long as the value; false if the tag was invalidated after the
# ticket (the store is refused).
_STAMP_TAG = (
    _TAGS
    + """
local function stamp_tag(tag_key, ticket, ttl_ms)
    if tags_refuse(tag_key, ticket) then
        return false
    end
    return kept_stamp(tag_key, ttl_ms)
end
"""
)

# KEYS[1] a tag key. A cluster read's second step: the tag's stamp, or false.
_STAMP = (
    _TAGS
    + """
local function stamp(tag_key)
    local found = stamp_of(tag_key)
    return found or false
end
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

# KEYS[1] tag key; ARGV[1] fence (ms), ARGV[2] the near caches' channel, ARGV[3]
# the message telling them a tag changed. Gives the tag a new stamp, later than any
# before it: every value stored with the old one stops holding, and a store whose
# ticket precedes it is refused (for the fence, or longer if the key already lives
# longer: the values carrying it extended it to their own lifetime).
INVALIDATE_TAG = (
    _NOW
    + """
local now = now_us()
local stamp = redis.pcall('GET', KEYS[1])
if type(stamp) == 'string' then
    local since = tonumber(string.match(stamp, '^(%d+):'))
    if since and since >= now then
        now = since + 1
    end
end
local ms = tonumber(ARGV[1])
local left = redis.call('PTTL', KEYS[1])
if left > ms then
    ms = left
end
local text = string.format('%.0f', now)
redis.call('SET', KEYS[1], text .. ':' .. text, 'PX', ms)
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
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
_UNLOCK = """
local function unlock(lock_key, token, channel)
    if redis.call('GET', lock_key) == token then
        redis.call('DEL', lock_key)
        redis.call('PUBLISH', channel, '')
        return 1
    end
    return 0
end
"""


# KEYS[1] value key, KEYS[2] tag record key, ARGV[1] "1" to check tags here. A near
# cache's read (and a tagged value's): the value and its remaining time (ms; -1 for
# none, -2 for no key), so that the near copy never outlives it, and (on a cluster,
# for a tagged value) its record, for the client to check; else an empty list. A
# value whose tags changed reads as none.
_READ = (
    _TAGS
    + """
local function read(value_key, record_key, here)
    local value = redis.call('GET', value_key)
    if not value then
        return {false, -2, {}}
    end
    local holds = tags_hold(value, record_key, here)
    if not holds then
        return {false, -2, {}}
    end
    return {value, redis.call('PTTL', value_key), holds == true and {} or holds}
end
"""
)


@dataclass(frozen=True, slots=True)
class _PerKey:
    """A script's decision for one cache key, as a Lua function, and its arity.

    *keys* and *args* are how many KEYS and ARGV it takes per cache key: its single
    script passes its whole KEYS and ARGV, its batch twin one cache key's after
    another (see `_many`).
    """

    source: str  # the Lua defining *function* (and what it calls)
    function: str
    keys: int
    args: int

    def params(self, k: str, a: str) -> str:
        keys = [f"KEYS[{k}{j}]" for j in range(1, self.keys + 1)]
        return ", ".join(keys + [f"ARGV[{a}{j}]" for j in range(1, self.args + 1)])


def _one(per_key: _PerKey) -> str:
    """Return the script calling *per_key*'s function once, on its KEYS and ARGV."""
    return f"{per_key.source}\nreturn {per_key.function}({per_key.params('', '')})\n"


def _many(per_key: _PerKey) -> str:
    """Return the script calling *per_key*'s function once per cache key, in order.

    KEYS and ARGV are the single script's, one cache key's after another; the reply
    is the list of the single replies. The per-key decision is the very function the
    single script calls, so a batch decides each key exactly as its single twin
    would have, run one after the other (as they are: in order, atomically as a
    whole). One script for many keys is what makes a batch one round trip.
    """
    return f"""{per_key.source}
local replies = {{}}
for i = 0, #KEYS / {per_key.keys} - 1 do
    local k, a = i * {per_key.keys}, i * {per_key.args}
    replies[i + 1] = {per_key.function}({per_key.params("k + ", "a + ")})
end
return replies
"""


ScriptName = Literal[
    "extend",
    "get_or_lock",
    "get_or_lock_many",
    "invalidate",
    "invalidate_tag",
    "read",
    "read_many",
    "set_and_notify",
    "set_and_notify_many",
    "set_and_unlock",
    "set_and_unlock_many",
    "stamp",
    "stamp_many",
    "stamp_tag",
    "stamp_tag_many",
    "unlock",
    "unlock_many",
]

# The scripts decided per cache key, each with its batch twin's name.
_PER_KEY: Final[dict[ScriptName, tuple[ScriptName, _PerKey]]] = {
    "get_or_lock": ("get_or_lock_many", _PerKey(_GET_OR_LOCK, "get_or_lock", 3, 5)),
    "read": ("read_many", _PerKey(_READ, "read", 2, 1)),
    "set_and_unlock": (
        "set_and_unlock_many",
        _PerKey(_SET_AND_UNLOCK, "set_and_unlock", 4, 9),
    ),
    "set_and_notify": (
        "set_and_notify_many",
        _PerKey(_SET_AND_NOTIFY, "set_and_notify", 3, 8),
    ),
    "stamp_tag": ("stamp_tag_many", _PerKey(_STAMP_TAG, "stamp_tag", 1, 2)),
    "stamp": ("stamp_many", _PerKey(_STAMP, "stamp", 1, 0)),
    "unlock": ("unlock_many", _PerKey(_UNLOCK, "unlock", 1, 2)),
}

#: The scripts with a batch twin: the twin's name, and KEYS and ARGV per cache key.
MANY: Final[dict[ScriptName, tuple[ScriptName, int, int]]] = {
    name: (many, one.keys, one.args) for name, (many, one) in _PER_KEY.items()
}

# Every script by the name a `Call` gives (see ``_codec``).
SOURCES: Final[dict[ScriptName, str]] = {
    "extend": EXTEND,
    "invalidate": INVALIDATE,
    "invalidate_tag": INVALIDATE_TAG,
    **{name: _one(one) for name, (_, one) in _PER_KEY.items()},
    **{many: _many(one) for many, one in _PER_KEY.values()},
}


class Scripts:
    """A backend's server-side scripts, each called as ``script(keys, args)``.

    Registered with the client, which sends each once and then calls it by digest;
    `send_on` moves the calls to kept connections (see ``_kept``). Both client
    packages' Script objects work alike, sync or asyncio; their typing does not, hence
    Any: `run` returns the reply, or for asyncio clients an awaitable of it.
    """

    __slots__ = ("_calls", "_client", "_registered")

    def __init__(self, client: Any) -> None:
        self._client = client
        self._registered: dict[ScriptName, Any] = {
            name: client.register_script(source) for name, source in SOURCES.items()
        }
        self._calls = dict(self._registered)

    def send_on(self, kept: KeptConnections | AsyncKeptConnections) -> None:
        """Call every script on *kept* connections instead of through the client."""
        self._calls = {name: kept.script(s) for name, s in self._registered.items()}

    def run(
        self, name: ScriptName, keys: tuple[str, ...], args: tuple[Any, ...]
    ) -> Any:
        """Call the script *name* with *keys* and *args* (see `SOURCES`)."""
        return self._calls[name](keys, args)

    def queue(
        self, pipe: Any, name: ScriptName, keys: tuple[str, ...], args: tuple[Any, ...]
    ) -> None:
        """Add a call of the script *name* by its digest to the pipeline *pipe*.

        Nothing loads it first: a server that lacks it answers NOSCRIPT in that
        call's reply, and the caller `load`s it and sends the call again. (Which is
        why a cluster pipeline refuses its own ``evalsha()``: it could not load the
        script. The raw command goes through, and is routed by its keys' slot.)
        """
        sha = self._registered[name].sha
        pipe.execute_command("EVALSHA", sha, len(keys), *keys, *args)

    def load(self, name: ScriptName) -> Any:
        """Send the script *name* to the server (every master of a cluster)."""
        return self._client.script_load(SOURCES[name])
