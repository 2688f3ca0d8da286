"""The test suite's own layering: a test module imports from ``tests.helpers``, never from
another test module (README, "Layout"). Shared run configs, launchers, replays and fixtures live
in ``tests/helpers/`` and ``tests/conftest.py``, so a test file can be moved, split or deleted
without breaking another one, and no test module's fixtures are collected twice.

Checked with ``ast`` over every file under ``tests/``, function-level imports included.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"


def _package(path: Path) -> str:
    """The dotted package a file under the repository root belongs to."""
    return ".".join(path.relative_to(ROOT).parent.parts)


def _imported_test_modules(source: str, package: str) -> set[str]:
    """Every ``tests...`` module ``source`` (a file of ``package``) imports, at any depth;
    ``from P import N`` counts as ``P.N`` (N may be a module), relative imports are resolved."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[: len(parts) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            modules = [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(m for m in modules if m == "tests" or m.startswith("tests."))
    return found


def _not_from_helpers(modules: set[str]) -> set[str]:
    return {m for m in modules if not m.startswith("tests.helpers.")}


def test_the_check_sees_imports_of_test_modules():
    """The checker itself: absolute, relative and function-level imports of a test module are
    found; imports from ``tests.helpers`` are allowed."""
    source = """
from tests.integration import test_pretrain
from tests.integration.test_pretrain import tiny_config
from .test_kill import _main
from tests.helpers.runs import ROOT
import tests.faults.test_elastic

def f():
    from ..integration.test_plugins import PLUGIN
"""
    found = _imported_test_modules(source, "tests.faults")
    assert _not_from_helpers(found) == {
        "tests.integration.test_pretrain",
        "tests.integration.test_pretrain.tiny_config",
        "tests.faults.test_kill._main",
        "tests.faults.test_elastic",
        "tests.integration.test_plugins.PLUGIN",
    }
    assert "tests.helpers.runs.ROOT" in found


def test_no_test_module_imports_another():
    """Every import of a ``tests`` module from a file under ``tests/`` is of ``tests.helpers``."""
    files = sorted(TESTS.rglob("*.py"))
    assert len(files) > 50  # the whole suite, not an empty glob
    violations = {
        str(file.relative_to(ROOT)): sorted(bad)
        for file in files
        if (bad := _not_from_helpers(_imported_test_modules(file.read_text(), _package(file))))
    }
    assert violations == {}
