"""Layering: `core` imports none of training/export/service/cli; `service` imports only `core` (+ itself).

Checked on the source (every import statement, also those inside functions), so a lazy import cannot
hide a dependency that would drag the training stack into the served container.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = {"core", "training", "export", "service", "cli"}
FORBIDDEN = {
    "core": {"training", "export", "service", "cli"},
    "service": {"training", "export", "cli"},
}


def imported_top_levels(path: Path) -> set[tuple[str, int]]:
    """(top-level package, line) of every absolute import in a file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {(alias.name.split(".")[0], node.lineno) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add((node.module.split(".")[0], node.lineno))
    return found


def test_the_import_scanner_sees_lazy_imports(tmp_path: Path) -> None:
    sample = tmp_path / "m.py"
    sample.write_text("import os\n\ndef f():\n    from training.models import x\n    import export.graph\n")
    assert {name for name, _ in imported_top_levels(sample)} == {"os", "training", "export"}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_respects_layering(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no Python files found in {package}/"
    violations = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in files
        for name, line in sorted(imported_top_levels(path))
        if name in FORBIDDEN[package]
    ]
    assert not violations, "layering violated:\n" + "\n".join(violations)
