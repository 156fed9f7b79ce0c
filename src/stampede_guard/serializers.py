"""Serializers, and the versioned envelope a byte-oriented backend stores.

Envelope, version 1::

    b"SG" | version (1 byte) | len(serializer name) (1 byte) | serializer name
          | created_at (f64) | compute_seconds (f64) | payload

The serializer's name is stored so that bytes written by another serializer (or by
anything else) read as a miss instead of as garbage; it comes first so that one prefix
check covers the magic, the version and the serializer. New metadata gets a new version.
"""

from __future__ import annotations

import json
import struct
from typing import Protocol, runtime_checkable

from stampede_guard.backends._protocol import Entry

__all__ = [
    "MAGIC",
    "Envelope",
    "JsonSerializer",
    "Serializer",
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
                serializer's or a future version's); callers treat them as a miss.
        """
        # One prefix check covers the magic, the version and the serializer.
        if not data.startswith(self._prefix) or len(data) < self._start:
            raise ValueError(self._why_not(data))
        created_at, compute_seconds = _HEADER.unpack_from(data, len(self._prefix))
        try:
            value = self.serializer.loads(data[self._start :])
        except (ValueError, TypeError) as exc:
            msg = f"payload does not decode with the {self.serializer.name} serializer"
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
