"""Tags: what they may be, and how a decorated function's are made for each call.

A tag names a group of entries that one `invalidate_tag` call invalidates together
(``"user:42"`` for everything cached about user 42). Decorated functions give theirs
as templates over the arguments, or as a callable of the value and the arguments.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Final, NamedTuple

from stampede_guard._keys import Binder, check_template, template_fields

__all__ = [
    "MAX_TAG_LENGTH",
    "TAG_MESSAGE",
    "BatchTags",
    "TagMaker",
    "Tagged",
    "check_tag",
    "check_tags",
    "untagged",
]

#: What starts a near-cache message about a tag instead of a cache key: no tag and no
#: cache key holds a NUL (see `check_tag`, ``_keys``).
TAG_MESSAGE: Final = "\x00tag:"

#: The longest tag, in characters: a tag is a Redis key name, read on tagged hits.
MAX_TAG_LENGTH: Final = 512


def check_tag(tag: object) -> str:
    """Return *tag* if it can name a group of entries; raise naming the fix if not.

    No control characters: a store sends its tags one per line, and near caches tell
    a tag's message from a key's by a leading NUL.
    """
    if not isinstance(tag, str):
        msg = f"a tag must be a str, not {type(tag).__qualname__} ({tag!r}); format it, e.g. f'user:{{user_id}}'"
        raise TypeError(msg)
    if not tag or len(tag) > MAX_TAG_LENGTH:
        msg = f"tag {tag[:40]!r} is {len(tag)} characters long: give 1 to {MAX_TAG_LENGTH}"
        raise ValueError(msg)
    if not tag.isprintable():
        msg = f"tag {tag!r} holds a control character (newline, NUL...): tags are printable text such as 'user:42'"
        raise ValueError(msg)
    return tag


def check_tags(tags: Iterable[object], where: str) -> tuple[str, ...]:
    """Return *tags* checked, without repeats, in order; *where* names their source."""
    if isinstance(tags, str):
        msg = f"{where} returned the str {tags!r}, not a collection of tags; return ({tags!r},) or a list"
        raise TypeError(msg)
    try:
        return tuple(dict.fromkeys(check_tag(tag) for tag in tags))
    except TypeError as exc:
        msg = f"{where}: {exc}"
        raise TypeError(msg) from None


class Tagged(NamedTuple):
    """A computed value with its tags, as a tagged function's computation returns it.

    The plan unwraps it into an `Entry` (see `untagged`); nothing else sees it.
    """

    value: object
    tags: tuple[str, ...]


def untagged(computed: object) -> tuple[object, tuple[str, ...]]:
    """Return a computation's value and its tags (none for an untagged function)."""
    if type(computed) is Tagged:
        return computed.value, computed.tags
    return computed, ()


def _templates_or_callable(
    tags: object, check: Callable[[str], None], example: str
) -> tuple[tuple[str, ...], Callable[..., Iterable[object]] | None]:
    """Read ``tags=``: its templates (each passed to *check*), or its callable."""
    if isinstance(tags, str):
        msg = f"tags={tags!r} is one str; give a tuple of templates, e.g. tags=({tags!r},)"
        raise TypeError(msg)
    if callable(tags):
        return (), tags
    if not isinstance(tags, Iterable):
        msg = f"tags must be templates such as {example} or a callable of the value, not {type(tags).__qualname__}"
        raise TypeError(msg)
    templates = tuple(tags)
    for template in templates:
        if not isinstance(template, str):
            msg = f"tags: {template!r} is not a str template"
            raise TypeError(msg)
        check(template)
    return templates, None


class TagMaker:
    """Make a decorated function's tags for each call: ``tags=`` checked, then applied.

    Args:
        fn: The decorated function.
        tags: ``str.format`` templates over its parameters (``("user:{user_id}",)``),
            or a callable taking the computed value and then the function's
            arguments, returning an iterable of tags.
        function_id: How errors name the function.

    Raises:
        TypeError: *tags* is a str (one template needs a tuple around it), neither
            templates nor a callable, or a template is not a str.
        ValueError: A template does not parse or names a parameter *fn* lacks.
    """

    def __init__(self, fn: Callable[..., Any], tags: object, function_id: str) -> None:
        self._where = f"the tags of {function_id}"
        signature = inspect.signature(fn)
        self._templates, self._of_value = _templates_or_callable(
            tags,
            lambda t: check_template(t, signature, function_id, what="tags"),
            "('user:{user_id}',)",
        )
        self._binder = Binder(signature)

    def of(
        self, value: object, args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> tuple[str, ...]:
        """Return the tags of a call with *args* and *kwargs* that computed *value*."""
        if self._of_value is not None:
            made: Iterable[object] = self._of_value(value, *args, **kwargs)
        else:
            bound = self._binder.bind(args, kwargs)
            made = [template.format_map(bound) for template in self._templates]
        return check_tags(made, self._where)

    def computing(
        self,
        compute: Callable[[], object],
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
    ) -> Callable[[], Tagged]:
        """Return *compute* (a sync call), returning its value with its tags."""

        def tagged() -> Tagged:
            value = compute()
            return Tagged(value, self.of(value, args, kwargs))

        return tagged

    def acomputing(
        self,
        compute: Callable[[], Awaitable[object]],
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
    ) -> Callable[[], Awaitable[Tagged]]:
        """`computing` for an ``async def``: awaits it, then makes the tags."""

        async def tagged() -> Tagged:
            value = await compute()
            return Tagged(value, self.of(value, args, kwargs))

        return tagged


class BatchTags:
    """Make the tags of each id of a batch function (``cached_stampede_safe_batch``).

    Args:
        tags: ``str.format`` templates whose fields are the id (``"user:{}"``,
            ``"org:{0.org_id}"``; a template without a field is a constant tag), or a
            callable taking an id's value (None for an id the function gave none)
            and the id, returning an iterable of tags.
        function_id: How errors name the function.

    Raises:
        TypeError: *tags* is a str, or neither templates nor a callable.
        ValueError: A template does not parse, or names a field other than the id.
    """

    def __init__(self, tags: object, function_id: str) -> None:
        self._where = f"the tags of {function_id}"
        self._templates, self._of_value = _templates_or_callable(
            tags, lambda t: _check_id_template(t, self._where), "('user:{}',)"
        )

    def of(self, id_: object, form: list[object]) -> tuple[str, ...]:
        """Return the tags of *id_*, stored as *form* (``[value]``, or ``[]``: none)."""
        if self._of_value is not None:
            made = self._of_value(form[0] if form else None, id_)
        else:
            made = [template.format(id_) for template in self._templates]
        return check_tags(made, self._where)


def _check_id_template(template: str, where: str) -> None:
    for field, root in template_fields(template, "tags"):
        if root not in {"", "0"}:
            msg = f"{where}: {template!r} names {{{field}}}; a batch's tag templates name only the id, as '{{}}' (or '{{0.attribute}}'), e.g. tags=('user:{{}}',)"
            raise ValueError(msg)
