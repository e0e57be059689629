"""Code rules that are cheap to check: every function in product code is under 80 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = [pytest.mark.unit]

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = [ROOT / "kiln", ROOT / "operator" / "kiln_operator", *sorted((ROOT / "images").glob("*/kiln_*"))]
LIMIT = 80


def function_lengths(folders: list[Path]) -> list[tuple[int, str]]:
    """(lines, "path:line name") of every function and method, longest first (decorators not counted)."""
    out = []
    for folder in folders:
        for path in sorted(folder.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno is not None:
                    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
                    out.append((node.end_lineno - node.lineno + 1, f"{where}:{node.lineno} {node.name}"))
    return sorted(out, reverse=True)


def test_every_product_function_is_under_80_lines() -> None:
    lengths = function_lengths(PRODUCT)
    assert len(lengths) > 300  # the walk found the product code
    too_long = [f"{n} lines: {where}" for n, where in lengths if n >= LIMIT]
    assert too_long == [], too_long


def test_the_check_finds_a_long_function(tmp_path: Path) -> None:
    (tmp_path / "long.py").write_text("def f():\n" + "    x = 1\n" * 90)
    assert function_lengths([tmp_path])[0][0] == 91
