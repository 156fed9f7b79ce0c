"""MkDocs hooks for the documentation site (see mkdocs.yml).

The Markdown in docs/ is written to be read on GitHub too, so it links to files
outside docs/: ``../README.md#options``, ``../CHANGELOG.md``, ``../examples/...``.
The site has no such files. This hook points each of those links at its page on the
site (the README is the home page, the changelog has a page of its own) or else at the
file in the repository, so that the strict build checks every other link as usual.

It also leaves out of the nav the pages that other changes are still writing
(`OPTIONAL_PAGES`), so that the nav can name them before they exist.
"""

# ruff: noqa: INP001 - a script that MkDocs loads by path, not a package module

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import Files
from mkdocs.structure.pages import Page

OPTIONAL_PAGES = frozenset({"failures.md", "deployment.md"})
"""Nav entries that are dropped while their file does not exist."""

# Files outside docs/ (paths from the repository root) that the site has as a page.
SITE_PAGES = {
    "README.md": "index.md",
    "CHANGELOG.md": "changelog.md",
    "docs/README.md": "index.md",  # the folder's index for GitHub, excluded here
}

_LINK = re.compile(
    r"(?P<head>\]\()(?P<path>[^()\s#]+)(?P<anchor>#[^()\s]*)?(?P<tail>\))"
)
_FENCE = re.compile(r"^\s*(```|~~~)")


def on_config(config: MkDocsConfig) -> MkDocsConfig:
    """Drop the nav entries of optional pages whose file is missing."""
    docs = Path(config.docs_dir)
    if config.nav is not None:
        config.nav = _prune(config.nav, docs)
    return config


def _prune(items: list[Any], docs: Path) -> list[Any]:
    kept: list[Any] = []
    for item in items:
        if isinstance(item, dict):
            pruned = {title: _prune_value(value, docs) for title, value in item.items()}
            if all(value is not None for value in pruned.values()):
                kept.append(pruned)
        elif _prune_value(item, docs) is not None:
            kept.append(item)
    return kept


def _prune_value(value: Any, docs: Path) -> Any:
    if isinstance(value, list):
        return _prune(value, docs)
    if (
        isinstance(value, str)
        and value in OPTIONAL_PAGES
        and not (docs / value).exists()
    ):
        return None
    return value


def on_page_markdown(
    markdown: str, *, page: Page, config: MkDocsConfig, files: Files
) -> str:
    """Point the page's links to files outside docs/ at the site or the repository."""
    del files
    root = Path(config.config_file_path).parent.resolve()
    docs = Path(config.docs_dir).resolve()
    page_dir = (docs / page.file.src_uri).parent
    repo = (config.repo_url or "").rstrip("/")

    def rewrite(match: re.Match[str]) -> str:
        path = match["path"]
        if ":" in path or path.startswith("/"):
            return match[0]  # a URL, or an absolute path: not a file of this repository
        target = (page_dir / path).resolve()
        if not target.is_relative_to(root):
            return match[0]
        relative = target.relative_to(root).as_posix()
        site_page = SITE_PAGES.get(relative)
        if site_page is not None:
            start = posixpath.dirname(page.file.src_uri) or "."
            new = posixpath.relpath(site_page, start)
        elif target.is_relative_to(docs) or not repo:
            return match[0]  # a page of the site: MkDocs checks it
        else:
            new = f"{repo}/blob/main/{relative}"
        return f"{match['head']}{new}{match['anchor'] or ''}{match['tail']}"

    lines = markdown.split("\n")
    fenced = False
    for i, line in enumerate(lines):
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines[i] = _LINK.sub(rewrite, line)
    return "\n".join(lines)
