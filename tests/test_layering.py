"""Layering: the library stays Dagster-free, neither package has an import loop, and only the code
location (`tinyplm_assets.definitions`) builds the Definitions."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT / "tinyplm_lib"


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


# --- no import loops inside either package --------------------------------------------------------

PACKAGES = ("tinyplm_lib", "tinyplm_assets")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """Modules an import statement names: `from a import b` names `a` and, if it is one, `a.b`."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: resolved against this module's package
        package = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of both packages it imports, at module level or inside functions.

    A module's own parent packages are left out: Python imports them first, whatever it imports.
    """
    paths = {_module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    graph = {}
    for module, path in paths.items():
        is_package = path.name == "__init__.py"
        parents = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
        graph[module] = {name for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                         for name in _imported(node, module, is_package)
                         if name in paths and name != module and name not in parents}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import loop as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, str] = {}  # absent: not seen; "open": on the current path; "done"
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for name in sorted(graph[module]):
            if state.get(name) == "open":
                return path[path.index(name):] + [name]
            if name not in state and (cycle := visit(name)):
                return cycle
        state[module] = "done"
        path.pop()
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_find_cycle_finds_a_loop():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_import_graph_of_both_packages_is_acyclic():
    graph = import_graph()
    assert {"tinyplm_assets.preflight", "tinyplm_lib.training.stage"} <= graph.keys()
    assert "tinyplm_assets.config" in graph["tinyplm_assets.preflight"]  # the graph sees imports
    cycle = find_cycle(graph)
    assert cycle is None, "import loop: " + " -> ".join(cycle)


# --- entry points other than the code location do not build it ---------------------------------


def test_importing_other_entry_points_does_not_build_the_code_location():
    # A torchrun rank (`train_worker`) and `locate` must not construct the Definitions (nor read
    # the storage environment for them): only importing `tinyplm_assets.definitions` does.
    modules = ["tinyplm_assets", "tinyplm_assets.train_worker", "tinyplm_assets.locate", "tinyplm_assets.config",
               "tinyplm_assets.resources", "tinyplm_assets.preflight", "tinyplm_assets.checks"]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        "    print(m, 'tinyplm_assets.definitions' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == [word for m in modules for word in (m, "False")]


# --- the code location loads without the training stack ------------------------------------------


def test_loading_the_code_location_imports_no_training_stack():
    # Every `dagster` CLI command, step subprocess and the UI's code server imports the definitions:
    # torch and transformers (seconds of import) wait for a step that trains or evaluates, matplotlib
    # for one that plots.
    code = (
        "import sys\n"
        "import tinyplm_assets.definitions\n"
        "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'matplotlib') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", f"importing tinyplm_assets.definitions loaded {out.stdout.strip()}"
