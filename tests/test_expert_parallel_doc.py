"""docs/expert_parallel.md's single-process Python snippets run as written (the ```py ones need torchrun)."""

import re
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parent.parent / "docs" / "expert_parallel.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)


def test_page_has_a_snippet():
    assert SNIPPETS


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_snippet_runs(index):
    exec(compile(SNIPPETS[index], f"expert_parallel.md snippet {index}", "exec"), {"__name__": "doc"})
