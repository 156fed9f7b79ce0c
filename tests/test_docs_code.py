"""The Python blocks of the README and the tutorial run as written, in order.

Each document's blocks run one after another in one fresh interpreter, as a reader
pasting them into one file would; a later block may use what an earlier one defined.
The changes made to them (`STAND_INS`): the Redis URL they show becomes this session's
private server (they never touch a Redis on port 6379), and a fixed port a free one.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# What the blocks show, and what they run with here.
STAND_INS = {
    "redis://localhost:6379/0": "{redis_url}",  # this session's private server
    "start_http_server(9100)": "start_http_server(0)",  # any free port
}
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)

pytestmark = [pytest.mark.redis, pytest.mark.timeout(120)]


def blocks(document: str) -> list[str]:
    return BLOCK.findall((ROOT / document).read_text())


@pytest.mark.parametrize("document", ["README.md", "docs/tutorial.md"])
def test_every_block_compiles_on_its_own(document: str) -> None:
    found = blocks(document)
    assert found, f"no python blocks in {document}"
    for n, block in enumerate(found, 1):
        compile(block, f"{document} block {n}", "exec")


@pytest.mark.parametrize("document", ["README.md", "docs/tutorial.md"])
def test_the_blocks_run_in_order(document: str, redis_url: str, tmp_path: Path) -> None:
    script = "\n\n".join(blocks(document))
    for shown, used in STAND_INS.items():
        script = script.replace(shown, used.format(redis_url=redis_url))
    path = tmp_path / "blocks.py"
    path.write_text(script)
    done = subprocess.run(
        [sys.executable, str(path)],
        capture_output=True,
        text=True,
        timeout=100,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
