"""The README's openai-SDK tour runs unchanged against the real stack (docs match the code)."""

from __future__ import annotations

import contextlib
import io
import re

import pytest

from tests.e2e.conftest import API_KEY, PORT, REPO

pytestmark = pytest.mark.e2e


def test_readme_python_tour_runs(stack: dict) -> None:
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "README has no python example"
    code = blocks[0].replace("http://127.0.0.1:8000/v1", f"http://127.0.0.1:{PORT}/v1")
    code = code.replace('"unused-unless-configured"', repr(API_KEY))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    printed = out.getvalue()
    assert re.search(r"^(small|large) knn$", printed, flags=re.M), printed
    assert "'tier_chain'" in printed and "CompletionUsage(" in printed
