"""The package's structure: floors that run one way (import-linter), and imports at module level
except where a comment says why not (an optional dependency, or the CLI's start-up time)."""

from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "pixelwise"
REASONS = ("optional dependency", "start-up time")


def _explained(lines: list[str], lineno: int) -> bool:
    """A reason on the import's line or in a comment heading the run of imports it belongs to."""
    i = lineno - 1
    while i >= 0:
        line = lines[i].strip()
        if any(reason in line for reason in REASONS) and "#" in line:
            return True
        in_parentheses = line == ")" or line.endswith((",", "("))  # a parenthesised import's other lines
        if not (line.startswith(("import ", "from ", "#", "try:")) or line == "" or in_parentheses
                or i == lineno - 1):
            return False
        i -= 1
    return False


def function_level_imports(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every import inside a function of ``path`` that no comment explains."""
    text = path.read_text()
    lines = text.splitlines()
    bad = []
    for node in ast.walk(ast.parse(text)):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for sub in ast.walk(node):
            if isinstance(sub, ast.Import | ast.ImportFrom) and not _explained(lines, sub.lineno):
                bad.append((sub.lineno, lines[sub.lineno - 1].strip()))
    return bad


def test_function_level_imports_say_why():
    bad = [f"{p.relative_to(ROOT)}:{n}: {t}" for p in sorted(SRC.rglob("*.py")) for n, t in function_level_imports(p)]
    assert not bad, "imports inside functions need a comment naming the reason " + str(REASONS) + ":\n" + "\n".join(bad)


def test_the_checker_finds_an_unexplained_import(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def a():\n    import os\n\n\ndef b():\n    # optional dependency: onnx\n    import onnx\n"
                 "    import sys\n\n\ndef c():\n    x = 1\n    import re\n")
    assert [n for n, _ in function_level_imports(f)] == [2, 13]


@pytest.mark.skipif(shutil.which("lint-imports") is None, reason="import-linter is not installed (dev extra)")
def test_import_contracts_hold():
    proc = subprocess.run(["lint-imports"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout
