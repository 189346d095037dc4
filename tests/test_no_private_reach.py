"""Tools use public steps: no module outside a folder calls an underscore name of another folder's module."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tools_and_stages_use_no_private_names_of_other_folders():
    found = []
    for folder in ("tools", "export", "runtime", "calibration"):
        for path in (ROOT / folder).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("iwp") and node.level == 0:
                    target = node.module.split(".")[1] if "." in node.module else "iwp"
                    if target != folder:
                        found += [f"{path.relative_to(ROOT)}:{node.lineno} imports {a.name}" for a in node.names
                                  if a.name.startswith("_")]
                # calls like module._private(...) or obj._private(...) on something imported from elsewhere
                if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                    if isinstance(node.value, ast.Name) and node.value.id in ("ovqa", "model", "pipeline", "loaded"):
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not found, found
