"""The examples run and do what they claim."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import pytest


@pytest.fixture
def asyncio_app(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Return examples/asyncio_app.py as a module."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent.parent / "examples"))
    return importlib.import_module("asyncio_app")


@pytest.mark.timeout(30)
def test_asyncio_app_calls_upstream_once_in_memory(
    asyncio_app: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    """The asyncio example answers 300 concurrent requests with one upstream call."""
    assert asyncio_app.main(["-r", "300"]) == 0
    out = capsys.readouterr().out
    assert "requests             300" in out
    assert "upstream calls         1" in out


@pytest.mark.timeout(30)
def test_asyncio_app_calls_upstream_once_on_redis(
    asyncio_app: ModuleType, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same through AsyncRedisBackend on a real redis-server."""
    assert asyncio_app.main(["-r", "300", "--redis-url", redis_url]) == 0
    assert "upstream calls         1" in capsys.readouterr().out
