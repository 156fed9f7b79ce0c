"""Serializers, and the versioned envelope a byte-oriented backend stores.

Envelope, version 1::

    b"SG" | version (1 byte) | created_at (f64) | compute_seconds (f64)
          | len(serializer name) (1 byte) | serializer name | payload

The serializer's name is stored so that bytes written by another serializer (or by
anything else) read as a miss instead of as garbage. New metadata gets a new version.
"""

from __future__ import annotations

import json
import struct
from typing import Protocol, runtime_checkable

from stampede_guard.backends._protocol import Entry

__all__ = ["MAGIC", "JsonSerializer", "Serializer", "decode_entry", "encode_entry"]


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
_NAME_AT = len(MAGIC) + _HEADER.size


def _marker(serializer: Serializer) -> bytes:
    """Return the length-prefixed serializer name that follows the header."""
    name = serializer.name.encode("ascii")
    return bytes((len(name),)) + name


def encode_entry(entry: Entry, serializer: Serializer) -> bytes:
    """Wrap *entry* in a version-1 envelope; serializer errors propagate."""
    return b"".join(
        (
            MAGIC,
            _HEADER.pack(entry.created_at, entry.compute_seconds),
            _marker(serializer),
            serializer.dumps(entry.value),
        )
    )


def decode_entry(data: bytes, serializer: Serializer) -> Entry:
    """Unwrap an envelope made by `encode_entry` with the same serializer.

    Raises:
        ValueError: The bytes are not such an envelope (corrupt, foreign, another
            serializer's or a future version's); the caller treats them as a miss.
    """
    marker = _marker(serializer)
    # Two prefix checks cover the magic, the header's length and the serializer.
    if not (data.startswith(MAGIC) and data.startswith(marker, _NAME_AT)):
        if not data.startswith(MAGIC):
            msg = "not a stampede_guard v1 entry"
        elif len(data) <= _NAME_AT:
            msg = "truncated stampede_guard entry"
        else:
            msg = f"entry was not written by the {serializer.name} serializer"
        raise ValueError(msg)
    created_at, compute_seconds = _HEADER.unpack_from(data, len(MAGIC))
    try:
        value = serializer.loads(data[_NAME_AT + len(marker) :])
    except (ValueError, TypeError) as exc:
        msg = f"payload does not decode with the {serializer.name} serializer"
        raise ValueError(msg) from exc
    return Entry(value, created_at, compute_seconds)
