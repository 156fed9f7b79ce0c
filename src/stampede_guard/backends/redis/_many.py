"""The Redis backends' batch methods: many cache keys per script call; no I/O.

A batch method's call is the single method's `Call` for each cache key (so each key
is decided, encoded and read exactly as the single method does it), joined into one
call of the single script's batch twin (``*_many`` in ``_scripts``): one round trip
for any number of keys on one server. A Redis Cluster refuses one script over keys of
several slots (``CROSSSLOT``), so there the keys are grouped by slot, one call per
group, and the backend sends the groups in one pipeline: one round trip per node.

Each batch method is written once, as a flow (a generator that yields the `Many` it
needs sent and receives their results): the sync and asyncio backends only drive it.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

from redis.crc import key_slot

from stampede_guard._entry import Claim, Entry
from stampede_guard._near import Near
from stampede_guard.backends.redis._codec import (
    Call,
    Read,
    RedisCodec,
    Stamps,
    Unchecked,
)
from stampede_guard.backends.redis._scripts import MANY, ScriptName

__all__ = [
    "Batches",
    "CallFailed",
    "Flow",
    "Many",
    "Pipelined",
    "Writes",
    "get_many",
    "get_or_lock_many",
    "send_only",
    "settle_lock",
    "settle_read",
    "settled",
    "stored",
]

T = TypeVar("T")
R = TypeVar("R")

#: A batch method, sans I/O: yields what to send, receives its results, returns.
Flow = Generator["Many[Any]", list[Any], R]

Item = tuple[str, Entry, float, "int | None"]  # a store's key, entry, ttl, ticket


@dataclass(frozen=True, slots=True)
class Many(Generic[T]):
    """A batch method's script calls (one per slot group) and how to read them.

    Attributes:
        operation: The batch method, named in a `BackendError`.
        keys: The cache keys, in the caller's order (repeats allowed).
        calls: One call per group; each reads its reply as its keys' results.
        where: For each call, the positions in *keys* of its results.
        changes: Whether the calls may change stored values (see `Call.changes`).
    """

    operation: str
    keys: tuple[str, ...]
    calls: tuple[Call[list[T]], ...]
    where: tuple[tuple[int, ...], ...]
    changes: bool

    def read(self, replies: Sequence[Any]) -> list[T]:
        """Return every key's result, in order, from the calls' *replies*."""
        results: list[Any] = [None] * len(self.keys)
        for call, where, reply in zip(self.calls, self.where, replies, strict=True):
            for position, result in zip(where, call.read(reply), strict=True):
                results[position] = result
        return cast("list[T]", results)


def _joined(operation: str, calls: Sequence[Call[T]]) -> Call[list[T]]:
    """Return one call of the batch twin of *calls*' script, deciding each in order."""
    many, _, _ = MANY[calls[0].script]
    keys = tuple(name for call in calls for name in call.keys)
    args = tuple(arg for call in calls for arg in call.args)

    def read(reply: Any) -> list[T]:
        return [call.read(one) for call, one in zip(calls, reply, strict=True)]

    return Call(calls[0].key, operation, many, keys, args, read, calls[0].changes)


def _slot(call: Call[Any]) -> int:
    # Every Redis name of a cache key carries the same hash tag (see _codec).
    return key_slot(call.keys[0].encode())


class Batches:
    """The batch methods' calls for one codec: one call, or one per slot on a cluster.

    Args:
        codec: Makes each key's single call.
        cluster: Whether the keys live on a Redis Cluster (group them by slot).
    """

    def __init__(self, codec: RedisCodec, *, cluster: bool) -> None:
        self._codec = codec
        self.cluster = cluster
        self._group: Callable[[Call[Any]], int] = _slot if cluster else _one_group

    def _many(self, operation: str, calls: Sequence[Call[T]]) -> Many[T]:
        groups: dict[int, list[int]] = {}
        for position, call in enumerate(calls):
            groups.setdefault(self._group(call), []).append(position)
        return Many(
            operation,
            tuple(call.key for call in calls),
            tuple(_joined(operation, [calls[i] for i in g]) for g in groups.values()),
            tuple(tuple(g) for g in groups.values()),
            changes=any(call.changes for call in calls),
        )

    def read(self, keys: Sequence[str]) -> Many[Read]:
        """Return the READ calls of *keys* (see `RedisCodec.near_read`)."""
        return self._many("get_many", [self._codec.near_read(key) for key in keys])

    def get_or_lock(
        self, keys: Sequence[str], token: str, lock_ttl: float
    ) -> Many[Entry | Claim | Unchecked | None]:
        """Return the GET_OR_LOCK calls of *keys* (see `RedisCodec.get_or_lock`)."""
        operation = "get_or_lock_many"
        calls = [
            self._codec.get_or_lock(key, token, lock_ttl, operation=operation)
            for key in keys
        ]
        return self._many(operation, calls)

    def lock(self, keys: Sequence[str], token: str, lock_ttl: float) -> Many[Claim]:
        """Return GET_OR_LOCK calls that ignore the values (see `RedisCodec.lock`)."""
        operation = "get_or_lock_many"
        calls = [self._codec.lock(key, token, lock_ttl, operation) for key in keys]
        return self._many(operation, calls)

    def store(
        self,
        items: Sequence[Item],
        token: str | None,
        stamps: Sequence[Stamps | None],
    ) -> Many[Entry | None]:
        """Return the SET_AND_UNLOCK (with *token*) or SET calls of *items*.

        Each item is (key, entry, ttl, ticket), with its tags' *stamps* on a cluster.
        Every entry is encoded first: one that cannot be raises `SerializationError`
        before anything is sent.
        """
        codec = self._codec
        if token is None:
            calls = [
                codec.store(key, entry, ttl, ticket, stamps=given)
                for (key, entry, ttl, ticket), given in zip(items, stamps, strict=True)
            ]
            return self._many("set", calls)
        calls = [
            codec.store_and_unlock(key, entry, ttl, token, ticket, stamps=given)
            for (key, entry, ttl, ticket), given in zip(items, stamps, strict=True)
        ]
        return self._many("set_and_unlock_many", calls)

    def stamp_tags(
        self, wanted: Sequence[tuple[str, int | None, float]]
    ) -> Many[str | None]:
        """Return the STAMP_TAG calls of (tag, ticket, ttl) items: grouped by slot."""
        calls = [self._codec.stamp_tag(*item) for item in wanted]
        return self._many("set", calls)

    def stamps(self, tag_keys: Sequence[str]) -> Many[str | None]:
        """Return the STAMP calls of *tag_keys*: grouped by slot."""
        return self._many("get", [self._codec.stamp(key) for key in tag_keys])

    def tag_key(self, tag: str) -> str:
        """Return the Redis key of *tag*'s stamp."""
        return self._codec.tag_key(tag)

    def unlock(self, keys: Sequence[str], token: str) -> Many[bool]:
        """Return the UNLOCK calls of *keys* (see `RedisCodec.unlock`)."""
        calls = [self._codec.unlock(key, token) for key in keys]
        return self._many("unlock_many", calls)


def _one_group(_call: Call[Any]) -> int:
    return 0


# --- The flows ------------------------------------------------------------------------


def send_only(many: Many[T]) -> Flow[list[T]]:
    """Send *many* and return its results: a batch method with nothing else to do."""
    results: list[T] = yield many
    return results


def get_or_lock_many(
    batches: Batches, keys: Sequence[str], token: str, lock_ttl: float
) -> Flow[list[Entry | Claim]]:
    """`get_or_lock` per key; an unreadable entry's key is locked as if it had none.

    As the single method does, in a second call, for those keys only (and only if
    there are any: a damaged or foreign payload, a rare event).
    """
    found: list[Any] = yield batches.get_or_lock(keys, token, lock_ttl)
    holds = yield from settled(batches, found)
    for position, result in enumerate(found):
        if type(result) is Unchecked:  # a cluster's tagged value: held, or as none
            found[position] = result.entry if holds[position] else None
    unreadable = [i for i, result in enumerate(found) if result is None]
    if unreadable:
        claims: list[Claim] = yield batches.lock(
            [keys[i] for i in unreadable], token, lock_ttl
        )
        for position, claim in zip(unreadable, claims, strict=True):
            found[position] = claim
    return cast("list[Entry | Claim]", found)


def get_many(
    batches: Batches,
    keys: Sequence[str],
    near: Near | None,
    begin: Callable[[], tuple[Near, int | None, float]],
) -> Flow[list[Entry | None]]:
    """`get` per key: the near cache's hits, then one read of the rest.

    The rest fill the near cache as `get`'s read does: only if nothing changed their
    key since *begin* (called once, before the read is sent; see `Near.admit`).
    """
    found: list[Entry | None] = (
        [None] * len(keys) if near is None else [near.lookup(key) for key in keys]
    )
    missing = [i for i, entry in enumerate(found) if entry is None]
    if not missing:
        return found
    started = None if near is None else begin()
    read: list[Read] = yield batches.read([keys[i] for i in missing])
    holds = yield from settled(batches, [entry for entry, _, _ in read])
    for position, (unsettled, left, size), held in zip(
        missing, read, holds, strict=True
    ):
        entry = _settle(unsettled, held=held)
        found[position] = entry
        if entry is None or started is None:
            continue
        kept, start, began = started
        if start is not None:
            kept.admit(
                keys[position],
                entry,
                start,
                began=began,
                remote_ttl=left,
                weight=size,
            )
    return found


def _settle(found: Entry | Unchecked | None, *, held: bool) -> Entry | None:
    if type(found) is Unchecked:
        return found.entry if held else None
    return cast("Entry | None", found)


def settled(batches: Batches, found: Sequence[object]) -> Flow[list[bool]]:
    """Whether each `Unchecked` of *found* still holds (True for anything else).

    A cluster's tagged value, which its read's script could not check: the stamps of
    all their tags are fetched in one round (one call per slot, one pipeline) and
    compared with each value's record. Nothing is sent when there is none.
    """
    held = [True] * len(found)
    checks = [(i, f) for i, f in enumerate(found) if type(f) is Unchecked]
    if not checks:
        return held
    tag_keys = sorted({key for _, f in checks for key, _ in f.stamps})
    now: list[str | None] = yield batches.stamps(tag_keys)
    current = dict(zip(tag_keys, now, strict=True))
    for position, f in checks:
        held[position] = all(current[key] == stamp for key, stamp in f.stamps)
    return held


def settle_lock(
    batches: Batches, key: str, found: Unchecked, token: str, lock_ttl: float
) -> Flow[Entry | Claim]:
    """`get_or_lock` of *key* after its script returned *found* unchecked (a cluster).

    Its tags still hold: the entry. Else the key is locked as if it had none, as
    for an unreadable entry (a value stored meanwhile is then recomputed once more).
    """
    (held,) = yield from settled(batches, [found])
    if held:
        return found.entry
    claims: list[Claim] = yield batches.lock([key], token, lock_ttl)
    return claims[0]


def settle_read(batches: Batches, read: Read) -> Flow[Read]:
    """A READ's result with an `Unchecked` entry (a cluster) settled: held, or none."""
    entry, left, size = read
    (held,) = yield from settled(batches, [entry])
    settled_entry = _settle(entry, held=held)
    return (settled_entry, left, size) if settled_entry is not None else (None, 0.0, 0)


def stored(
    batches: Batches, items: Sequence[Item], token: str | None
) -> Flow[list[Entry | None]]:
    """`set_and_unlock` (with *token*) or `set` of each item: (key, entry, ttl, ticket).

    On a cluster a script cannot reach a tag's stamp from the value's slot, so each
    tagged item's tags are stamped first (`STAMP_TAG`, one round for all of them): an
    item whose ticket precedes an invalidation of one of its tags is refused (None;
    its lock, if *token* holds it, released as a refused store's is), and the others
    are stored with the stamps as their record (see ``_scripts``).
    """
    stamps: list[Stamps | None] = [None] * len(items)
    refused: set[int] = set()
    wanted = [
        (i, tag) for i, (_, entry, _, _) in enumerate(items) for tag in entry.tags
    ]
    if batches.cluster and wanted:
        got: list[str | None] = yield batches.stamp_tags(
            [(tag, items[i][3], items[i][2]) for i, tag in wanted]
        )
        made: dict[int, list[tuple[str, str]]] = {}
        for (i, tag), stamp in zip(wanted, got, strict=True):
            if stamp is None:
                refused.add(i)
            made.setdefault(i, []).append((batches.tag_key(tag), stamp or ""))
        for i, pairs in made.items():
            stamps[i] = tuple(pairs)
    results: list[Entry | None] = [None] * len(items)
    going = [i for i in range(len(items)) if i not in refused]
    if going:
        sent: list[Entry | None] = yield batches.store(
            [items[i] for i in going], token, [stamps[i] for i in going]
        )
        for i, result in zip(going, sent, strict=True):
            results[i] = result
    if refused and token is not None:
        yield batches.unlock([items[i][0] for i in sorted(refused)], token)
    return results


# --- Sending ----------------------------------------------------------------------------


class Writes:
    """Around a batch write: drop each key's near copy before and after (see `Writing`)."""

    __slots__ = ("keys", "near")

    def __init__(self, near: Near | None, many: Many[Any]) -> None:
        self.near = near if many.changes else None
        self.keys = many.keys

    def __enter__(self) -> None:
        self._drop()

    def __exit__(self, *exc_info: object) -> None:
        self._drop()

    def _drop(self) -> None:
        if self.near is not None:
            for key in self.keys:
                self.near.drop(key)


class CallFailed(Exception):  # noqa: N818 - not an error of ours: it carries the client's
    """A call of a pipeline failed with *cause*, the client's error."""

    def __init__(self, call: Call[Any], cause: BaseException) -> None:
        super().__init__(call.key, cause)
        self.call, self.cause = call, cause


def _no_script(reply: object) -> bool:
    # redis-py's and valkey-py's NoScriptError alike.
    return isinstance(reply, Exception) and any(
        kind.__name__ == "NoScriptError" for kind in type(reply).__mro__
    )


class Pipelined:
    """Calls sent in one pipeline (one round trip per node), and NOSCRIPT handled.

    A pipeline cannot load a script before calling it by digest the way a single
    call does, so a call answered NOSCRIPT (a new or flushed node) is sent again,
    once, after its script is loaded. The driver loops::

        while todo := sent.todo():
            ...queue todo in a pipeline, execute it without raising...
            for name in sent.answer(replies):
                ...load the script *name*...
        return sent.replies()
    """

    def __init__(self, calls: Sequence[Call[Any]]) -> None:
        self._calls = list(calls)
        self._replies: list[Any] = [None] * len(self._calls)
        self._pending = list(range(len(self._calls)))
        self._retried = False

    def todo(self) -> list[Call[Any]]:
        """Return the calls to send now (none: done)."""
        return [self._calls[i] for i in self._pending]

    def answer(self, replies: Sequence[Any]) -> list[ScriptName]:
        """Take the replies of `todo`'s calls; return the scripts to load, if any."""
        for position, reply in zip(self._pending, replies, strict=True):
            self._replies[position] = reply
        missing = (
            []
            if self._retried
            else [i for i in self._pending if _no_script(self._replies[i])]
        )
        self._pending, self._retried = missing, True
        return sorted({self._calls[i].script for i in missing})

    def replies(self) -> list[Any]:
        """Return every call's reply; raise `CallFailed` for the first that failed."""
        for call, reply in zip(self._calls, self._replies, strict=True):
            if isinstance(reply, BaseException):
                raise CallFailed(call, reply)
        return self._replies
