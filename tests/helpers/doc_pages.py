"""The README and the docs site's pages as text, and their code blocks, for the tests that run them."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
DOCS = {path.relative_to(ROOT / "docs").as_posix(): path.read_text() for path in sorted((ROOT / "docs").rglob("*.md"))}


def blocks(lang: str, text: str = README) -> list[str]:
    """The ```lang blocks of a text, in order."""
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def block(lang: str, page: str, marker: str) -> str:
    """The one ```lang block of `page` ("README.md" or a docs/ page such as "guide/cli.md") holding `marker`."""
    text = README if page == "README.md" else DOCS[page]
    found = [b for b in blocks(lang, text) if marker in b]
    assert len(found) == 1, f"{page}: {len(found)} ```{lang} blocks hold {marker!r}"
    return found[0]
