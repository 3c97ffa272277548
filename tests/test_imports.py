"""The import graph of stpm and app has no cycle (module-level and deferred imports alike: grimp reads
both), so no module needs another that needs it back, e.g. the old stpm.bench <-> stpm.export circle."""

from __future__ import annotations

import pytest

grimp = pytest.importorskip("grimp")


def test_no_import_cycles():
    graph = grimp.build_graph("stpm", "app")
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
