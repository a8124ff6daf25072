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


def _layer(path: Path, root: Path = SYNCER) -> str:
    relative = path.relative_to(root)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def _resolve(module: str | None, level: int, package: str) -> str:
    """The absolute module of ``from <level dots><module> import …`` written in ``package``
    (``from ..run import x`` in ``syncer.registry`` is ``syncer.run``)."""
    if level == 0:
        return module or ""
    parts = package.split(".") if package else []
    if level - 1 > len(parts):
        raise ValueError(f"relative import beyond the top package: level {level} in {package!r}")
    return ".".join([*parts[: len(parts) - (level - 1)], *([module] if module else [])])


def _imports(path: Path, package: str = "") -> list[str]:
    """Every module ``path`` imports, also inside functions; relative imports resolved
    against ``package`` (the module's own package). ``from syncer import X`` also yields
    ``syncer.X``: ``syncer`` alone belongs to no layer, ``X`` may be one."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):  # every import, also those inside functions
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = _resolve(node.module, node.level, package)
            found.append(module)
            if module == SYNCER.name:
                found += [f"{module}.{alias.name}" for alias in node.names]
    return found


def problems_of(path: Path, root: Path = SYNCER) -> list[str]:
    """What ``path`` (a module of the package at ``root``) imports against the floor plan."""
    layer = _layer(path, root)
    package = ".".join(path.relative_to(root.parent).parent.parts)
    problems = []
    for name in _imports(path, package):
        root_name = name.split(".")[0]
        if root_name in FORBIDDEN_ROOTS:
            problems.append(f"imports {name}: the library must not depend on it")
        if root_name == root.name and name.count(".") >= 1:
            target = name.split(".")[1]
            # A name that is no layer (``from syncer import __version__``) comes from
            # syncer/__init__.py, the bottom of the plan (every module belongs to a layer:
            # test_every_module_belongs_to_a_known_layer).
            if target in ALLOWED and target != layer and target not in ALLOWED[layer]:
                problems.append(f"imports {name}: layer {layer!r} may not import {target!r}")
    return problems


MODULES = sorted(SYNCER.rglob("*.py"))


def test_every_module_belongs_to_a_known_layer():
    assert {_layer(p) for p in MODULES} <= set(ALLOWED)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SYNCER)))
def test_module_imports_only_downward(path: Path):
    problems = problems_of(path)
    assert problems == []


def test_the_check_catches_a_violation(tmp_path):
    """The checker itself is not vacuous: an upward import and a forbidden root are found,
    written absolutely, relatively and as ``from syncer import <layer>``; imports of the
    module's own layer and of syncer/__init__.py are not."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from workers.tasks import sync_image\n    import redis\n")
    assert _imports(bad) == ["workers.tasks", "redis"]

    root = tmp_path / "syncer"
    sample = root / "registry" / "sample.py"
    sample.parent.mkdir(parents=True)
    sample.write_text(
        "from . import errors\n"
        "from syncer import __version__\n"
        "from ..run import embedded\n"
        "from syncer import copy\n"
        "\n"
        "def f():\n"
        "    import redis\n"
    )
    assert problems_of(sample, root) == [
        "imports syncer.run: layer 'registry' may not import 'run'",
        "imports syncer.copy: layer 'registry' may not import 'copy'",
        "imports redis: the library must not depend on it",
    ]
