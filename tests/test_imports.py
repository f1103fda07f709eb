"""The module graph the issue asks for: no import circles (at module level or inside
functions), and the tools do not pull in the training loop."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ["bigtrain.inspect", "bigtrain.launch", "bigtrain.preflight", "bigtrain.export", "bigtrain.report"]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in (ROOT / "bigtrain").rglob("*.py")}


def imported(name: str, path: Path) -> set[str]:
    """Every bigtrain module ``path`` imports, wherever the import statement is. A module's own
    parent packages are left out: Python initialises them before the module anyway, so
    ``from bigtrain.checkpoint import lifecycle`` inside the package is no circle."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bigtrain"):
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {m for m in out & MODULES.keys() if not name.startswith(m + ".")}


GRAPH = {name: imported(name, path) for name, path in MODULES.items()}


def reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in GRAPH[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_no_import_circles():
    assert sorted(m for m in GRAPH if m in reachable(m)) == []


@pytest.mark.parametrize("tool", TOOLS)
def test_tools_do_not_import_the_trainer(tool):
    assert "bigtrain.trainer" not in reachable(tool)
