"""Packaging: every third-party import under src/ is declared in pyproject.toml, and the
modules of optional extras are imported lazily (inside functions), so a plain install works."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src"

# Import names whose distribution is named differently.
DISTRIBUTIONS = {
    "sklearn": "scikit-learn",
    "yaml": "pyyaml",
    "PIL": "pillow",
    "skimage": "scikit-image",
}
DEV_EXTRAS = {"dev"}  # tools for the test suite; nothing under src/ may need them


@dataclass(frozen=True)
class Import:
    """One import statement's top-level module, where it is, and how it runs."""

    path: Path
    line: int
    eager: bool  # runs when its module is imported (not inside a function)
    guarded: bool  # inside a try whose handler catches ImportError


def module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _catches_import_error(node: ast.Try) -> bool:
    names = {ast.unparse(handler.type) for handler in node.handlers if handler.type is not None}
    return bool(names & {"ImportError", "ModuleNotFoundError"})


def scan() -> tuple[dict[str, list[Import]], dict[str, set[str]]]:
    """Third-party imports by top-level module, and the ntklens modules each src module
    imports eagerly."""
    found: dict[str, list[Import]] = {}
    eager_ntklens: dict[str, set[str]] = {}
    for path in sorted(SOURCE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        top_level = {id(node) for node in tree.body}
        top_level |= {  # module-level `if`/`try` blocks still run on import
            id(child)
            for node in tree.body
            if isinstance(node, ast.If | ast.Try)
            for child in ast.walk(node)
        }
        type_checking = {
            id(child)
            for node in tree.body
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for child in ast.walk(node)
        }
        guarded = {
            id(child)
            for node in ast.walk(tree)
            if isinstance(node, ast.Try) and _catches_import_error(node)
            for statement in node.body
            for child in ast.walk(statement)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            if id(node) in type_checking:
                continue
            eager = id(node) in top_level
            for name in names:
                module = name.split(".")[0]
                if module == "ntklens":
                    if eager:
                        eager_ntklens.setdefault(module_name(path), set()).add(name)
                    continue
                if module in sys.stdlib_module_names:
                    continue
                found.setdefault(module, []).append(
                    Import(path, node.lineno, eager, id(node) in guarded)
                )
    return found, eager_ntklens


def third_party_imports() -> dict[str, list[Import]]:
    return scan()[0]


def requirement_name(requirement: str) -> str:
    """'ray[default]>=2.9' -> 'ray' (normalized as PEP 503 does)."""
    name = re.match(r"[A-Za-z0-9._-]+", requirement.strip())
    assert name is not None, requirement
    return re.sub(r"[-_.]+", "-", name.group(0)).lower()


def declared() -> tuple[set[str], dict[str, set[str]]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    required = {requirement_name(r) for r in project["dependencies"]}
    extras = {
        extra: {requirement_name(r) for r in requirements}
        for extra, requirements in project.get("optional-dependencies", {}).items()
    }
    return required, extras


def distribution(module: str) -> str:
    return requirement_name(DISTRIBUTIONS.get(module, module))


def test_the_scan_finds_the_imports_it_should() -> None:
    imports = third_party_imports()
    # Known eager and lazy imports: the scan itself must see both kinds.
    assert any(place.eager for place in imports["numpy"])
    assert not any(place.eager for place in imports["sklearn"])  # lazy in data/registry.py
    assert distribution("sklearn") == "scikit-learn"


def test_every_third_party_import_is_declared() -> None:
    required, extras = declared()
    optional = set().union(*(names for extra, names in extras.items() if extra not in DEV_EXTRAS))
    undeclared = {
        module: f"{places[0].path.relative_to(ROOT)}:{places[0].line}"
        for module, places in third_party_imports().items()
        if distribution(module) not in required | optional
    }
    assert not undeclared, f"imported but not in pyproject.toml: {undeclared}"


def test_optional_extras_are_imported_lazily() -> None:
    """An optional dependency is imported inside a function, or at the top of an adapter
    module made for it (guarded, with an install hint) that no other module imports."""
    required, _ = declared()
    imports, eager_ntklens = scan()
    imported_eagerly = set().union(*eager_ntklens.values())
    eager = {
        module: f"{place.path.relative_to(ROOT)}:{place.line}"
        for module, places in imports.items()
        if distribution(module) not in required
        for place in places
        if place.eager and not (place.guarded and module_name(place.path) not in imported_eagerly)
    }
    assert not eager, f"optional dependencies imported when ntklens is imported: {eager}"
