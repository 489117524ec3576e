"""The house's layers: every project import points down (or within its own package), no project import
hides inside a function to dodge a cycle, and the code passes the linter configured in pyproject.toml."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# lowest first; a package may import its own modules and those of lower layers only
LAYERS = [["core"], ["students"], ["imagedata", "bundle", "partitioning"], ["distill"], ["methods", "serve"],
          ["pipeline"]]
RANK = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}
# the command lines: every command imports what it needs inside its own function, so that `nonn serve`
# runs where torch is absent (documented at the top of each file)
LAZY = {"pipeline/cli.py", "serve/cli.py"}


def _imports(path: Path) -> list[tuple[str, bool, int]]:
    """(project package imported, whether at module level, line) for every import in ``path``."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in RANK:
                found.append((name.split(".")[0], id(node) in top, node.lineno))
    return found


def _sources() -> list[Path]:
    return sorted(p for pkg in RANK for p in (ROOT / pkg).glob("*.py"))


def test_every_package_is_in_a_layer():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "benchmarks"}
    assert packages == set(RANK)


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down_and_sit_at_module_level(path: Path):
    own = path.parent.name
    rel = str(path.relative_to(ROOT))
    for pkg, top, line in _imports(path):
        assert RANK[pkg] < RANK[own] or pkg == own, f"{rel}:{line} imports {pkg}, a higher or sibling layer"
        assert top or rel in LAZY, f"{rel}:{line} imports {pkg} inside a function; import it at the top"


def test_the_checker_sees_a_wrong_import(tmp_path: Path):
    bad = tmp_path / "students" / "bad.py"
    bad.parent.mkdir()
    bad.write_text("from pipeline.config import load_config\n\ndef f():\n    from core.io import read_json\n")
    assert [(p, top) for p, top, _ in _imports(bad)] == [("pipeline", True), ("core", False)]


def test_the_code_passes_the_linter():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is not installed: ./setup.sh installs it (requirements.txt)"
    result = subprocess.run([ruff, "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
