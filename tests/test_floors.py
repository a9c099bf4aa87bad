"""The import floors of DESIGN.md, read from the AST of every module under src/ntklens.

Every ``import`` and ``from ... import`` counts, at module level or inside a function
(``TYPE_CHECKING`` blocks too): a part may import its own modules and the parts on lower
floors, never a part on its own or a higher floor. The floors, top to bottom, as drawn in
DESIGN.md::

    (the package facade ntklens/__init__.py, __main__.py)
    cli.py  reproduce.py
    sweep/          integrations/
    train/          infinite.py                      report/
    observables/                                     analysis/      store/
    kernel/         models/      data/
    schema.py  errors.py
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src" / "ntklens"

FLOORS: dict[str, int] = {
    **dict.fromkeys(("ntklens", "__main__"), 6),
    **dict.fromkeys(("cli", "reproduce"), 5),
    **dict.fromkeys(("sweep", "integrations"), 4),
    **dict.fromkeys(("train", "infinite", "report"), 3),
    **dict.fromkeys(("observables", "analysis", "store"), 2),
    **dict.fromkeys(("kernel", "models", "data"), 1),
    **dict.fromkeys(("schema", "errors"), 0),
}
# Imports along one floor between parts that DESIGN.md draws side by side, one using the
# other: the CLI runs reproduce.py; train/ computes its kernel baselines with infinite.py
# (which imports only models/); schema.py raises the errors of errors.py (which imports
# nothing). The reverse directions stay forbidden.
SIDEWAYS = {("cli", "reproduce"), ("train", "infinite"), ("schema", "errors")}


def _module_name(path: Path) -> str:
    parts = ("ntklens", *path.relative_to(SOURCE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _part(module: str) -> str:
    """The part a module belongs to: the first name under ntklens (the facade: "ntklens")."""
    names = module.split(".")
    return names[1] if len(names) > 1 else "ntklens"


def _is_module(name: str) -> bool:
    relative = Path(*name.split(".")[1:])
    return (SOURCE / relative).with_suffix(".py").is_file() or (SOURCE / relative).is_dir()


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every ntklens module that ``path`` imports, relative ones resolved."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            # "from ntklens import kernel" imports the submodule; "from ntklens import ntk"
            # goes through the package facade.
            submodules = [f"{target}.{a.name}" for a in node.names]
            if all(_is_module(name) for name in submodules) and target.startswith("ntklens"):
                found += [(node.lineno, name) for name in submodules]
            else:
                found.append((node.lineno, target))
    return [(line, name) for line, name in found if name.split(".")[0] == "ntklens"]


def back_edges() -> list[str]:
    problems = []
    for path in sorted(SOURCE.rglob("*.py")):
        source = _part(_module_name(path))
        if source not in FLOORS:
            problems.append(f"{path.relative_to(SOURCE)}: part {source!r} has no floor")
            continue
        for line, target_module in imported_modules(path):
            target = _part(target_module)
            if target == source or (source, target) in SIDEWAYS:
                continue
            if target not in FLOORS or FLOORS[target] >= FLOORS[source]:
                problems.append(
                    f"{path.relative_to(SOURCE)}:{line}: {source} (floor {FLOORS[source]}) "
                    f"imports {target_module} (floor {FLOORS.get(target)})"
                )
    return problems


def test_every_import_goes_down_a_floor() -> None:
    assert back_edges() == []


def test_every_part_has_a_floor() -> None:
    parts = {_part(_module_name(path)) for path in SOURCE.rglob("*.py")}
    assert parts <= set(FLOORS)


@pytest.mark.parametrize(
    ("module", "code", "expected"),
    [
        ("store/x.py", "import ntklens\n", ["ntklens"]),
        ("store/x.py", "from ntklens import ntk\n", ["ntklens"]),
        (
            "store/x.py",
            "from ntklens import schema, errors\n",
            ["ntklens.schema", "ntklens.errors"],
        ),
        ("store/x.py", "def f():\n    from ..train import run\n", ["ntklens.train"]),
        ("models/__init__.py", "from .layers import Linear\n", ["ntklens.models.layers"]),
        ("store/x.py", "import numpy\nfrom pandas import DataFrame\n", []),
    ],
)
def test_the_scanner_sees_every_kind_of_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str, code: str, expected: list[str]
) -> None:
    """The scanner itself, on hand-written modules (function-level and relative imports)."""
    root = tmp_path / "ntklens"
    for name in ("schema.py", "errors.py", "train/__init__.py", "models/layers.py", module):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).touch()
    (root / module).write_text(code)
    monkeypatch.setitem(globals(), "SOURCE", root)
    assert [name for _, name in imported_modules(root / module)] == expected


def test_a_back_edge_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "ntklens"
    (root / "store").mkdir(parents=True)
    (root / "train").mkdir()
    (root / "train" / "__init__.py").touch()
    (root / "store" / "__init__.py").write_text("def f():\n    from ntklens.train import run\n")
    monkeypatch.setitem(globals(), "SOURCE", root)
    [problem] = back_edges()
    assert "store (floor 2) imports ntklens.train (floor 3)" in problem
