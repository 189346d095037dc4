"""Imports run one way: tools -> stages (export, runtime, calibration) -> core (iwp/) -> the ops (plugins/). Two
stage folders never import each other. Read from the sources, so a lazy import inside a function counts too."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"tools": "tools", "export": "stages", "runtime": "stages", "calibration": "stages", "iwp": "core",
           "plugins": "ops"}
RANK = {"ops": 0, "core": 1, "stages": 2, "tools": 3}
ENTRY_POINTS = {"iwp/__main__.py"}   # `python -m iwp` runs the command line


def _package_of(module: str) -> str | None:
    """The top-level folder an absolute `iwp...` import lands in."""
    parts = module.split(".")
    if parts[0] != "iwp":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in FOLDERS and parts[1] != "iwp" else "iwp"


def _imports(path: Path, folder: str):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:        # relative: stays in its own folder (or a parent package of it)
                continue
            names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            target = _package_of(name)
            if target is not None:
                yield node.lineno, name, target


SOURCES = sorted(p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_run_one_way(path):
    rel = str(path.relative_to(ROOT))
    if rel in ENTRY_POINTS:
        return
    folder = rel.split("/")[0]
    for line, name, target in _imports(path, folder):
        if target == folder:
            continue
        ours, theirs = FOLDERS[folder], FOLDERS[target]
        assert RANK[theirs] < RANK[ours], f"{rel}:{line} imports {name}: {ours} may not import {theirs}"
