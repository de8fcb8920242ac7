"""The library stays easy to pick up: no function over about 50 lines outside the model's forward."""

from __future__ import annotations

import ast
from pathlib import Path

LIB = Path(__file__).resolve().parents[1] / "lib" / "fp8parity"
EXEMPT = {("qwen2.py", "_forward")}  # the forward reads top to bottom as the model computes it
MAX_LINES = 50


def test_no_library_function_is_over_50_lines():
    long = [f"{p.relative_to(LIB)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for p in LIB.rglob("*.py") for n in ast.walk(ast.parse(p.read_text()))
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.end_lineno - n.lineno + 1 > MAX_LINES
            and (p.name, n.name) not in EXEMPT]
    assert not long, long
