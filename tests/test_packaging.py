"""Packaging: every third-party import under src/ is declared in pyproject.toml, and the
modules of optional extras are imported lazily (inside functions), so a plain install works."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
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


def third_party_imports() -> dict[str, list[tuple[Path, int, bool]]]:
    """Top-level module -> (file, line, imported at module level) for every import."""
    found: dict[str, list[tuple[Path, int, bool]]] = {}
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
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            if id(node) in type_checking:
                continue
            for name in names:
                module = name.split(".")[0]
                if module in sys.stdlib_module_names or module == "ntklens":
                    continue
                eager = id(node) in top_level
                found.setdefault(module, []).append((path, node.lineno, eager))
    return found


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
    assert any(eager for _, _, eager in imports["numpy"])
    assert not any(eager for _, _, eager in imports["sklearn"])  # lazy in data/registry.py
    assert distribution("sklearn") == "scikit-learn"


def test_every_third_party_import_is_declared() -> None:
    required, extras = declared()
    optional = set().union(*(names for extra, names in extras.items() if extra not in DEV_EXTRAS))
    undeclared = {
        module: f"{path.relative_to(ROOT)}:{line}"
        for module, places in third_party_imports().items()
        for path, line, _ in places[:1]
        if distribution(module) not in required | optional
    }
    assert not undeclared, f"imported but not in pyproject.toml: {undeclared}"


def test_optional_extras_are_imported_lazily() -> None:
    required, _ = declared()
    eager = {
        module: f"{path.relative_to(ROOT)}:{line}"
        for module, places in third_party_imports().items()
        if distribution(module) not in required
        for path, line, at_module_level in places
        if at_module_level
    }
    assert not eager, f"optional dependencies imported at module level: {eager}"
