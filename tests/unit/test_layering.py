"""The floor plan holds: each layer of ``syncer/`` imports only downward, and the library
never imports the distributed layer, Celery or Redis (not even lazily inside a function)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SYNCER = Path(__file__).resolve().parents[2] / "syncer"
# What each layer may import from syncer (besides itself). cli sits on top of the library.
ALLOWED = {
    "registry": set(),
    "copy": {"registry"},
    "plan": {"registry"},
    "run": {"registry", "copy", "plan"},
    "cli": {"registry", "copy", "plan", "run"},
    "__init__": set(),
}
FORBIDDEN_ROOTS = {"workers", "celery", "kombu", "redis", "flower"}


def _layer(path: Path) -> str:
    relative = path.relative_to(SYNCER)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):  # every import, also those inside functions
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
    return found


MODULES = sorted(SYNCER.rglob("*.py"))


def test_every_module_belongs_to_a_known_layer():
    assert {_layer(p) for p in MODULES} <= set(ALLOWED)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SYNCER)))
def test_module_imports_only_downward(path: Path):
    layer = _layer(path)
    problems = []
    for name in _imports(path):
        root = name.split(".")[0]
        if root in FORBIDDEN_ROOTS:
            problems.append(f"imports {name}: the library must not depend on it")
        if root == "syncer" and name.count(".") >= 1:
            target = name.split(".")[1]
            if target != layer and target not in ALLOWED[layer]:
                problems.append(f"imports {name}: layer {layer!r} may not import {target!r}")
    assert problems == []


def test_the_check_catches_a_violation(tmp_path):
    """The checker itself is not vacuous: an upward import is found."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from workers.tasks import sync_image\n    import redis\n")
    assert _imports(bad) == ["workers.tasks", "redis"]
