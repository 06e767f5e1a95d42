"""The examples in README.md and docs/*.md run as written (each file's blocks in order)."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_examples_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = BLOCK.findall(page.read_text())
    if not blocks:
        pytest.skip(f"{page.name} has no python examples")
    monkeypatch.chdir(tmp_path)
    # A module of its own, so that classes an example defines pickle by name.
    module = types.ModuleType(f"doc_{page.stem}")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    for number, block in enumerate(blocks, 1):
        code = compile(block, f"{page.name} (example {number})", "exec")
        exec(code, module.__dict__)
