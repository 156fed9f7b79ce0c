"""Cache keys: from a template, from a callable, or a stable digest of the arguments."""

from __future__ import annotations

import hashlib
import inspect
import string
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from stampede_guard._encoding import encode
from stampede_guard._identity import Mode, function_id

__all__ = [
    "Binder",
    "KeyMaker",
    "check_template",
    "template_fields",
    "validate_namespace",
]

_SIMPLE_KINDS = frozenset({inspect.Parameter.POSITIONAL_OR_KEYWORD})
_RECEIVERS = frozenset({"self", "cls"})


class Binder:
    """Map a call's arguments to parameter names, defaults applied.

    Plain signatures take a fast path (about a tenth of ``Signature.bind``); anything
    else, and every call the fast path cannot prove valid, goes through
    ``Signature.bind``, which also raises the usual ``TypeError`` for a bad call.
    """

    def __init__(self, signature: inspect.Signature) -> None:
        params = signature.parameters.values()
        self._signature = signature
        self._names = tuple(p.name for p in params)
        self.simple = all(p.kind in _SIMPLE_KINDS for p in params)
        self._defaults = {p.name: p.default for p in params if p.default is not p.empty}

    @property
    def names(self) -> tuple[str, ...]:
        """The parameters' names, in order."""
        return self._names

    def bind(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        names = self._names
        if self.simple and not kwargs and len(args) == len(names):
            return dict(
                zip(names, args, strict=True)
            )  # the common call: all positional
        if self.simple and len(args) <= len(names):
            bound = dict(zip(names, args, strict=False))
            if all(k not in bound for k in kwargs):
                bound.update(kwargs)
                if len(bound) < len(names):
                    for name in names:
                        if name not in bound and name in self._defaults:
                            bound[name] = self._defaults[name]
                if len(bound) == len(names) and all(name in bound for name in names):
                    return {name: bound[name] for name in names}
        call = self._signature.bind(*args, **kwargs)
        call.apply_defaults()
        return call.arguments


class KeyMaker:
    """Turn one call's arguments into its cache key (namespace included).

    Args:
        fn: The decorated function.
        key: A ``str.format`` template over parameter names, a callable taking the
            function's arguments, or None for ``module:qualname:digest-of-arguments``.
        namespace: Put before every key, with a colon, if given.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        key: str | Callable[..., str] | None,
        namespace: str | None,
    ) -> None:
        signature = inspect.signature(fn)
        self._binder = Binder(signature)
        self._prefix = f"{namespace}:" if namespace else ""
        self._template: str | None = None
        self._positional: str | None = None
        self._arity = len(signature.parameters)
        self._key_fn: Callable[..., str] | None = None
        mode: Mode = "name" if key is not None else "named" if namespace else "strict"
        self._function_id = function_id(fn, mode=mode)
        params = list(signature.parameters)
        # A method's receiver is left out of default keys, as dogpile.cache does:
        # instances share entries unless the key names an attribute ({self.id}).
        self._skip = params[0] if params and params[0] in _RECEIVERS else None
        if isinstance(key, str):
            check_template(key, signature, self._function_id)
            self._template = self._prefix + key
            if self._binder.simple:
                self._positional = _positional_template(self._template, signature)
        elif key is not None:
            _check_key_callable(key, signature, self._function_id)
            self._key_fn = key

        #: `__call__` as a closure: the decorator's hot path (a call of a bound
        #: method of this class cost twice as much as the closure, 0.2 us a hit).
        self.make = self._closure()

    @property
    def function_id(self) -> str:
        """How keys and errors name the decorated function."""
        return self._function_id

    def __call__(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
        """Return the cache key for a call with *args* and *kwargs*."""
        return self.make(args, kwargs)

    def _closure(self) -> Callable[[tuple[Any, ...], Mapping[str, Any]], str]:
        finish, slow = self._finish, self._slow
        if self._positional is None:
            return slow
        assert self._template is not None  # noqa: S101 - positional comes from it
        compiled = _compiled(
            self._template, self._arity, self._binder.names, slow, finish
        )
        if compiled is not None:
            return compiled
        fill, arity = self._positional.format, self._arity

        def make(
            args: tuple[Any, ...],
            kwargs: Mapping[str, Any],
            limit: int = MAX_KEY_LENGTH,
        ) -> str:
            if kwargs or len(args) != arity:
                return slow(args, kwargs)
            key = fill(*args)  # every argument positional: no binding needed
            return key if key.isascii() and len(key) <= limit else finish(key)

        return make

    def _slow(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
        return self._finish(self._make(args, kwargs))

    def _finish(self, key: str) -> str:
        return finish_key(key, self._function_id)

    def _make(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
        if self._key_fn is not None:
            made: object = self._key_fn(*args, **kwargs)
            if not isinstance(made, str):
                msg = f"the key callable of {self._function_id} returned {type(made).__qualname__}, not str"
                raise TypeError(msg)
            return self._prefix + made
        bound = self._binder.bind(args, kwargs)
        if self._template is not None:
            return self._template.format_map(bound)
        return f"{self._prefix}{self._function_id}:{self._digest(bound)}"

    def _digest(self, bound: dict[str, Any]) -> str:
        encoded = b"".join(
            encode(name, name, self._function_id)
            + encode(value, name, self._function_id)
            for name, value in bound.items()
            if name != self._skip
        )
        # Stable across processes and runs, unlike the salted builtin hash().
        return hashlib.blake2b(encoded, digest_size=16).hexdigest()


def finish_key(key: str, function_id: str) -> str:
    """Return *key* as stored: checked for text no backend can carry, long ones shortened.

    Every key maker ends with it (the decorator's, the batch decorator's).
    """
    if not key.isascii():  # rare, so the check is almost free
        _check_encodable(key, function_id)
    return key if len(key) <= MAX_KEY_LENGTH else _shorten(key)


def _check_encodable(key: str, function_id: str) -> None:
    """Refuse a key that no backend byte string can carry (a lone surrogate)."""
    try:
        key.encode()
    except UnicodeEncodeError as exc:
        msg = (
            f"the cache key {key!r} of {function_id} is not valid Unicode text "
            f"({exc.reason} at position {exc.start}); pass arguments that are, or "
            "give key= a callable that cleans them"
        )
        raise ValueError(msg) from None


# Keys longer than this (a template filled with a long argument) are shortened to a
# readable head and a digest of the whole key: Redis advises against very long keys,
# and a key must not grow with its arguments.
MAX_KEY_LENGTH = 256


def _shorten(key: str) -> str:
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16)
    return f"{key[:96]}...#{digest.hexdigest()}"


def validate_namespace(namespace: object) -> str | None:
    """Return *namespace* if usable in keys; raise ValueError or TypeError otherwise."""
    if namespace is None:
        return None
    if not isinstance(namespace, str):
        msg = f"namespace must be a str or None, not {type(namespace).__qualname__}"
        raise TypeError(msg)
    if not namespace or any(c in namespace for c in "{}\r\n\x00"):
        msg = f"namespace={namespace!r} must be non-empty, without braces, newlines or NUL"
        raise ValueError(msg)
    return namespace


_EXAMPLES = {"key": "'user:{user_id}'", "tags": "('user:{user_id}',)"}


def template_fields(template: str, what: str) -> list[tuple[str, str]]:
    """Return *template*'s fields, each with its root name (``user`` of ``user.id``).

    Raises:
        ValueError: *template* is not a valid ``str.format`` template.
    """
    try:
        fields = [
            f for _, f, _, _ in string.Formatter().parse(template) if f is not None
        ]
    except ValueError as exc:
        msg = f"{what} template {template!r} is not a valid str.format template: {exc}"
        raise ValueError(msg) from exc
    return [(f, f.split(".", 1)[0].split("[", 1)[0]) for f in fields]


def check_template(
    template: str, signature: inspect.Signature, function_id: str, what: str = "key"
) -> None:
    """Refuse a template that does not parse or names a parameter *fn* lacks.

    *what* is the option (``key``, ``tags``): a key template that names no parameter
    is warned about (every call would share one entry); a tag may be a constant.
    """
    names = set(signature.parameters)
    fields = template_fields(template, what)
    for field, root in fields:
        if root not in names:
            available = ", ".join(sorted(names)) or "none"
            msg = (
                f"{what} template {template!r} names {{{field}}}, but {function_id} has no "
                f"parameter {root!r} (its parameters: {available}); use parameter names "
                f"in braces, e.g. {what}={_EXAMPLES[what]}"
            )
            raise ValueError(msg)
    if what == "key" and not fields and names - _RECEIVERS:
        warnings.warn(
            f"key template {template!r} uses none of the parameters of {function_id}: "
            "every call shares one cache entry",
            stacklevel=4,
        )


def _positional_template(template: str, signature: inspect.Signature) -> str | None:
    """Rewrite *template* to take the arguments by position ("{city}" -> "{0}").

    A call passing every argument positionally then needs no binding at all. None if
    the template nests fields in a format spec, which this rewrite leaves alone.
    """
    index = {name: i for i, name in enumerate(signature.parameters)}
    parts: list[str] = []
    for literal, field, spec, conversion in string.Formatter().parse(template):
        parts.append(literal.replace("{", "{{").replace("}", "}}"))
        if field is None:
            continue
        if spec and "{" in spec:
            return None
        root_end = min(
            (i for i in (field.find("."), field.find("[")) if i >= 0),
            default=len(field),
        )
        parts.append("{" + str(index[field[:root_end]]) + field[root_end:])
        parts.append(f"!{conversion}" if conversion else "")
        parts.append(f":{spec}}}" if spec else "}")
    return "".join(parts)


def _compiled(
    template: str,
    arity: int,
    names: tuple[str, ...],
    slow: Callable[[tuple[Any, ...], Mapping[str, Any]], str],
    finish: Callable[[str], str],
) -> Callable[[tuple[Any, ...], Mapping[str, Any]], str] | None:
    """Return the key maker of *template* as an f-string, for all-positional calls.

    The hot path of every hit: an f-string fills a key in about two thirds of the
    time of ``str.format``, with the same result (each field is ``format(value,
    spec)`` either way). None for a template with attribute or index fields
    (``{user.id}``, ``{d[k]}``), whose lookups ``str.format`` does its own way, or
    nested specs. The source is built from indices only: no text of the template
    is ever part of it (literals and specs are passed as constants).
    """
    if arity == 0:
        return None
    index = {name: i for i, name in enumerate(names)}
    consts: dict[str, object] = {"slow": slow, "finish": finish}
    parts: list[str] = []
    for n, (literal, field, spec, conversion) in enumerate(
        string.Formatter().parse(template)
    ):
        if literal:
            consts[f"_l{n}"] = literal
            parts.append(f"{{_l{n}}}")
        if field is None:
            continue
        if field not in index or (spec and "{" in spec):
            return None
        part = f"a{index[field]}"
        if conversion:
            if conversion not in {"r", "s", "a"}:
                return None
            part += f"!{conversion}"
        if spec:
            consts[f"_s{n}"] = spec
            part += f":{{_s{n}}}"
        parts.append(f"{{{part}}}")
    unpacked = ", ".join(f"a{i}" for i in range(arity))
    source = (
        "def make(args, kwargs):\n"
        f"    if kwargs or len(args) != {arity}:\n"
        "        return slow(args, kwargs)\n"
        f"    {unpacked}, = args\n"
        f'    key = f"{"".join(parts)}"\n'
        f"    return key if key.isascii() and len(key) <= {MAX_KEY_LENGTH} else finish(key)\n"
    )
    exec(compile(source, "<stampede_guard key>", "exec"), consts)  # noqa: S102 - see above
    made: Callable[[tuple[Any, ...], Mapping[str, Any]], str] = consts["make"]  # type: ignore[assignment]
    return made


def _check_key_callable(
    key: Callable[..., str], signature: inspect.Signature, function_id: str
) -> None:
    try:
        key_signature = inspect.signature(key)
    except (TypeError, ValueError):
        return  # builtins without a signature: checked at call time
    positional: list[object] = []
    keywords: dict[str, object] = {}
    for param in signature.parameters.values():
        if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            positional.append(param.name)
        elif param.kind is param.KEYWORD_ONLY:
            keywords[param.name] = param.name
    try:
        key_signature.bind(*positional, **keywords)
    except TypeError as exc:
        msg = (
            f"the key callable {key_signature} cannot take the arguments of "
            f"{function_id}{signature}: {exc}. Give it the same parameters."
        )
        raise TypeError(msg) from None
