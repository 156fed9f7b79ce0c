"""What names a function in its default cache keys: a stable identity, or a refusal.

A qualified name tells module-level functions and methods apart, but not the closures
one factory makes, two lambdas, or two functions defined under one name inside a
function: serving one's value to the other is a wrong value. Those default keys also
carry a digest of the definition::

    module-level function or method    module:qualname             (as it always was)
    lambda, or defined in a function   module:qualname#<code and captured values>
    a module-level f defined again     module:qualname#<code> (the first keeps its key)
    functools.partial                  <its function's id>:partial-<bound arguments>

The digest leaves out line numbers and file paths: moving a function, or installing
the code in another directory, keeps its keys; two functions with equal code and equal
captured values in one module compute the same values, so may share keys. Bytecode
differs between Python versions, and so do these keys (a cold cache). A captured value
with no form that is the same in every process (a lock, a client) is refused, with a
`TypeError` that names ``key=`` and ``namespace=``.
"""

from __future__ import annotations

import functools
import hashlib
import sys
import types
from collections.abc import Callable, Mapping
from typing import Any, Literal

from stampede_guard._encoding import encode, frame

__all__ = ["Mode", "function_id", "module_of"]


# "strict": default keys; "named": default keys under a namespace, which names the
# function; "name": for messages only (key= is given).
Mode = Literal["strict", "named", "name"]


def function_id(fn: Callable[..., Any], *, mode: Mode) -> str:
    """Name *fn* in default keys and messages (see the table above).

    Raises:
        TypeError: In "strict" mode, *fn* is a callable object, or captures or binds a
            value with no form that is the same in every process. Under a namespace
            such a value is left out: the namespace names the function.
    """
    if isinstance(fn, functools.partial):
        inner = function_id(fn.func, mode=mode)
        if mode == "name":
            return f"{inner}:partial"
        identify = _Identify(inner, strict=mode == "strict", own_name="")
        bound = b"".join(identify.value(v, "binds an argument") for v in fn.args)
        bound += b"".join(
            encode(name, name, inner) + identify.value(value, f"binds {name!r}")
            for name, value in sorted(fn.keywords.items())
        )
        return f"{inner}:partial-{_digest(bound)}"
    qualname = getattr(fn, "__qualname__", None)
    if isinstance(qualname, str):
        name = f"{module_of(fn)}:{qualname}"
        if mode == "name":
            return name
        if "<" in qualname:  # <lambda>, <locals>: one qualname, many functions
            own_name = getattr(fn, "__name__", "")
            identify = _Identify(name, strict=mode == "strict", own_name=own_name)
            return f"{name}#{_digest(identify.definition(fn))}"
        current = _redefinition(fn, qualname)
        return name if current is None else f"{name}#{_digest(_code(current))}"
    kind = type(fn)
    name = f"{module_of(kind)}:{kind.__qualname__}"
    if mode == "strict":
        msg = (
            f"cannot give an instance of {name} default cache keys: a callable object "
            "has no identity that tells its instances apart in every process. Pass "
            "key= (a template such as 'rate:{x}', or a callable), or namespace= to "
            "name this instance."
        )
        raise TypeError(msg)
    return f"{name}()"


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


class _Identify:
    """Encode a function's definition: its code and the values its closure captured.

    Args:
        function_id: The decorated function's name, for messages.
        strict: Refuse what has no stable form; otherwise leave it out.
        own_name: The decorated function's ``__name__``: a not yet assigned variable
            of that name is the function itself, called recursively.
    """

    def __init__(self, function_id: str, *, strict: bool, own_name: str) -> None:
        self.function_id = function_id
        self._strict = strict
        self._own_name = own_name
        self._open: set[int] = set()  # functions being encoded: a cycle stops there

    def definition(self, fn: object) -> bytes:
        """Encode *fn*'s code and captured values, unwrapping methods and wrappers."""
        if isinstance(fn, types.FunctionType):
            if id(fn) in self._open:
                return frame(b"r", fn.__qualname__.encode())
            self._open.add(id(fn))
            try:
                names, cells = fn.__code__.co_freevars, fn.__closure__ or ()
                captured = b"".join(map(self._cell, names, cells))
            finally:
                self._open.discard(id(fn))
            return frame(b"f", _code(fn) + captured)
        inner = getattr(fn, "__func__", None) or getattr(fn, "__wrapped__", None)
        if inner is not None:  # a bound method (receivers stay out), a cached function
            return self.definition(inner)
        return self._refuse(f"is a {_type_name(fn)}, with no code to identify it")

    def _cell(self, name: str, cell: types.CellType) -> bytes:
        if name == "__class__":
            # The class of a method using super(): its qualname is in the function's,
            # and the cell is filled only once the class body has run.
            return b""
        try:
            contents = cell.cell_contents
        except ValueError:  # an empty cell
            # One of the function's own name: it calls itself, and the def statement
            # fills the cell with it once the decorator returns.
            if name == self._own_name:
                return frame(b"c", name.encode())
            return self._refuse(
                f"captures {name!r}, which is not yet assigned when it is decorated"
            )
        return frame(b"c", name.encode() + self.value(contents, f"captures {name!r}"))

    def value(self, value: object, what: str) -> bytes:
        """Encode a captured or bound *value*; *what* says how in messages ("captures 'x'")."""
        if isinstance(value, types.ModuleType):
            return frame(b"M", value.__name__.encode())
        if isinstance(value, functools.partial):
            args = b"".join(self.value(v, what) for v in value.args)
            kwargs = b"".join(
                frame(b"k", k.encode() + self.value(v, what))
                for k, v in sorted(value.keywords.items())
            )
            return frame(b"P", self.value(value.func, what) + args + kwargs)
        qualname = getattr(value, "__qualname__", None)
        owner = getattr(value, "__self__", None)
        if isinstance(qualname, str) and callable(value):  # a function or a class
            if owner is not None and not isinstance(owner, types.ModuleType | type):
                return self._refuse(f"{what}, a method bound to an object")
            name = f"{module_of(value)}:{qualname}".encode()
            if "<" in qualname:
                return frame(b"F", name + self.definition(value))
            current = _redefinition(value, qualname)
            return frame(b"F", name + (b"" if current is None else _code(current)))
        try:
            return encode(value, what, self.function_id)
        except TypeError:
            return self._refuse(
                f"{what}, a {_type_name(value)}, which has no stable text form (its "
                "repr may hold a memory address)"
            )

    def _refuse(self, problem: str) -> bytes:
        if not self._strict:
            return frame(b"?", problem.encode())
        msg = (
            f"cannot give {self.function_id} default cache keys: it {problem}, and "
            "nothing else tells such functions apart in every process. Pass key= (a "
            "template over its parameters, or a callable), or namespace= to name "
            "this function."
        )
        raise TypeError(msg)


def _type_name(value: object) -> str:
    return f"{type(value).__module__}.{type(value).__qualname__}"


def _redefinition(fn: Callable[..., Any], qualname: str) -> types.FunctionType | None:
    """Return *fn* unwrapped if it replaces another function of its qualname, else None.

    While the decorator runs, the module (or class) still holds what the name meant
    before: a second ``def f`` in a module, two route handlers given one name, a
    notebook cell run again. No registry is needed. Every replacement is told apart by
    its code, even one whose code equals the function it replaces: a third ``def f``
    may repeat the second, never silently the first, which keeps the plain key.
    """
    scope: object = sys.modules.get(getattr(fn, "__module__", None) or "")
    earlier: object = None
    for part in qualname.split("."):
        names = getattr(scope, "__dict__", None)
        if not isinstance(names, Mapping):
            return None
        earlier = scope = names.get(part)
    current, earlier = _unwrap(fn), _unwrap(earlier)
    if (
        current is None
        or earlier is None
        or earlier is current
        or earlier.__qualname__ != qualname
    ):
        return None
    return current


def _unwrap(fn: object) -> types.FunctionType | None:
    """Return the function under cached wrappers, decorators and static methods."""
    for _ in range(100):  # a __wrapped__ cycle ends here
        inner = getattr(fn, "__wrapped__", None) or getattr(fn, "__func__", None)
        if inner is None:
            return fn if isinstance(fn, types.FunctionType) else None
        fn = inner
    return None


def _code(fn: types.FunctionType) -> bytes:
    return _code_bytes(fn.__code__)


def _code_bytes(code: types.CodeType) -> bytes:
    """Encode what *code* does, not where it is: no line numbers, no file name."""
    shape = (
        code.co_name,
        code.co_argcount,
        code.co_posonlyargcount,
        code.co_kwonlyargcount,
        code.co_flags,
        code.co_names,
        code.co_varnames,
        code.co_freevars,
        code.co_cellvars,
    )
    return frame(
        b"C",
        repr(shape).encode()
        + frame(b"b", code.co_code)  # without adaptive specialization: stable
        + frame(b"x", code.co_exceptiontable)
        + b"".join(map(_constant, code.co_consts)),
    )


def _constant(value: object) -> bytes:
    match value:
        case types.CodeType():  # a nested function, lambda or comprehension
            return _code_bytes(value)
        case tuple():
            return frame(b"t", b"".join(map(_constant, value)))
        case frozenset():  # sorted: the order of str members follows the hash seed
            return frame(b"S", b"".join(sorted(map(_constant, value))))
        case None | int() | float() | str() | bytes():
            return encode(value, "constant", "")
        case _:  # complex, Ellipsis
            return frame(b"k", f"{type(value).__qualname__}:{value!r}".encode())


def module_of(fn: Callable[..., Any]) -> str:
    module = getattr(fn, "__module__", None) or "?"
    # multiprocessing's spawn re-imports a script as __mp_main__; keys must not change.
    return "__main__" if module == "__mp_main__" else module
