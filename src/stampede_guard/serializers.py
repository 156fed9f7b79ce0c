"""Serializers, and the versioned envelope a byte-oriented backend stores.

Envelope, version 1:

```text
b"SG" | version (1 byte) | len(serializer name) (1 byte) | serializer name
      | created_at (f64) | compute_seconds (f64) | payload
```

The serializer's name is stored so that bytes written by another serializer (or by
anything else) read as a miss instead of as garbage; it comes first so that one prefix
check covers the magic, the version and the serializer. New metadata gets a new version.

Version 2, for entries that carry tags or a cached failure (a plain value is still
written as version 1, so a process running an older release reads it as before, and
reads a version-2 entry as a miss):

```text
b"SG" | 2 | len(serializer name) | serializer name | created_at (f64)
      | compute_seconds (f64) | flags (1 byte: 1 = failure, 2 = tagged)
      | number of tags (u16) | per tag: len (u16) + UTF-8 | payload
```

The flags sit at a fixed offset after the name, so a server-side script can tell a
tagged entry (whose tags it must check) without decoding the rest. A failure's payload
is the serializer's encoding of ``{"type": ..., "message": ...}``.

Every entry is bound to where it is stored. A serializer that authenticates its payload
(a `BoundSerializer`, such as `SignedPickleSerializer`) is handed a context to
authenticate with it: the stored key's name and every header byte above, so that an
entry copied to another key or prefix, or with its times edited, reads as a miss. The
times are checked for every serializer: one that is not finite, or a negative
computation time, makes the entry unreadable, since an unsigned entry can be written by
anyone who can write to Redis.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import pickle
import struct
from typing import Protocol, cast, runtime_checkable

from stampede_guard._entry import CachedFailure, Entry

__all__ = [
    "FAMILY",
    "MAGIC",
    "BadSignatureError",
    "BoundSerializer",
    "Envelope",
    "JsonSerializer",
    "Serializer",
    "SignedPickleSerializer",
    "decode_entry",
    "encode_entry",
]


@runtime_checkable
class Serializer(Protocol):
    """Turns values into bytes and back; *name* identifies the format in the envelope."""

    @property
    def name(self) -> str:
        """A short ASCII name, at most 255 bytes, stored with every entry."""

    def dumps(self, value: object) -> bytes:
        """Encode *value*; raise TypeError or ValueError if it cannot be encoded."""

    def loads(self, data: bytes) -> object:
        """Decode what `dumps` produced; raise ValueError on bytes it did not produce."""


@runtime_checkable
class BoundSerializer(Serializer, Protocol):
    """A Serializer that authenticates each payload together with where it is stored.

    The envelope calls these instead of `dumps` and `loads` when a serializer has them.
    *context* is associated data: authenticated with the payload but not stored in it
    (the stored key's name and the envelope's header), so a payload read back with any
    other context must be refused, as if forged.
    """

    def dumps_bound(self, value: object, context: bytes) -> bytes:
        """Encode *value* bound to *context*; raise TypeError or ValueError as `dumps`."""

    def loads_bound(self, data: bytes, context: bytes) -> object:
        """Decode what `dumps_bound` produced with the same *context*, else ValueError."""


class BadSignatureError(ValueError):
    """An entry's signature does not match: forged, moved, or signed otherwise.

    Otherwise: with a secret that is not accepted, or in an older signing format. The
    entry is refused before it is decoded, and read as a miss.
    """


class JsonSerializer:
    """JSON, the safe default: reading a cache entry can never run code.

    Tuples come back as lists and dict keys as strings, as with any JSON.
    NaN and infinities are rejected rather than written as non-standard JSON.
    """

    name = "json"

    def dumps(self, value: object) -> bytes:
        """Encode *value* as compact UTF-8 JSON."""
        return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()

    def loads(self, data: bytes) -> object:
        """Decode UTF-8 JSON."""
        return json.loads(data)

    def __repr__(self) -> str:
        return "JsonSerializer()"


class SignedPickleSerializer:
    """Pickle, signed with HMAC-SHA256: any picklable value, and no code from strangers.

    Unpickling runs code chosen by whoever wrote the bytes, so a plain pickle cache
    lets anyone who can write to Redis run code in every reader. Here every entry
    carries an HMAC-SHA256 under *secret*, checked in constant time before anything is
    unpickled; an entry that fails the check is a miss. The MAC covers the payload and
    the context the envelope binds it to: the stored key's full name (prefix included)
    and every header field (magic, version, serializer name, created_at,
    compute_seconds). So an entry moved to another key or another prefix sharing the
    secret, or with forged times, is refused like a forged payload. The algorithm is
    fixed here, never read from the entry, and the signing format's version is part of
    the MAC: entries signed in an older format read as a miss and are recomputed.

    Args:
        secret: At least 32 random bytes, the same in every process sharing the cache
            (``secrets.token_bytes(32)``, kept like a password).
        previous: Secrets still accepted for reading, while you rotate to a new one.
    """

    name = "pickle-hmac-sha256"
    # v1 signed the payload only; v2 binds the context too (see the class docstring).
    _DOMAIN = b"stampede_guard/pickle-hmac-sha256/v2\x00"
    _MAC_SIZE = 32

    def __init__(self, secret: bytes, *, previous: tuple[bytes, ...] = ()) -> None:
        # Checked at run time too, for callers whose types mypy never saw.
        candidates: tuple[object, ...] = (secret, *previous)
        for candidate in candidates:
            if not isinstance(candidate, bytes) or len(candidate) < self._MAC_SIZE:
                msg = (
                    "the secret must be at least 32 bytes, e.g. secrets.token_bytes(32)"
                )
                raise ValueError(msg)
        self._secret = secret
        self._accepted = (secret, *previous)

    def _mac(self, secret: bytes, context: bytes, payload: bytes) -> bytes:
        # The context's length goes first, so no split of context and payload other
        # than the one signed can give the same MAC.
        mac = hmac.new(secret, self._DOMAIN, hashlib.sha256)
        mac.update(_LENGTH.pack(len(context)))
        mac.update(context)
        mac.update(payload)
        return mac.digest()

    def dumps_bound(self, value: object, context: bytes) -> bytes:
        """Pickle *value* and sign it together with *context*."""
        try:
            payload = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except (pickle.PicklingError, AttributeError) as exc:
            raise TypeError(str(exc)) from exc
        return self._mac(self._secret, context, payload) + payload

    def loads_bound(self, data: bytes, context: bytes) -> object:
        """Check the signature over *data* and *context*, then unpickle.

        Raises:
            BadSignatureError: The check failed; nothing was unpickled.
        """
        mac, payload = data[: self._MAC_SIZE], data[self._MAC_SIZE :]
        if not any(
            hmac.compare_digest(mac, self._mac(s, context, payload))
            for s in self._accepted
        ):
            msg = "the entry's signature does not match: refused without unpickling"
            raise BadSignatureError(msg)
        return pickle.loads(payload)  # noqa: S301 - authenticated above

    def dumps(self, value: object) -> bytes:
        """Pickle *value* and sign it, bound to no context (for use without an envelope)."""
        return self.dumps_bound(value, b"")

    def loads(self, data: bytes) -> object:
        """Check the signature of what `dumps` produced, then unpickle; else ValueError."""
        return self.loads_bound(data, b"")

    def __repr__(self) -> str:
        return "SignedPickleSerializer(secret=<hidden>)"


MAGIC = b"SG\x01"
#: What every version's envelope starts with: the Redis scripts check it server-side.
FAMILY = b"SG"
_V2 = b"SG\x02"
_HEADER = struct.Struct("!dd")
_FAILURE, _TAGGED = 1, 2  # version 2's flags
_COUNT = struct.Struct("!H")  # tags, and each tag's length
_LENGTH = struct.Struct("!Q")


class Envelope:
    """Encode and decode envelopes (version 1, or 2 for tags and failures) for one serializer.

    Args:
        serializer: What encodes the payload; its name is part of every envelope.
    """

    __slots__ = ("_bound", "_prefix", "_prefix2", "_start", "serializer")

    def __init__(self, serializer: Serializer) -> None:
        name = serializer.name.encode("ascii")
        self.serializer = serializer
        # Asked once: a runtime Protocol check costs microseconds, every hit reads.
        self._bound = serializer if isinstance(serializer, BoundSerializer) else None
        self._prefix = MAGIC + bytes((len(name),)) + name  # magic, version, name
        self._prefix2 = _V2 + bytes((len(name),)) + name
        self._start = len(self._prefix) + _HEADER.size

    def encode(self, entry: Entry, *, key: str = "") -> bytes:
        """Wrap *entry*, bound to *key*; serializer errors propagate.

        Args:
            entry: What to wrap.
            key: Where it will be stored (for Redis, the value key's full name); an
                authenticating serializer's entry then reads back under this key only.
        """
        times = _HEADER.pack(entry.created_at, entry.compute_seconds)
        value = entry.value
        failure = isinstance(value, CachedFailure)
        if isinstance(value, CachedFailure) or entry.tags:
            header = self._prefix2 + times + _extra(entry.tags, failure=failure)
            if isinstance(value, CachedFailure):
                value = {"type": value.type_name, "message": value.message}
        else:
            header = self._prefix + times
        if self._bound is not None:
            payload = self._bound.dumps_bound(value, _context(key, header))
        else:
            payload = self.serializer.dumps(value)
        return header + payload

    def decode(self, data: bytes, *, key: str = "") -> Entry:
        """Unwrap an envelope made by `encode` with the same *key*.

        Raises:
            ValueError: The bytes are not such an envelope (corrupt, foreign, another
                serializer's or a future version's), its times are not finite or its
                computation time is negative, its tags or failure do not read, or its
                payload makes the serializer raise anything at all (an authenticating
                serializer's included, for an entry made under another key, or with
                other header bytes); callers treat them all as a miss.
        """
        # One prefix check covers the magic, the version and the serializer.
        tags: tuple[str, ...] = ()
        if data.startswith(self._prefix) and len(data) >= self._start:
            start, failure = self._start, False
        elif data.startswith(self._prefix2) and len(data) >= self._start:
            start, tags, failure = _read_extra(data, self._start)
        else:
            raise ValueError(self._why_not(data))
        created_at, compute_seconds = _HEADER.unpack_from(data, len(self._prefix))
        # For every serializer, signed or not: a NaN or infinite time would poison the
        # freshness arithmetic, and a huge computation time makes XFetch refresh on
        # every call; a negative one means nothing honest wrote it.
        if not (
            math.isfinite(created_at)
            and math.isfinite(compute_seconds)
            and compute_seconds >= 0
        ):
            msg = "entry has a time that is not finite, or a negative computation time"
            raise ValueError(msg)
        payload = data[start:]
        try:
            if self._bound is not None:
                context = _context(key, data[:start])
                value = self._bound.loads_bound(payload, context)
            else:
                value = self.serializer.loads(payload)
        except Exception as exc:
            # Whatever the payload makes the serializer raise (a RecursionError from
            # JSON nested 100,000 deep, a ModuleNotFoundError from a pickle of a class
            # that is gone, a BadSignatureError) is a poison entry: a miss, recomputed
            # and replaced. Only the exception's type is told: its message may quote
            # the bytes.
            msg = (
                f"payload does not decode with the {self.serializer.name} serializer "
                f"({type(exc).__name__})"
            )
            raise ValueError(msg) from exc
        if failure:
            value = _failure(value)
        return Entry(value, created_at, compute_seconds, tags)

    def _why_not(self, data: bytes) -> str:
        if not data.startswith(FAMILY) or len(data) <= len(MAGIC):
            return "not a stampede_guard entry"
        if not data.startswith((MAGIC, _V2)):
            return "a stampede_guard entry of a later version"
        if data.startswith((self._prefix, self._prefix2)):
            return "truncated stampede_guard entry"
        return f"entry was not written by the {self.serializer.name} serializer"


def _extra(tags: tuple[str, ...], *, failure: bool) -> bytes:
    """Return version 2's flags and tags (see the module)."""
    flags = (_FAILURE if failure else 0) | (_TAGGED if tags else 0)
    parts = [bytes((flags,)), _COUNT.pack(len(tags))]
    for tag in tags:
        text = tag.encode("utf-8")
        parts += [_COUNT.pack(len(text)), text]
    return b"".join(parts)


def _read_extra(data: bytes, at: int) -> tuple[int, tuple[str, ...], bool]:
    """Read version 2's flags and tags at *at*: where the payload starts, tags, failure."""
    flags = 0
    try:
        flags = data[at]
        (count,) = _COUNT.unpack_from(data, at + 1)
        at += 1 + _COUNT.size
        tags = []
        for _ in range(count):
            (size,) = _COUNT.unpack_from(data, at)
            at += _COUNT.size
            text = data[at : at + size]
            tags.append(text.decode("utf-8") if len(text) == size else None)
            at += size
    except (IndexError, struct.error, UnicodeDecodeError):
        tags = [None]
    if None in tags:
        msg = "truncated stampede_guard entry (its tags do not read)"
        raise ValueError(msg)
    if flags & ~(_FAILURE | _TAGGED) or bool(flags & _TAGGED) != bool(tags):
        msg = "stampede_guard entry with unknown flags"
        raise ValueError(msg)
    return at, tuple(cast("list[str]", tags)), bool(flags & _FAILURE)


def _failure(value: object) -> CachedFailure:
    """Read a failure's payload; anything but its two strings is unreadable."""
    if isinstance(value, dict):
        kind, message = value.get("type"), value.get("message")
        if isinstance(kind, str) and isinstance(message, str):
            return CachedFailure(kind, message)
    msg = "stampede_guard failure entry without its type and message"
    raise ValueError(msg)


def _context(key: str, header: bytes) -> bytes:
    """Return what a bound payload is authenticated with: *key*, then the header.

    The key's length goes first; the header delimits itself (a name length, then
    fixed-size times), and the serializer length-prefixes the whole.
    """
    name = key.encode("utf-8", "surrogatepass")
    return _LENGTH.pack(len(name)) + name + header


def encode_entry(entry: Entry, serializer: Serializer, *, key: str = "") -> bytes:
    """Wrap *entry* in a version-1 envelope bound to *key* (see `Envelope.encode`)."""
    return Envelope(serializer).encode(entry, key=key)


def decode_entry(data: bytes, serializer: Serializer, *, key: str = "") -> Entry:
    """Unwrap an envelope made by `encode_entry` with the same serializer and *key*."""
    return Envelope(serializer).decode(data, key=key)
