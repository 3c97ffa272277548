"""The generated blocks of docs/BENCHMARKS.md, docs/DISTILLATION.md, docs/DOCKER.md and docs/SCALING.md: each one is the Markdown of one
result file in benchmarks/results/ (or one run's per-seed files), rendered here, and marked in the doc so
nobody types into it. Torch-free.

    <!-- BEGIN generated KEY: ... do not edit -->
    ...
    <!-- END generated KEY -->

A benchmark script writes its own block after a run (`write_block`); `python benchmarks/report.py`
re-renders every block from the result files (`--check`: fail if a block differs, as tests/test_docs.py
does). Text outside the blocks is prose: it explains and reads the tables.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: `benchmarks` and `stpm` import from the checkout
    sys.path.insert(0, str(ROOT))
from benchmarks.report_bank import bank_size_markdown, bank_speed_markdown, bundles_speed_markdown  # noqa: E402
from benchmarks.report_calibration import estimators_markdown  # noqa: E402
from benchmarks.report_docker import docker_images_markdown, docker_smoke_markdown, load_docker_smoke  # noqa: E402
from benchmarks.report_faults import scale_faults_markdown  # noqa: E402
from benchmarks.report_quality import (  # noqa: E402
    both_markdown,
    ensemble_markdown,
    decisions_markdown,
    feature_taps_markdown,
    map_ablation_markdown,
    methods_markdown,
    mixed_defects_markdown,
    mixed_scale_markdown,
    padding_content_markdown,
    quality_markdown,
)
from benchmarks.report_speed import (  # noqa: E402
    bf16_split_markdown,
    load_markdown,
    memory_markdown,
    peer_markdown,
    png_encode_markdown,
    precision_markdown,
    render_stages_markdown,
    scale_markdown,
    speed_markdown,
    sweep_markdown,
)

RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "BENCHMARKS.md"
DISTILL_DOC = ROOT / "docs" / "DISTILLATION.md"
DOCKER_DOC = ROOT / "docs" / "DOCKER.md"
SCALING_DOC = ROOT / "docs" / "SCALING.md"
DOCS = (DOC, DISTILL_DOC, DOCKER_DOC, SCALING_DOC)
BLOCK = re.compile(r"<!-- BEGIN generated (?P<key>[\w.-]+):[^>]*-->\n(?P<body>.*?)<!-- END generated (?P=key) -->",
                   re.DOTALL)


# ------------------------------------------------------------------------------------ renderers

@dataclass(frozen=True)
class Block:
    script: str  # the benchmark that writes the result file (and this block after a run)
    result: str  # file name in benchmarks/results/
    render: Callable[[dict[str, Any]], str]
    command: str | None = None  # for result files written before the script recorded its command
    doc: Path = DOC
    load: Callable[[], dict[str, Any]] | None = None  # instead of reading `result` (e.g. merged seed files)


BLOCKS: dict[str, Block] = {
    "quality_methods": Block("benchmarks/quality.py", "quality_methods.json", methods_markdown),
    "quality_decisions": Block("benchmarks/quality.py", "quality_decisions.json", decisions_markdown),
    "quality_mixed": Block("benchmarks/quality.py", "quality_mixed.json", both_markdown),
    "quality_search": Block("benchmarks/quality.py", "quality_search.json", both_markdown),
    "quality_x2": Block("benchmarks/quality.py", "quality_x2.json", both_markdown),
    "quality_stride4": Block("benchmarks/quality.py", "quality_stride4.json", both_markdown),
    "quality_mirrors": Block("benchmarks/quality.py", "quality_mirrors.json", both_markdown),
    "quality_prior": Block("benchmarks/quality.py", "quality_prior.json", both_markdown),
    "quality_prior_mixed": Block("benchmarks/quality.py", "quality_prior_mixed.json", both_markdown),
    "quality_lite2": Block("benchmarks/quality.py", "quality_lite2.json", both_markdown),
    "quality_stpm_ksdd": Block("benchmarks/quality.py", "quality_stpm_ksdd.json", both_markdown),
    "quality_stpm_bm": Block("benchmarks/quality.py", "quality_stpm_bm.json", both_markdown),
    "quality_x2tile_ksdd": Block("benchmarks/quality.py", "quality_x2tile_ksdd.json", both_markdown),
    "quality_half_ksdd": Block("benchmarks/quality.py", "quality_half_ksdd.json", both_markdown),
    "quality_search_auto": Block("benchmarks/quality.py", "quality_search_auto.json", both_markdown),
    "quality_stpm_cf": Block("benchmarks/quality.py", "quality_stpm_cf.json", both_markdown),
    "quality_stpm_cf_ksdd": Block("benchmarks/quality.py", "quality_stpm_cf_ksdd.json", both_markdown),
    "quality_nbhd_ksdd": Block("benchmarks/quality.py", "quality_nbhd_ksdd.json", both_markdown),
    "ensemble_ksdd": Block("benchmarks/ensemble_maps.py", "ensemble_ksdd.json", ensemble_markdown),
    "calibration_estimators": Block("benchmarks/calibration_estimators.py", "calibration_estimators.json",
                                    estimators_markdown),
    "quality_128px": Block("benchmarks/quality.py", "quality_128px.json", quality_markdown),
    "quality_256px": Block("benchmarks/quality.py", "quality_256px.json", quality_markdown),
    "map_ablation_bottle": Block("benchmarks/map_ablation.py", "map_ablation_bottle.json", map_ablation_markdown),
    "speed-resnet18-quiet": Block(
        "benchmarks/speed.py", "speed-resnet18-quiet.json", speed_markdown,
        ".venv/bin/python benchmarks/speed.py --seconds 6 --out benchmarks/results/speed-resnet18-quiet.json"),
    "speed-bottle-lite0-t1": Block(
        "benchmarks/speed.py", "speed-bottle-lite0-t1.json", speed_markdown,
        ".venv/bin/python benchmarks/speed.py --bundle <trained EfficientNet-Lite0 bottle bundle, 128 px> --threads 1 "
        "--int8-data ../shared/data/mvtec_ad_bottle_512/bottle --out benchmarks/results/speed-bottle-lite0-t1.json"),
    "png_encode": Block("benchmarks/png_encode.py", "png_encode.json", png_encode_markdown),
    "render_stages": Block("benchmarks/render_stages.py", "render_stages.json", render_stages_markdown),
    "render_stages_zen5": Block("benchmarks/render_stages.py", "render_stages_zen5.json", render_stages_markdown),
    "load_default": Block("benchmarks/load.py", "load_default.json", load_markdown),
    "load_intra1": Block("benchmarks/load.py", "load_intra1.json", load_markdown),
    "load_sweep": Block("benchmarks/load.py", "load_sweep.json", sweep_markdown),
    "memory": Block("benchmarks/memory.py", "memory.json", memory_markdown),
    "memory_before": Block("benchmarks/memory.py", "memory_before.json", memory_markdown),
    "scale": Block("benchmarks/scale.py", "scale.json", scale_markdown),
    "scale-jobs": Block("benchmarks/scale.py", "scale-jobs.json", scale_markdown),
    "peer": Block("benchmarks/peer.py", "peer.json", peer_markdown),
    "peer_zen5": Block("benchmarks/peer.py", "peer_zen5.json", peer_markdown),
    "peer_stpm_zen5": Block("benchmarks/peer.py", "peer_stpm_zen5.json", peer_markdown),
    "peer_avx2cap_zen5": Block("benchmarks/peer.py", "peer_avx2cap_zen5.json", peer_markdown),
    "bank_size": Block("benchmarks/bank_size.py", "bank_size.json", bank_size_markdown),
    "bank_speed": Block("benchmarks/bank_speed.py", "bank_speed.json", bank_speed_markdown),
    "mirrors_speed": Block("benchmarks/bank_speed.py", "mirrors_speed.json", bundles_speed_markdown),
    "bf16_split": Block("benchmarks/bf16_split.py", "bf16_split.json", bf16_split_markdown),
    "precision": Block("benchmarks/precision.py", "precision.json", precision_markdown),
    "docker_images": Block("benchmarks/docker_images.py", "docker_images.json", docker_images_markdown,
                           doc=DOCKER_DOC),
    "docker_smoke": Block("scripts/docker-smoke.sh", "docker_smoke_*.json", docker_smoke_markdown, doc=DOCKER_DOC,
                          load=load_docker_smoke),
    "mixed_scale": Block("benchmarks/mixed_scale.py", "mixed_scale.json", mixed_scale_markdown),
    "mixed_defects": Block("benchmarks/mixed_defects.py", "mixed_defects.json", mixed_defects_markdown),
    "feature_taps": Block("benchmarks/feature_taps.py", "feature_taps.json", feature_taps_markdown),
    "padding_content": Block("benchmarks/padding_content.py", "padding_content.json", padding_content_markdown),
    "scale_faults": Block("benchmarks/scale_faults.py", "scale_faults.json", scale_faults_markdown, doc=SCALING_DOC),
}


# docs/DISTILLATION.md's tables are written by benchmarks/distill_report.py (its own `distill_*` blocks,
# checked by tests/test_docs.py through distill_report.render_all).


def render(key: str, res: dict[str, Any] | None = None) -> str:
    """Block `key`'s Markdown, from `res` or (None) from its result file."""
    b = BLOCKS[key]
    if res is None:
        res = b.load() if b.load else json.loads((RESULTS / b.result).read_text())
    if b.command and "command" not in res:
        res = {**res, "command": b.command}
    return b.render(res).strip() + "\n"


def publish(out: Path | str, res: dict[str, Any]) -> bool:
    """After a benchmark wrote `res` to `out`: when `out` is a result file a doc cites (registered here, in
    benchmarks/results/), rewrite its block with the registered renderer in the registered doc. A scratch
    run elsewhere (e.g. `--out /tmp/x.json`) leaves the docs alone. Returns whether a block was written."""
    out = Path(out)
    key = out.stem
    if key not in BLOCKS or BLOCKS[key].result != out.name or out.resolve().parent != RESULTS.resolve():
        return False
    write_block(BLOCKS[key].doc, key, render(key, res))
    return True


def begin_marker(key: str) -> str:
    b = BLOCKS[key]
    return (f"<!-- BEGIN generated {key}: written by {b.script} from benchmarks/results/{b.result}; do not edit, "
            "rerun benchmarks/report.py -->")


def replace_block(text: str, key: str, body: str) -> str:
    """`text` with block `key`'s body replaced; raises KeyError when the doc has no such block."""
    if key not in BLOCKS:
        raise KeyError(f"generated block {key!r} is not registered in benchmarks/report.py BLOCKS")
    found = False

    def sub(m: re.Match[str]) -> str:
        nonlocal found
        if m["key"] != key:
            return m[0]
        found = True
        return f"{begin_marker(key)}\n{body.strip()}\n<!-- END generated {key} -->"

    out = BLOCK.sub(sub, text)
    if not found:
        raise KeyError(f"no generated block {key!r} in the doc: add its BEGIN/END markers where it belongs")
    return out


def write_block(doc: Path, key: str, body: str) -> None:
    doc.write_text(replace_block(doc.read_text(), key, body))


def blocks_in(text: str) -> dict[str, str]:
    return {m["key"]: m["body"] for m in BLOCK.finditer(text)}


def rendered(text: str) -> str:
    """`text` with every generated block re-rendered from its result file."""
    for key in blocks_in(text):
        text = replace_block(text, key, render(key))
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description="re-render the docs' generated blocks from benchmarks/results/")
    ap.add_argument("--check", action="store_true", help="only report blocks that differ (exit 1)")
    a = ap.parse_args()
    stale = []
    for doc in DOCS:
        text = doc.read_text()
        new = rendered(text)
        stale += [k for k, v in blocks_in(text).items() if v != blocks_in(new)[k]]
        if not a.check:
            doc.write_text(new)
    if a.check:
        print("stale blocks: " + ", ".join(stale) if stale else "all generated blocks match their result files")
        return 1 if stale else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
