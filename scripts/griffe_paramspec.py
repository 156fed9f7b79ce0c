"""A griffe extension for the API reference (see mkdocs.yml): ParamSpec'd signatures.

mkdocstrings renders ``*args: P.args, **kwargs: P.kwargs`` as
``*args: args, **kwargs: kwargs``, which reads as if there were a type named
``args``. The helpers of a decorated function take the function's own arguments
(their docstrings say so), so the reference shows ``(*args, **kwargs)``.
"""

# ruff: noqa: INP001 - a script that griffe loads by path, not a package module

from __future__ import annotations

from typing import Any

import griffe


class ParamSpecArguments(griffe.Extension):
    """Drop the ``P.args``/``P.kwargs`` annotations of ``*args`` and ``**kwargs``."""

    def on_function_instance(self, *, func: griffe.Function, **kwargs: Any) -> None:  # noqa: ARG002
        """Leave ``*args`` and ``**kwargs`` bare where a ParamSpec annotates them."""
        ends = {
            griffe.ParameterKind.var_positional: ".args",
            griffe.ParameterKind.var_keyword: ".kwargs",
        }
        for parameter in func.parameters:
            end = ends.get(parameter.kind)
            if end is not None and str(parameter.annotation).endswith(end):
                parameter.annotation = None
