"""How the Redis backends name keys and encode what they send and read; no I/O.

Every backend method but a hit's ``GET`` is one script `Call` that the codec prepares
(keys, arguments, and how to read the reply); the sync and asyncio backends only send
it, each its own way (see ``_backend``), so a decision is never written twice.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

from stampede_guard._clock import StepFreeClock
from stampede_guard._entry import FENCE_SECONDS, RELEASED, Claim, Entry, Notice
from stampede_guard._errors import SerializationError
from stampede_guard._reporting import report_unreadable
from stampede_guard._tags import TAG_MESSAGE
from stampede_guard.backends.redis._scripts import ScriptName
from stampede_guard.serializers import (
    FAMILY,
    Envelope,
    JsonSerializer,
    Serializer,
)

__all__ = [
    "Call",
    "RedisCodec",
    "Stamps",
    "Unchecked",
    "check_serializer",
    "lock_key",
    "milliseconds",
    "value_key",
]

T = TypeVar("T")

logger = logging.getLogger("stampede_guard")

# Both keys of one cache key carry the same hash tag, a digest of the cache key, so a
# script touching both stays inside one Redis Cluster slot whatever the key contains
# (a raw "{" or "}" in user text could otherwise make the tag empty or differ).


def _tag(key: str) -> str:
    return hashlib.blake2b(key.encode(), digest_size=8).hexdigest()


def _head(prefix: str, key: str) -> str:
    """Return what every Redis name of *key* starts with, its hash tag included."""
    return f"{prefix}:{{{_tag(key)}}}:"


def value_key(prefix: str, key: str) -> str:
    """Return the Redis key holding the value of cache key *key*."""
    return f"{_head(prefix, key)}v:{key}"


def lock_key(prefix: str, key: str) -> str:
    """Return the Redis key holding the lock of cache key *key*."""
    return f"{_head(prefix, key)}l:{key}"


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


def check_serializer(serializer: object) -> Serializer:
    """Return *serializer*, JSON if None; raise TypeError if it is not a Serializer."""
    if serializer is None:
        return JsonSerializer()
    if not isinstance(serializer, Serializer):
        msg = f"serializer={serializer!r} needs a name and dumps() and loads() methods (see stampede_guard.Serializer)"
        raise TypeError(msg)
    return serializer


Stamps = tuple[tuple[str, str], ...]
"""A tagged value's record: each tag's key and the stamp it had when stored."""


@dataclass(frozen=True, slots=True)
class Unchecked:
    """A tagged entry read on a cluster, whose tags the script could not check.

    It holds only if each tag key still has its stamp in *stamps* (see ``_scripts``):
    the backend fetches them before serving it (see `_many.settled`).
    """

    entry: Entry
    stamps: Stamps


def _stamps(record: Any) -> Stamps:
    """Read a record (a flat list of tag key, stamp) as pairs of text."""
    texts = [part.decode() if isinstance(part, bytes) else str(part) for part in record]
    return tuple(zip(texts[::2], texts[1::2], strict=True))


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One script call of a backend method, and how to read its reply.

    Attributes:
        key: The cache key, named in a `BackendError` if the call fails.
        operation: The backend method, named in that error.
        script: Which script to run (see ``_scripts``).
        keys: The script's KEYS.
        args: The script's ARGV.
        read: Turns the script's reply into the method's result.
        changes: Whether the call may change the stored value (a store or an
            invalidation): a near cache drops its copy around it.
    """

    key: str
    operation: str
    script: ScriptName
    keys: tuple[str, ...]
    args: tuple[Any, ...]
    read: Callable[[Any], T]
    changes: bool = False


class RedisCodec:
    """Key names, script calls and value encoding for one prefix and serializer."""

    # Redis names of recently used cache keys: hashing the tag on every hit costs more
    # than a lookup. Cleared when full, so it never outgrows the working set much.
    _NAMES_KEPT = 4096

    def __init__(
        self, prefix: object, serializer: object, *, cluster: bool = False
    ) -> None:
        self.prefix = validate_prefix(prefix)
        self.cluster = cluster
        # Whether the scripts check tags themselves (see ``_scripts``): not on a
        # cluster, where a tag's stamp is in a slot of its own.
        self._here = "0" if cluster else "1"
        self.serializer = check_serializer(serializer)
        self._envelope = Envelope(self.serializer)
        self._names: dict[str, tuple[str, str, str, str, str]] = {}
        # Cache keys this process has seen hold tagged values: their hits go through
        # the READ script, which checks the tags, instead of a plain GET.
        self._tagged: dict[str, None] = {}
        # Stamps and judges entries by the server's clock, learned from the tickets.
        self.clock = StepFreeClock()
        # Where every store and invalidation announces its cache key to near caches.
        self.near_channel = f"{self.prefix}:near"

    def _names_of(self, key: str) -> tuple[str, str, str, str, str]:
        names = self._names.get(key)
        if names is None:
            head = _head(self.prefix, key)
            names = (
                f"{head}v:{key}",
                f"{head}l:{key}",
                f"{head}n:{key}",
                f"{head}f:{key}",
                f"{head}g:{key}",  # the record of a tagged value's tags
            )
            if len(self._names) >= self._NAMES_KEPT:
                self._names.clear()
            self._names[key] = names
        return names

    def value_key(self, key: str) -> str:
        """Return the Redis key holding the value of *key* (a hit's one ``GET``)."""
        return self._names_of(key)[0]

    def both_keys(self, key: str) -> tuple[str, str]:
        """Return the value and lock keys of *key*."""
        value, lock, _, _, _ = self._names_of(key)
        return value, lock

    def tag_key(self, tag: str) -> str:
        """Return the Redis key holding *tag*'s stamp (see ``_scripts``)."""
        return f"{self.prefix}:tag:{tag}"

    def _tag_args(
        self, key: str, entry: Entry, stamps: Stamps | None
    ) -> tuple[str, str]:
        """Return a store's tag arguments: its tag keys, and the record if given.

        One server: the tag keys, one per line (the script reads their stamps). A
        cluster: the record the client made (`stamp_tag`), as key and stamp lines.
        Both '' for an untagged value.
        """
        if not entry.tags:
            return "", ""
        self.seen_tagged(key)
        if not self.cluster:
            return "\n".join(map(self.tag_key, entry.tags)), ""
        if stamps is None:  # a flow's duty (see _many): never sent unstamped
            msg = "a tagged store on a cluster needs its tags' stamps first"
            raise AssertionError(msg)
        return "", "\n".join(part for pair in stamps for part in pair)

    def stamp_tag(self, tag: str, ticket: int | None, ttl: float) -> Call[str | None]:
        """Return the STAMP_TAG call: *tag*'s stamp for a store, None if refused."""
        args = (_fence(ticket), milliseconds(ttl))
        return Call(tag, "set", "stamp_tag", (self.tag_key(tag),), args, _text)

    def stamp(self, tag_key: str) -> Call[str | None]:
        """Return the STAMP call: the stamp now at *tag_key*, or None."""
        return Call(tag_key, "get", "stamp", (tag_key,), (), _text)

    def seen_tagged(self, key: str) -> None:
        """Remember that *key* holds tagged values: read it through `near_read`."""
        if len(self._tagged) >= self._NAMES_KEPT:
            self._tagged.clear()
        self._tagged[key] = None

    def reads_checked(self, key: str) -> bool:
        """Whether a hit on *key* must check tags: go through `near_read`, not GET.

        True for keys this process has seen tagged: a plain GET cannot tell whether
        a tagged value's tags still hold. A key not seen yet is read with a GET, and
        read again through the script if what it found is tagged (see `tagged`).
        """
        return key in self._tagged

    def tagged(self, key: str, entry: Entry | None) -> bool:
        """Whether a GET found a tagged value, which must be read again, checked."""
        if entry is None or not entry.tags:
            return False
        self.seen_tagged(key)
        return True

    def channel(self, key: str) -> str:
        """Return the pub/sub channel announcing stores and releases of *key*."""
        return self._names_of(key)[2]

    def get_or_lock(
        self,
        key: str,
        token: str,
        lock_ttl: float,
        *,
        ignore_value: bool = False,
        operation: str = "get_or_lock",
    ) -> Call[Entry | Claim | Unchecked | None]:
        """Return the GET_OR_LOCK call: the entry, the holder's token, or None.

        On a cluster, a tagged entry comes back `Unchecked`.

        None means the script returned an envelope that does not decode (another
        serializer's, a later version's, a damaged payload, a signed one forged or
        moved from another key): the caller repeats the call with
        ``ignore_value=True``, and its result will replace the entry.
        """
        args = (token, milliseconds(lock_ttl), FAMILY, int(ignore_value), self._here)

        def read(reply: Any) -> Entry | Claim | Unchecked | None:
            if reply[0] == 2:  # noqa: PLR2004 - a tagged value on a cluster
                entry = self.decode(key, reply[1])
                return None if entry is None else Unchecked(entry, _stamps(reply[2]))
            if reply[0]:
                return self.decode(key, reply[1])
            _, found, ticket = reply
            # Time stands still inside a script, so a lock that SET NX found held
            # still has its holder for the GET; the empty fallback only keeps the
            # types honest.
            self.clock.learn(int(ticket))
            holder = found.decode() if isinstance(found, bytes) else ""
            return Claim(holder, int(ticket))

        value, lock, _, _, record = self._names_of(key)
        keys = (value, lock, record)
        return Call(key, operation, "get_or_lock", keys, args, read)

    def lock(
        self, key: str, token: str, lock_ttl: float, operation: str = "lock"
    ) -> Call[Claim]:
        """Return the call that takes the lock whatever is stored (GET_OR_LOCK)."""
        call = self.get_or_lock(
            key, token, lock_ttl, ignore_value=True, operation=operation
        )
        # Ignoring the value, the script can only answer with the lock's holder.
        return Call(key, operation, call.script, call.keys, call.args, _claim(call))

    def store(
        self,
        key: str,
        entry: Entry,
        ttl: float,
        ticket: int | None,
        *,
        stamps: Stamps | None = None,
    ) -> Call[Entry | None]:
        """Return the SET_AND_NOTIFY call: the entry as readers decode it, or None.

        None if the script refused the value for its *ticket* (see ``_scripts``).
        """
        data, stored = self.encode(key, entry)
        value, _, channel, floor, record = self._names_of(key)
        args = (
            data,
            milliseconds(ttl),
            channel,
            _fence(ticket),
            self.near_channel,
            key,
            *self._tag_args(key, entry, stamps),
        )
        keys = (value, floor, record)
        read = _store_reader(stored)
        return Call(key, "set", "set_and_notify", keys, args, read, changes=True)

    def store_and_unlock(
        self,
        key: str,
        entry: Entry,
        ttl: float,
        token: str,
        ticket: int | None,
        *,
        stamps: Stamps | None = None,
    ) -> Call[Entry | None]:
        """Return the SET_AND_UNLOCK call; it reads as `store`'s."""
        data, stored = self.encode(key, entry)
        value, lock, channel, floor, record = self._names_of(key)
        args = (
            data,
            milliseconds(ttl),
            token,
            channel,
            _fence(ticket),
            self.near_channel,
            key,
            *self._tag_args(key, entry, stamps),
        )
        keys = (value, lock, floor, record)
        read = _store_reader(stored)
        script: ScriptName = "set_and_unlock"
        return Call(key, script, script, keys, args, read, changes=True)

    def unlock(self, key: str, token: str) -> Call[bool]:
        """Return the UNLOCK call: whether *token* held the lock (now released)."""
        lock, channel = self._names_of(key)[1:3]
        return Call(key, "unlock", "unlock", (lock,), (token, channel), bool)

    def extend(self, key: str, token: str, lock_ttl: float) -> Call[bool]:
        """Return the EXTEND call: whether *token* still held the lock (now renewed)."""
        lock = self._names_of(key)[1]
        args = (token, milliseconds(lock_ttl))
        return Call(key, "extend", "extend", (lock,), args, bool)

    def invalidate(self, key: str) -> Call[object]:
        """Return the INVALIDATE call (see `Backend.delete`)."""
        value, lock, channel, floor, _ = self._names_of(key)
        args = (channel, milliseconds(FENCE_SECONDS), self.near_channel, key)
        keys = (value, lock, floor)
        return Call(key, "delete", "invalidate", keys, args, _ignore, changes=True)

    def invalidate_tag(self, tag: str) -> Call[object]:
        """Return the INVALIDATE_TAG call (see `TagBackend.invalidate_tag`).

        Near caches hear of it as a message that no cache key can be (it starts with
        a NUL, which `check_tag` keeps out of tags and the decorator out of keys).
        """
        args = (milliseconds(FENCE_SECONDS), self.near_channel, TAG_MESSAGE + tag)
        keys = (self.tag_key(tag),)
        return Call(tag, "invalidate_tag", "invalidate_tag", keys, args, _ignore)

    def near_read(self, key: str) -> Call[Read]:
        """Return the READ call: the entry, its seconds left in Redis, its size.

        Seconds left is None for an entry without expiry (written around this
        library); the size (the payload's bytes) weighs it in a near cache. On a
        cluster, a tagged entry comes back `Unchecked`.
        """

        def read(reply: Any) -> Read:
            data, left, record = reply
            entry = self.decode(key, data)
            if entry is None:
                return None, 0.0, 0
            found = Unchecked(entry, _stamps(record)) if record else entry
            return found, (None if left < 0 else left / 1000), len(data)

        value, _, _, _, record = self._names_of(key)
        return Call(key, "get", "read", (value, record), (self._here,), read)

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


def _fence(ticket: int | None) -> str | int:
    """Return a store's ticket argument: '' for none (see ``_scripts``)."""
    return "" if ticket is None else ticket


def _store_reader(stored: Entry) -> Callable[[Any], Entry | None]:
    """Return the reader of a store script's reply: -1 means refused for its ticket."""
    return lambda result: None if result == -1 else stored


def _claim(call: Call[Entry | Claim | Unchecked | None]) -> Callable[[Any], Claim]:
    """Return the reader of a GET_OR_LOCK reply that can only name the lock's holder."""
    return lambda reply: cast("Claim", call.read(reply))


def _ignore(_reply: Any) -> object:
    return None


def _text(reply: Any) -> str | None:
    """Read a stamp: text, or None (no stamp, or a store refused)."""
    if not reply:
        return None
    return reply.decode() if isinstance(reply, bytes) else str(reply)


Read = tuple[Entry | Unchecked | None, float | None, int]
"""A READ's result: the entry (`Unchecked` on a cluster), seconds left, size."""
