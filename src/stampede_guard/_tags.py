"""Tags: what they may be, and how a decorated function's are made for each call.

A tag names a group of entries that one `invalidate_tag` call invalidates together
(``"user:42"`` for everything cached about user 42). Decorated functions give theirs
as templates over the arguments, or as a callable of the value and the arguments.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

__all__ = ["MAX_TAG_LENGTH", "TAG_MESSAGE", "check_tag", "check_tags"]

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
