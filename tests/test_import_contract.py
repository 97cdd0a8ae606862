"""The rooms' import rules, checked: libraries never reach up into stages, flows or orchestration.

An AST walk over every module of the package, mapped through ``pyproject.toml``'s package-dir table
(``equislide.tiling`` lives in ``tiling/``, not under ``equislide/``; import-linter's graph builder
only walks a package's own folder, so it cannot see this layout). Every ``import`` counts, also those
inside functions, except the module-level rule for Dask, which names module-level imports only:
the stores hand out lazy ``dask.array`` views, imported where they are made.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ("equislide.tiling", "equislide.models", "equislide.storage")
#: Forbidden anywhere in a library or a stage module (any nesting level).
NEVER_IN_LIBRARIES = (
    "equislide.stages",
    "equislide.flows",
    "equislide.commands",
    "equislide.cli",
    "prefect",
    "prefect_dask",
    "distributed",
    "dask_cuda",
)
NEVER_IN_STAGES = (
    "equislide.flows",
    "equislide.commands",
    "equislide.cli",
    "prefect",
    "prefect_dask",
    "distributed",
    "dask_cuda",
)
#: Forbidden at module level in a library or a stage module.
NOT_AT_MODULE_LEVEL = ("dask",)


def _package_dirs() -> dict[str, Path]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {pkg: ROOT / folder for pkg, folder in config["tool"]["setuptools"]["package-dir"].items()}


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (``equislide.stages.tile``: ``stages/tile.py``)."""
    out: dict[str, Path] = {}
    for pkg, folder in _package_dirs().items():
        for path in folder.glob("*.py"):
            name = pkg if path.stem == "__init__" else f"{pkg}.{path.stem}"
            out[name] = path
    return out


def _imports(path: Path, module: str) -> list[tuple[str, int, bool]]:
    """``(imported module, line, at module level)`` of every import in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                package = module if path.name == "__init__.py" else module.rpartition(".")[0]
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.append((name, node.lineno, id(node) in top))
    return found


def _matches(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_every_room_is_mapped() -> None:
    modules = _modules()
    for room in (*LIBRARIES, "equislide.stages", "equislide.flows"):
        assert room in modules, f"{room} is not in pyproject's package-dir table"


def test_import_rules_of_the_rooms() -> None:
    problems = []
    for module, path in sorted(_modules().items()):
        library = _matches(module, LIBRARIES)
        stage = _matches(module, ("equislide.stages",))
        if not (library or stage):
            continue
        never = NEVER_IN_LIBRARIES if library else NEVER_IN_STAGES
        for name, line, top in _imports(path, module):
            where = f"{path.relative_to(ROOT)}:{line}"
            if _matches(name, never):
                problems.append(f"{where}: {module} imports {name}")
            elif top and _matches(name, NOT_AT_MODULE_LEVEL):
                problems.append(f"{where}: {module} imports {name} at module level")
    assert not problems, "import rules broken:\n" + "\n".join(problems)


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """The rule check can fail: a library module importing the flows is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("import dask\n\ndef f():\n    from equislide.flows.cohort import cohort_flow\n")
    found = _imports(bad, "equislide.storage.bad")
    assert ("dask", 1, True) in found
    assert ("equislide.flows.cohort", 4, False) in found
    assert _matches("equislide.flows.cohort", NEVER_IN_LIBRARIES)
