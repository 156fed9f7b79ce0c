"""Release readiness: `uv build` makes archives fit to publish, and the wheel installs.

The archives are built once per session into a temporary folder, from this tree,
exactly as a release would be (`uv build`: the sdist, then the wheel from the sdist).
"""

from __future__ import annotations

import email.parser
import email.policy
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import tomllib
import zipfile
from email.message import EmailMessage
from pathlib import Path, PurePosixPath

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
VERSION: str = PYPROJECT["project"]["version"]
PACKAGE = ROOT / "src" / "stampede_guard"

# What the sdist may hold at its top level: the package, what the metadata names,
# and what hatch always adds.
SDIST_TOP_LEVEL = {
    "src",
    "README.md",
    "CHANGELOG.md",
    "LICENSE",
    "pyproject.toml",
    "PKG-INFO",
    ".gitignore",
}


def _uv() -> str:
    uv = os.environ.get("UV") or shutil.which("uv")  # `uv run` sets UV
    if uv is None:
        pytest.skip("uv is not installed; the release is built with `uv build`")
    return uv


def _run(*args: str | Path, cwd: Path = ROOT) -> str:
    env = {
        k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}
    }
    done = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=240,
    )
    assert done.returncode == 0, f"{args}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the sdist and the wheel into a fresh folder; return it."""
    out = tmp_path_factory.mktemp("dist")
    _run(_uv(), "build", "--out-dir", out, ROOT)
    return out


@pytest.fixture(scope="module")
def wheel(dist: Path) -> Path:
    (found,) = dist.glob("*.whl")
    return found


@pytest.fixture(scope="module")
def sdist(dist: Path) -> Path:
    (found,) = dist.glob("*.tar.gz")
    return found


def _wheel_names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


def _sdist_names(sdist: Path) -> list[str]:
    """The sdist's member paths, without the ``name-version/`` folder they are in."""
    with tarfile.open(sdist) as archive:
        names = [m.name for m in archive.getmembers() if m.isfile()]
    prefix = f"stampede_guard-{VERSION}/"
    assert all(n.startswith(prefix) for n in names)
    return [n.removeprefix(prefix) for n in names]


def _wheel_metadata(wheel: Path) -> EmailMessage:
    with zipfile.ZipFile(wheel) as archive:
        text = archive.read(f"stampede_guard-{VERSION}.dist-info/METADATA").decode()
    message = email.parser.Parser(policy=email.policy.default).parsestr(text)
    assert isinstance(message, EmailMessage)
    return message


def _no_tests_or_caches(names: list[str]) -> None:
    for name in names:
        parts = PurePosixPath(name).parts
        assert "tests" not in parts, name
        assert "__pycache__" not in parts, name
        assert not name.endswith((".pyc", ".pyo")), name
        assert not any(
            p.startswith((".mypy_cache", ".pytest_cache", ".ruff_cache", ".hypothesis"))
            for p in parts
        ), name


def _package_sources() -> set[str]:
    """The package's files in this tree, as paths from src/ (caches left out)."""
    return {
        p.relative_to(PACKAGE.parent).as_posix()
        for p in PACKAGE.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


def test_build_makes_one_sdist_and_one_wheel_of_the_pyproject_version(
    dist: Path,
) -> None:
    """`uv build` makes exactly an sdist and a pure-Python wheel, named for the version."""
    assert sorted(p.name for p in dist.iterdir() if p.name != ".gitignore") == [
        f"stampede_guard-{VERSION}-py3-none-any.whl",
        f"stampede_guard-{VERSION}.tar.gz",
    ]


def test_the_wheel_holds_the_typed_package_and_its_licence_and_nothing_else(
    wheel: Path,
) -> None:
    """Every package file, py.typed included, the licence, and no tests or caches."""
    names = _wheel_names(wheel)
    _no_tests_or_caches(names)
    dist_info = f"stampede_guard-{VERSION}.dist-info/"
    package = {n for n in names if not n.startswith(dist_info)}
    assert package == _package_sources()
    assert "stampede_guard/py.typed" in package
    assert f"{dist_info}licenses/LICENSE" in names


def test_the_sdist_holds_the_sources_readme_changelog_and_licence_only(
    sdist: Path,
) -> None:
    """The sdist has the package (py.typed included) and its documents, no tests or caches."""
    names = _sdist_names(sdist)
    _no_tests_or_caches(names)
    assert {PurePosixPath(n).parts[0] for n in names} <= SDIST_TOP_LEVEL
    assert {"README.md", "CHANGELOG.md", "LICENSE", "pyproject.toml"} <= set(names)
    assert {n.removeprefix("src/") for n in names if n.startswith("src/")} == (
        _package_sources()
    )
    assert "src/stampede_guard/py.typed" in names


def test_the_metadata_has_version_licence_urls_classifiers_and_extras(
    wheel: Path,
) -> None:
    """The wheel's METADATA: one version, the MIT licence, project URLs, extras, typing."""
    meta = _wheel_metadata(wheel)
    assert meta["Name"] == "stampede-guard"
    assert meta["Version"] == VERSION
    assert meta["License-Expression"] == "MIT"
    assert meta.get_all("License-File") == ["LICENSE"]
    assert meta["Requires-Python"] == PYPROJECT["project"]["requires-python"]
    assert meta["Description-Content-Type"] == "text/markdown"
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL") or [])
    assert {"Homepage", "Documentation", "Repository", "Issues", "Changelog"} <= set(
        urls
    )
    assert all(u.startswith("https://") for u in urls.values())
    classifiers = meta.get_all("Classifier") or []
    assert "Typing :: Typed" in classifiers
    assert not [c for c in classifiers if c.startswith("License ::")]  # PEP 639
    assert {"prometheus", "opentelemetry"} <= set(meta.get_all("Provides-Extra") or [])
    requires = meta.get_all("Requires-Dist") or []
    assert not [r for r in requires if "prometheus" in r and "extra ==" not in r]
    assert not [r for r in requires if "opentelemetry" in r and "extra ==" not in r]


def test_twine_check_passes(dist: Path) -> None:
    """twine check --strict: PyPI would accept the metadata and render the README."""
    output = _run(
        sys.executable,
        "-m",
        "twine",
        "check",
        "--strict",
        *sorted(dist.glob("*.whl")),
        *sorted(dist.glob("*.tar.gz")),
    )
    assert output.count("PASSED") == 2, output


def test_the_wheel_installs_in_a_fresh_venv_and_runs(
    wheel: Path, tmp_path: Path
) -> None:
    """A new virtual environment installs the wheel alone; an in-memory stampede works."""
    venv = tmp_path / "venv"
    _run(_uv(), "venv", "--quiet", "--python", sys.executable, venv)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    _run(_uv(), "pip", "install", "--quiet", "--python", python, wheel)
    script = tmp_path / "example.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import importlib.metadata, sys, threading

            import stampede_guard
            from stampede_guard import MemoryBackend, StampedeStats, cached_stampede_safe

            assert stampede_guard.__file__.startswith({str(venv)!r}), stampede_guard.__file__
            assert stampede_guard.__version__ == {VERSION!r}
            assert importlib.metadata.version("stampede-guard") == {VERSION!r}

            calls = 0
            stats = StampedeStats()
            # stampede_guard.testing (wait_for_joiners) needs pytest, absent here: the
            # computation holds until every thread has at least begun its call.
            arrived = threading.Semaphore(0)

            @cached_stampede_safe(key="report:{{day}}", backend=MemoryBackend(), metrics=stats)
            def report(day: str) -> dict[str, object]:
                global calls
                calls += 1
                for _ in range(50):
                    assert arrived.acquire(timeout=10)
                return {{"day": day}}

            def call() -> None:
                arrived.release()
                report("mon")

            threads = [threading.Thread(target=call) for _ in range(50)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert calls == 1, calls
            assert stats.snapshot().requests == 50

            # The exporters' libraries are extras: not installed here, and said so.
            assert "prometheus_client" not in sys.modules
            try:
                import stampede_guard.contrib.prometheus
            except ImportError as exc:
                assert 'pip install "stampede-guard[prometheus]"' in str(exc), exc
            else:
                raise AssertionError("prometheus-client is not installed here")
            print("ok", stampede_guard.__version__)
            """
        ),
        encoding="utf-8",
    )
    assert _run(python, "-I", script, cwd=tmp_path).split() == ["ok", VERSION]
