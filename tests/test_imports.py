"""The import graph of stpm and app: the contracts in pyproject.toml ([tool.importlinter]: the scoring
path, the option models and the method specs never import torch; stpm never imports app; runtime over
bundle over imaging; a method never imports another; distillation apart), and no import cycle. grimp reads
module-level and deferred (function-level) imports alike; a library that imports code by a string
(importlib) would hide its edges from both, so stpm does not (app registers its commands by entry point)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

grimp = pytest.importorskip("grimp")
ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    pytest.importorskip("importlinter", reason="import-linter (the test extra) runs the contracts")
    lint = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


def test_no_library_module_imports_by_string():
    """importlib.import_module in stpm/ would be an edge the contracts cannot see. Exceptions, where the
    name comes from the user or from data, not from our code: the teacher-weight packages
    (stpm/methods/backbones.py) and the `package.module:attr` models a user names for distillation."""
    allowed = {ROOT / "stpm" / "methods" / "backbones.py", ROOT / "stpm" / "distill" / "models.py"}
    offenders = [p for p in (ROOT / "stpm").rglob("*.py") if "import_module(" in p.read_text() and p not in allowed]
    assert not offenders, offenders


def test_no_import_cycles():
    graph = grimp.build_graph("stpm", "app", exclude_type_checking_imports=True)
    assert {"stpm.export", "stpm.evaluation.speed", "stpm.runtime", "app.main"} <= graph.modules
    cycles = []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            if imported == importer or importer.startswith(imported + ".") or imported.startswith(importer + "."):
                continue  # a package and its own submodules (`from stpm.api import train` in stpm/__init__)
            if graph.chain_exists(importer=imported, imported=importer):
                back = graph.find_shortest_chain(importer=imported, imported=importer)
                cycles.append(" -> ".join((importer, *back)))
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
