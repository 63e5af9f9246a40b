"""The README's Python examples are valid Python (they run against brokers
in the other tests; here they must at least compile)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from support import Broker

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_examples_compile() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 8
    for block in blocks:
        # Top-level awaits stand for code inside an async function.
        ast.parse(block, feature_version=(3, 10), type_comments=False, mode="exec")


def test_the_readme_first_example_runs(broker: Broker, capsys: pytest.CaptureFixture[str]) -> None:
    first = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)[0]
    exec(compile(first.replace("127.0.0.1:7700", broker.addr), "README.md", "exec"), {"__name__": "readme"})
    assert capsys.readouterr().out == "todo.created {'text': 'milk'}\n"
