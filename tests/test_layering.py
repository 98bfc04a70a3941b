"""The library stays Dagster-free: importing every tinyplm_lib module never loads dagster."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

LIB = Path(__file__).resolve().parents[1] / "tinyplm_lib"


def test_no_dagster_import_statement_in_library():
    offenders = []
    for path in LIB.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0].startswith("dagster")]
    assert offenders == []


def test_importing_the_library_does_not_load_dagster():
    modules = sorted(".".join(p.relative_to(LIB).with_suffix("").parts) for p in LIB.rglob("*.py"))
    assert "training.stage" in modules and "store.artifacts" in modules
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(('tinyplm_lib.' + m).removesuffix('.__init__'))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0].startswith('dagster')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
