"""pyright agrees with mypy on tests/typing/: an error on each expected line, none else."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TYPING = Path(__file__).parent / "typing"
# A `# type: ignore[...]` marks a line where mypy must report an error (mypy's
# warn_unused_ignores checks that it does); pyright must report one there too, except
# for a deprecation alone, which pyright does not report through a Protocol's overload.
EXPECTED = re.compile(r"# type: ignore\[(?P<codes>[^\]]+)\]")


def _expected_lines(path: Path) -> set[int]:
    lines = set()
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        found = EXPECTED.search(line)
        if found and found["codes"] != "deprecated":
            lines.add(number)
    return lines


def _pyright() -> list[str]:
    found = shutil.which("pyright", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("pyright is not installed (uv sync --group typing)")
    return [found]


@pytest.mark.slow
def test_pyright_reports_an_error_on_each_expected_line_and_nowhere_else() -> None:
    """Both mixes of sync and async, and every other expected error, fail pyright too."""
    command = [*_pyright(), "--outputjson", "-p", str(TYPING / "pyrightconfig.json")]
    command += ["--pythonpath", sys.executable]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=240, check=False
        )
        report = json.loads(done.stdout)
    except (subprocess.TimeoutExpired, json.JSONDecodeError):
        pytest.skip("pyright cannot run here (it fetches Node.js on first use)")
    errors: dict[str, set[int]] = {}
    for diagnostic in report["generalDiagnostics"]:
        if diagnostic["severity"] == "error":
            line = diagnostic["range"]["start"]["line"] + 1
            errors.setdefault(Path(diagnostic["file"]).name, set()).add(line)
    expected = {
        path.name: lines
        for path in sorted(TYPING.glob("*.py"))
        if (lines := _expected_lines(path))
    }
    assert errors == expected
