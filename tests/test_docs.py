"""The docs' generated blocks (docs/BENCHMARKS.md, docs/DISTILLATION.md) are exactly what
benchmarks/report.py renders from their result files in benchmarks/results/, and BENCHMARKS.md holds
measured figures only inside them."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import report  # noqa: E402

# Sections whose prose has been audited: outside generated blocks they hold no measured figure. The
# numbers they may state are setup and targets: learning rate, momentum, AUROC targets, the share held out,
# the HTTP overhead target, the job runner's polling intervals (code constants, not measurements).
AUDITED = ("## Quality", "## Service", "## Scale-out", "## Speed", "## Peer")
SETUP_NUMBERS = {"0.4", "0.1", "0.9", "0.98", "0.97", "20 %", "25 %", "0.25", "0.3", "0.5",
                 "2.7", "99.5", "0.005", "15 %"}  # the peer's version (anomalib 2.7) and issue 13's parity / render targets
FIGURE = re.compile(r"\d+\.\d+|\d+(?:\.\d+)? ?%|\d+(?:\.\d+)?x\b")


def _doc() -> str:
    return report.DOC.read_text()


def _section(text: str, heading: str) -> str:
    m = re.search(rf"^{re.escape(heading)}.*?(?=^## |\Z)", text, re.DOTALL | re.MULTILINE)
    assert m, f"{heading} missing from docs/BENCHMARKS.md"
    return m[0]


@pytest.mark.parametrize("doc", report.DOCS, ids=lambda d: d.name)
def test_every_generated_block_is_its_result_file_rendered(doc):
    text = doc.read_text()
    blocks = report.blocks_in(text)
    mine = {k for k, b in report.BLOCKS.items() if b.doc == doc}
    assert set(blocks) == mine, "every block registered for this doc appears in it, and only those"
    for key in mine:
        b = report.BLOCKS[key]
        assert list(report.RESULTS.glob(b.result)), f"{key}: {b.result} missing from benchmarks/results/"
        assert (ROOT / b.script).is_file(), f"{key}: {b.script} missing"
    fresh = report.blocks_in(report.rendered(text))
    stale = [k for k in blocks if blocks[k] != fresh[k]]
    assert not stale, f"hand-edited or stale blocks {stale}: run .venv/bin/python benchmarks/report.py"


def test_audited_prose_holds_no_measured_figures():
    text = _doc()
    for heading in AUDITED:
        prose = report.BLOCK.sub("", _section(text, heading))
        prose = re.sub(r"```.*?```", "", prose, flags=re.DOTALL)
        prose = re.sub(r"\b\d+\.\d+\.\d+\.\d+\b", "", prose)  # addresses
        figures = [f for f in FIGURE.findall(prose) if f not in SETUP_NUMBERS]
        assert not figures, f"{heading}: figures typed by hand outside generated blocks: {figures}"


def test_replace_block_refuses_unknown_and_missing_blocks():
    with pytest.raises(KeyError, match="not registered"):
        report.replace_block("text", "nope", "body")
    with pytest.raises(KeyError, match="no generated block 'png_encode'"):
        report.replace_block("no markers here", "png_encode", "body")
    marked = f"a\n{report.begin_marker('png_encode')}\nold\n<!-- END generated png_encode -->\nb\n"
    assert report.blocks_in(report.replace_block(marked, "png_encode", "new 1.5x")) == {"png_encode": "new 1.5x\n"}


def test_publish_writes_a_cited_result_files_block_and_leaves_the_docs_alone_for_a_scratch_run(tmp_path, monkeypatch):
    """A benchmark publishes through report.publish: only a registered result file in benchmarks/results/
    rewrites its block (with its registered renderer, in its registered doc); the same file name elsewhere
    (a scratch run to /tmp) and an unregistered name write nothing."""
    import dataclasses

    results, doc = tmp_path / "results", tmp_path / "DOC.md"
    results.mkdir()
    res = {"command": "benchmarks/png_encode.py", "machine": "test CPU", "rows": []}
    blocks = {k: dataclasses.replace(b, doc=doc) for k, b in report.BLOCKS.items()}
    monkeypatch.setattr(report, "BLOCKS", blocks)
    monkeypatch.setattr(report, "RESULTS", results)
    before = f"prose\n{report.begin_marker('mixed_scale')}\nold\n<!-- END generated mixed_scale -->\n"
    doc.write_text(before)
    assert not report.publish(tmp_path / "mixed_scale.json", res)  # not in the results folder
    assert not report.publish(results / "unregistered.json", res)
    assert doc.read_text() == before
    assert report.publish(results / "mixed_scale.json", res)
    assert report.blocks_in(doc.read_text()) == {"mixed_scale": report.render("mixed_scale", res)}
    assert doc.read_text().startswith("prose\n")


def test_distillation_tables_are_their_result_files_rendered(tmp_path):
    """docs/DISTILLATION.md's `distill_*` blocks (benchmarks/distill_report.py's own markers) equal a fresh
    rendering of benchmarks/results/distill_*.json."""
    from benchmarks import distill_report

    copy = tmp_path / "DISTILLATION.md"
    copy.write_text(distill_report.DOC.read_text())
    distill_report.write_sections(distill_report.NAMES, copy)
    assert copy.read_text() == distill_report.DOC.read_text(), "stale: run .venv/bin/python benchmarks/distill_report.py"
