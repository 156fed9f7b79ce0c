"""A stable encoding of values: the same bytes in every process, for keys' digests.

Injective and type-tagged (``1``, ``1.0``, ``True`` and ``"1"`` differ), length-prefixed
(no two lists of values run together), and free of anything a process chooses: no
salted ``hash()``, no memory address, no insertion order of a dict or set.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import pathlib
import uuid

__all__ = ["encode", "frame"]


def frame(tag: bytes, data: bytes) -> bytes:
    """Return *data* tagged with *tag* and prefixed with its length."""
    return tag + len(data).to_bytes(8, "big") + data


def encode(value: object, param: str, function_id: str) -> bytes:  # noqa: C901
    """Return an injective, type-tagged, length-prefixed encoding of *value*.

    Equal arguments give equal bytes in every process; ``1``, ``1.0``, ``True`` and
    ``"1"`` differ, and no two different argument lists can run together.
    """

    def sub(item: object) -> bytes:
        return encode(item, param, function_id)

    def qualified(cls: type) -> bytes:
        return f"{cls.__module__}.{cls.__qualname__}".encode()

    match value:
        case None:
            return b"N"
        case bool():
            return b"T" if value else b"F"
        case enum.Enum():  # before int and str: IntEnum and StrEnum are both
            return frame(b"E", qualified(type(value)) + sub(value.value))
        case int() | float() | decimal.Decimal() | uuid.UUID():
            return frame(b"n", f"{type(value).__name__}:{value!r}".encode())
        case str():
            return frame(b"s", value.encode("utf-8", "surrogatepass"))
        case bytes() | bytearray() | memoryview():
            return frame(b"b", bytes(value))
        case dt.date() | dt.time() | dt.timedelta() | pathlib.PurePath():
            return frame(b"o", repr(value).encode())
        case tuple() | list():
            return frame(
                b"t" if isinstance(value, tuple) else b"l", b"".join(map(sub, value))
            )
        case dict():
            # Sorted so that insertion order does not matter: {a, b} == {b, a}.
            pairs = sorted(frame(b"p", sub(k) + sub(v)) for k, v in value.items())
            return frame(b"d", b"".join(pairs))
        case set() | frozenset():
            return frame(b"S", b"".join(sorted(map(sub, value))))
        case _ if dataclasses.is_dataclass(value) and not isinstance(value, type):
            fields = (
                sub(f.name) + sub(getattr(value, f.name))
                for f in dataclasses.fields(value)
            )
            return frame(b"D", qualified(type(value)) + b"".join(fields))
        case _:
            kind = type(value)
            msg = (
                f"cannot build a default cache key for {function_id}: argument {param!r} is "
                f"a {kind.__module__}.{kind.__qualname__}, which has no stable text form "
                f"(its repr may hold a memory address). Name what identifies it in a key "
                f"template, e.g. key='...{{{param}.id}}', or pass key=callable."
            )
            raise TypeError(msg)
