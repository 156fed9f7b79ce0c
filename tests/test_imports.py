"""What importing the package costs: no Redis client until a Redis backend is used."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import stampede_guard
import stampede_guard.backends

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "stampede_guard"


def _loaded_after(code: str) -> list[str]:
    """Run *code* in a fresh interpreter; return the client modules it left loaded."""
    probe = textwrap.dedent(code) + textwrap.dedent(
        """
        import sys
        print(" ".join(sorted(
            name for name in sys.modules if name.partition(".")[0] in {"redis", "valkey"}
        )))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return done.stdout.split()


@pytest.mark.parametrize(
    "statement",
    [
        "import stampede_guard",
        "import stampede_guard._plan",
        "import stampede_guard.backends",
        "from stampede_guard import MemoryBackend, cached_stampede_safe",
    ],
)
def test_importing_the_package_loads_no_redis_module(statement: str) -> None:
    """`import stampede_guard` (or its plan, or its backends) imports no Redis client."""
    assert _loaded_after(statement) == []


def test_the_redis_backends_still_resolve_from_every_public_path() -> None:
    """Each public import path of the Redis backends gives the same classes."""
    loaded = _loaded_after(
        """
        import stampede_guard
        import stampede_guard.backends
        from stampede_guard.backends.redis import AsyncRedisBackend, RedisBackend
        from stampede_guard.backends.redis_asyncio import AsyncRedisBackend as Shim
        assert stampede_guard.RedisBackend is RedisBackend
        assert stampede_guard.backends.RedisBackend is RedisBackend
        assert stampede_guard.AsyncRedisBackend is AsyncRedisBackend
        assert stampede_guard.backends.AsyncRedisBackend is AsyncRedisBackend
        assert Shim is AsyncRedisBackend
        """
    )
    assert "redis" in loaded


def test_an_unknown_name_is_still_an_attribute_error() -> None:
    """The lazy lookup invents nothing: other names fail as for any module."""
    with pytest.raises(AttributeError, match="NoSuchBackend"):
        _ = stampede_guard.NoSuchBackend
    with pytest.raises(AttributeError, match="NoSuchBackend"):
        _ = stampede_guard.backends.NoSuchBackend


def _imports_of(module: str) -> set[str]:
    """Return the stampede_guard modules that *module*'s source imports (any depth)."""
    parts = module.split(".")[1:]
    path = PACKAGE.joinpath(*parts)
    source = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    found = set()
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            # `from stampede_guard import x` may name a submodule.
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {
        name
        for name in found
        if name.startswith("stampede_guard.")
        and (
            PACKAGE.joinpath(*name.split(".")[1:]).with_suffix(".py").exists()
            or PACKAGE.joinpath(*name.split(".")[1:], "__init__.py").exists()
        )
    }


def test_the_plan_imports_no_backend_code() -> None:
    """Nothing the plan imports, directly or not, is a backend module."""
    seen: set[str] = set()
    todo = ["stampede_guard._plan"]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(_imports_of(module))
    assert sorted(m for m in seen if m.startswith("stampede_guard.backends")) == []
