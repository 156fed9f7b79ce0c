"""Serializers, and the versioned envelope a byte-oriented backend stores.

Envelope, version 1:

```text
b"SG" | version (1 byte) | len(serializer name) (1 byte) | serializer name
      | created_at (f64) | compute_seconds (f64) | payload
```

The serializer's name is stored so that bytes written by another serializer (or by
anything else) read as a miss instead of as garbage; it comes first so that one prefix
check covers the magic, the version and the serializer. New metadata gets a new version.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import pickle
import struct
from typing import Protocol, runtime_checkable

from stampede_guard.backends._protocol import Entry

__all__ = [
    "MAGIC",
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
    carries an HMAC-SHA256 of its payload under *secret*, checked in constant time
    before anything is unpickled; an entry that fails the check is a miss. The
    algorithm is fixed here, never read from the entry.

    Args:
        secret: At least 32 random bytes, the same in every process sharing the cache
            (``secrets.token_bytes(32)``, kept like a password).
        previous: Secrets still accepted for reading, while you rotate to a new one.
    """

    name = "pickle-hmac-sha256"
    _DOMAIN = b"stampede_guard/pickle-hmac-sha256/v1\x00"
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

    def _mac(self, secret: bytes, payload: bytes) -> bytes:
        return hmac.new(secret, self._DOMAIN + payload, hashlib.sha256).digest()

    def dumps(self, value: object) -> bytes:
        """Pickle *value* and sign it."""
        try:
            payload = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except (pickle.PicklingError, AttributeError) as exc:
            raise TypeError(str(exc)) from exc
        return self._mac(self._secret, payload) + payload

    def loads(self, data: bytes) -> object:
        """Check the signature, then unpickle; ValueError if the check fails."""
        mac, payload = data[: self._MAC_SIZE], data[self._MAC_SIZE :]
        if not any(
            hmac.compare_digest(mac, self._mac(s, payload)) for s in self._accepted
        ):
            msg = "the entry's signature does not match: refused without unpickling"
            raise ValueError(msg)
        return pickle.loads(payload)  # noqa: S301 - authenticated above

    def __repr__(self) -> str:
        return "SignedPickleSerializer(secret=<hidden>)"


MAGIC = b"SG\x01"  # the Redis get_or_lock script checks it server-side too
_HEADER = struct.Struct("!dd")


class Envelope:
    """Encode and decode version-1 envelopes for one serializer.

    Args:
        serializer: What encodes the payload; its name is part of every envelope.
    """

    __slots__ = ("_prefix", "_start", "serializer")

    def __init__(self, serializer: Serializer) -> None:
        name = serializer.name.encode("ascii")
        self.serializer = serializer
        self._prefix = MAGIC + bytes((len(name),)) + name  # magic, version, name
        self._start = len(self._prefix) + _HEADER.size

    def encode(self, entry: Entry) -> bytes:
        """Wrap *entry*; serializer errors propagate."""
        times = _HEADER.pack(entry.created_at, entry.compute_seconds)
        return b"".join((self._prefix, times, self.serializer.dumps(entry.value)))

    def decode(self, data: bytes) -> Entry:
        """Unwrap an envelope made by `encode`.

        Raises:
            ValueError: The bytes are not such an envelope (corrupt, foreign, another
                serializer's or a future version's), or its payload makes the
                serializer raise anything at all; callers treat them as a miss.
        """
        # One prefix check covers the magic, the version and the serializer.
        if not data.startswith(self._prefix) or len(data) < self._start:
            raise ValueError(self._why_not(data))
        created_at, compute_seconds = _HEADER.unpack_from(data, len(self._prefix))
        try:
            value = self.serializer.loads(data[self._start :])
        except Exception as exc:
            # Whatever the payload makes the serializer raise (a RecursionError from
            # JSON nested 100,000 deep, a ModuleNotFoundError from a pickle of a class
            # that is gone) is a poison entry: a miss, recomputed and replaced. Only
            # the exception's type is told: its message may quote the bytes.
            msg = (
                f"payload does not decode with the {self.serializer.name} serializer "
                f"({type(exc).__name__})"
            )
            raise ValueError(msg) from exc
        return Entry(value, created_at, compute_seconds)

    def _why_not(self, data: bytes) -> str:
        if not data.startswith(MAGIC):
            return "not a stampede_guard v1 entry"
        if data.startswith(self._prefix) or len(data) <= len(MAGIC):
            return "truncated stampede_guard entry"
        return f"entry was not written by the {self.serializer.name} serializer"


def encode_entry(entry: Entry, serializer: Serializer) -> bytes:
    """Wrap *entry* in a version-1 envelope; serializer errors propagate."""
    return Envelope(serializer).encode(entry)


def decode_entry(data: bytes, serializer: Serializer) -> Entry:
    """Unwrap an envelope made by `encode_entry` with the same serializer (see `Envelope`)."""
    return Envelope(serializer).decode(data)
