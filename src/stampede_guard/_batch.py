"""The batch decorator's decisions, with no I/O: keys, stored forms, sorting, checks.

A batch function maps many ids to their values in one call (``users(ids) ->
{id: user}``); each id is cached under its own key, so a batch call and the calls
around it share every entry. The shells (``_batch_wrappers``) do the I/O, sync or
asyncio, and ask this module every question, so the two never decide apart.

What a batch stores for an id is a list: ``[value]`` for an id the function returned,
``[]`` for one it left out of its mapping ("no value": a missing user is remembered as
missing, instead of being asked for on every call; ``cache_none=False`` keeps it out of
the cache). So "no value" and a value of None stay apart, in every serializer.
A *ttl* or *stale_ttl* function of the value is asked of the value in the form
(`of_form`); an id with no value has none to ask, and is not stored.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from stampede_guard._cache_options import Seconds
from stampede_guard._context import Context
from stampede_guard._entry import Claim, Entry
from stampede_guard._freshness import RefreshDue, refresh_reason
from stampede_guard._keys import finish_key

__all__ = [
    "BatchKeys",
    "Found",
    "Locked",
    "check_result",
    "of_form",
    "stored_form",
    "unique",
    "value_of",
]

NO_VALUE: list[Any] = []  # the stored form of an id the function left out


class BatchKeys:
    """Turn an id into its cache key: a template with one field, and the namespace.

    Args:
        template: A ``str.format`` template with exactly one replacement field, the
            id: ``"user:{}"``, ``"user:{0}"``, ``"price:{!r}"``, ``"row:{:08d}"``.
        namespace: Put before every key, with a colon, if given.
        function_id: Names the function in error messages.
    """

    def __init__(
        self, template: object, namespace: str | None, function_id: str
    ) -> None:
        self.template = _check_template(template, function_id)
        self._prefix = f"{namespace}:" if namespace else ""
        self._fill = (self._prefix + self.template).format
        self._function_id = function_id

    def __call__(self, id_: object) -> str:
        """Return the cache key of *id_*."""
        return finish_key(self._fill(id_), self._function_id)


def _check_template(template: object, function_id: str) -> str:
    if not isinstance(template, str):
        msg = f"key={template!r} of {function_id} must be a str.format template with one field for the id, such as 'user:{{}}'"
        raise TypeError(msg)
    try:
        fields = [
            f for _, f, _, _ in string.Formatter().parse(template) if f is not None
        ]
    except ValueError as exc:
        msg = f"key={template!r} of {function_id} is not a valid str.format template ({exc}); write literal braces as {{{{ and }}}}"
        raise ValueError(msg) from None
    if len(fields) != 1 or fields[0] not in {"", "0"}:
        msg = f"key={template!r} of {function_id} must have exactly one field, the id: '{{}}' or '{{0}}' (with a format spec if you like, such as 'row:{{:08d}}')"
        raise ValueError(msg)
    return template


def unique(ids: Iterable[Any], function_id: str) -> list[Any]:
    """Return *ids* without repeats, in order; raise TypeError for an unhashable id."""
    if isinstance(ids, (str, bytes)):
        msg = f"{function_id} takes a collection of ids, not one {type(ids).__name__}: pass [{ids!r}]"
        raise TypeError(msg)
    given = list(ids)  # an iterator is read once
    try:
        return list(dict.fromkeys(given))
    except TypeError:
        bad = next(i for i in given if not _hashes(i))
        msg = f"{function_id}: the id {bad!r} is not hashable; ids are dictionary keys, so pass hashable ones (a tuple of hashable things rather than a list)"
        raise TypeError(msg) from None


def _hashes(id_: object) -> bool:
    # Not isinstance(id_, Hashable): a tuple holding a list is one, and fails to hash.
    try:
        hash(id_)
    except TypeError:
        return False
    return True


def keys_of(
    ids: Sequence[Any], key_of: Callable[[Any], str], function_id: str
) -> dict[str, Any]:
    """Return the id of each key; raise ValueError if two ids share one."""
    id_of: dict[str, Any] = {}
    for id_ in ids:
        key = key_of(id_)
        other = id_of.setdefault(key, id_)
        if other is not id_:
            msg = f"{function_id}: the ids {other!r} and {id_!r} have one cache key, {key!r}, so one would be served the other's value: give key= a template that tells them apart, such as one with {{!r}}"
            raise ValueError(msg)
    return id_of


def stored_form(result: Mapping[Any, Any], id_: object) -> list[Any]:
    """Return what is stored for *id_* after a computation returned *result*."""
    return [result[id_]] if id_ in result else NO_VALUE


def value_of(stored: object) -> list[Any] | None:
    """Return the stored form, or None if *stored* is not one (someone else's entry)."""
    if isinstance(stored, list) and len(stored) <= 1:
        return stored
    return None


def caches(stored: object, *, cache_none: bool) -> bool:
    """Whether a stored form is to be stored (the batch policy's ``should_cache``)."""
    form = value_of(stored)
    if form is None:
        return False
    if not form:
        return cache_none  # no value: remembered as such, unless told not to
    return form[0] is not None or cache_none


def of_form(setting: Seconds) -> Seconds:
    """Return *setting* (*ttl* or *stale_ttl*) as the batch policy asks it: of a stored form.

    A function of the value is asked of the value in ``[value]``; for an id with no
    value (``[]``) there is nothing to ask, so it counts as 0: with a *ttl* function,
    "no value" is not stored (asked for again on the next call); with a *stale_ttl*
    function, it has no stale period. A number stays as it is.
    """
    if not callable(setting):
        return setting
    of_value = setting

    def asked(stored: object) -> float:
        form = value_of(stored)
        return of_value(form[0]) if form else 0

    return asked


def check_result(
    result: object, asked: Sequence[Any], function_id: str
) -> Mapping[Any, Any]:
    """Return the function's *result* if it is a mapping of ids it was *asked* for."""
    if not isinstance(result, Mapping):
        msg = f"{function_id} returned {type(result).__name__}, not a mapping of ids to values: return {{id: value for id in ids}} (leave out the ids that have no value)"
        raise TypeError(msg)
    extra = [k for k in result if k not in set(asked)] if len(result) else []
    if extra:
        shown = ", ".join(repr(k) for k in extra[:3])
        msg = f"{function_id} returned ids it was not asked for ({shown}{', ...' if len(extra) > 3 else ''}): return only the ids it was called with, which are the missing ones"  # noqa: PLR2004
        raise ValueError(msg)
    return result


@dataclass(slots=True)
class Found:
    """What reads found: values to serve, values due for a refresh, and the misses."""

    served: dict[str, list[Any]] = field(default_factory=dict)
    due: dict[str, RefreshDue] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)


def sort_found(
    keys: Sequence[str], found: Sequence[Entry | None], ctx: Context
) -> Found:
    """Sort the entries *found* for *keys*: fresh, due for a refresh, or missing."""
    sorted_ = Found()
    for key, entry in zip(keys, found, strict=True):
        form = None if entry is None else value_of(entry.value)
        if entry is None or form is None:
            sorted_.missing.append(key)
            continue
        if ctx.policy.refreshes:
            reason = refresh_reason(key, entry, ctx)
            if reason is not None:
                sorted_.due[key] = RefreshDue(entry, reason)
                continue
        sorted_.served[key] = form
    return sorted_


@dataclass(slots=True)
class Locked:
    """What one look-or-lock of many keys found: values, locks taken, locks held.

    *foreign*: keys holding an entry that is not a batch's stored form (another
    function's, an older format): no lock was taken, and they are to be locked
    whatever is stored, then computed and replaced like misses.
    """

    served: dict[str, list[Any]] = field(default_factory=dict)
    mine: dict[str, int | None] = field(default_factory=dict)  # key -> its ticket
    elsewhere: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)

    def add(self, other: Locked) -> None:
        """Take in what a second look found."""
        self.served.update(other.served)
        self.mine.update(other.mine)
        self.elsewhere.extend(other.elsewhere)
        self.foreign.extend(other.foreign)


def sort_claims(
    keys: Sequence[str], claims: Sequence[Entry | str], token: str
) -> Locked:
    """Sort the answers of a look-or-lock of *keys* made with *token*."""
    sorted_ = Locked()
    for key, claim in zip(keys, claims, strict=True):
        if isinstance(claim, Entry):
            form = value_of(claim.value)
            if form is not None:
                sorted_.served[key] = form
                continue
            sorted_.foreign.append(key)
        elif claim == token:
            sorted_.mine[key] = claim.ticket if isinstance(claim, Claim) else None
        else:
            sorted_.elsewhere.append(key)
    return sorted_
