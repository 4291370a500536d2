"""The Python snippets of the README and of the user-facing docs pages run as written.

Every ```python block of these pages is run; a block that cannot run alone (a fragment, a
torchrun-only recipe) is written as ```text or ```py instead."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [
    REPO / "README.md",
    REPO / "docs" / "getting-started.md",
    *sorted((REPO / "docs" / "howto").glob("*.md")),
    REPO / "docs" / "translation" / "index.md",
]
SNIPPETS = [
    (page, index, code)
    for page in PAGES
    for index, code in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S))
]


def test_readme_has_snippets():
    assert sum(page.name == "README.md" for page, _, _ in SNIPPETS) >= 2


@pytest.mark.parametrize(
    ("page", "index", "code"), SNIPPETS, ids=[f"{p.relative_to(REPO)}:{i}" for p, i, _ in SNIPPETS]
)
def test_snippet_runs(page, index, code):
    exec(compile(code, f"{page.relative_to(REPO)} snippet {index}", "exec"), {"__name__": "snippet"})
