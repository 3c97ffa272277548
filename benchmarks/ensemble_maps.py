"""Would a PatchCore + STPM ensemble rank and localise better than either alone? (issue 25, item 4)

Scores an MVTec-layout test set with two trained bundles (the torch maps `stpm eval` uses, each at its own
bundle's geometry), puts each map on its own threshold's scale (the bundle's calibration, unclipped: `low`
maps to 0 and the threshold to 0.5, both from good training images only) and fuses them pixel by pixel (the
mean, and the maximum). Image AUROC (max and top-1 % mean of each map), pixel AUROC and AUPRO for each
bundle alone and for each fusion, from the same maps, so the rows compare with each other (the single
bundles' rows should also match their `stpm eval` figures). Nothing here reads the test labels to choose
anything: the fusions are fixed before the test set is scored.

    .venv/bin/python benchmarks/ensemble_maps.py --bundles PATCHCORE_BUNDLE STPM_BUNDLE \\
        --data ../shared/data/kolektorsdd_half/kolektorsdd --out benchmarks/results/ensemble_ksdd.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.quality import machine_line  # noqa: E402
from stpm.bundle.calibration import Calibration  # noqa: E402
from stpm.evaluation import metrics  # noqa: E402
from stpm.evaluation.report import score_samples  # noqa: E402
from stpm.imaging.render import resize_map  # noqa: E402
from stpm.imaging.scores import ImageScore, image_scores  # noqa: E402
from stpm.methods.loading import load_map  # noqa: E402
from stpm.training.data import test_samples  # noqa: E402

SPECS = {"max": ImageScore("max"), "topk_mean": ImageScore("topk_mean")}


def on_threshold_scale(x, cal: Calibration):
    """Raw scores or maps on their bundle's threshold scale as Calibration.normalise puts them (low -> 0,
    threshold -> 0.5), unclipped, so that fused maps keep what lies beyond either end."""
    return 0.5 + (np.asarray(x, dtype=np.float64) - cal.threshold) * cal.scale


def bundle_maps(bundle: Path, samples, device: torch.device) -> dict:
    amap, manifest = load_map(bundle)
    cal = manifest.calibration
    out = score_samples(amap, samples, manifest.geometry, device, spec=manifest.image_score)
    m = manifest.model
    return {"bundle": str(bundle), "method": m.method, "teacher": m.backbone,
            "student": getattr(m, "student_backbone", None), "image_score": m.image_score,
            "maps": [on_threshold_scale(m, cal).astype(np.float32) for m in out["maps"]], "masks": out["masks"],
            "labels": out["labels"], "scores_as_bundle": out["scores"],
            "scores_on_threshold_scale": on_threshold_scale(out["scores"], cal)}


def row(name: str, maps: list[np.ndarray], masks: list[np.ndarray], labels: np.ndarray) -> dict:
    r = {"name": name, "pixel_auroc": metrics.auroc(masks, maps), "aupro": metrics.aupro(masks, maps)}
    for key, spec in SPECS.items():
        r[f"image_auroc_{key}"] = metrics.auroc(labels, image_scores(maps, spec))
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundles", nargs=2, required=True, metavar=("A", "B"), help="two bundle folders")
    ap.add_argument("--data", required=True, help="an MVTec-layout category folder (test/, ground_truth/)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    machine = machine_line()
    t0 = time.monotonic()
    samples = test_samples(Path(a.data))
    device = torch.device(a.device)
    got = [bundle_maps(Path(b), samples, device) for b in a.bundles]
    masks, labels = got[0]["masks"], got[0]["labels"]
    first = got[0]["maps"]
    second = [resize_map(m2, m1.shape) if m2.shape != m1.shape else m2 for m1, m2 in zip(first, got[1]["maps"])]
    rows = [row(f"{g['method']} alone", g["maps"] if i == 0 else second, masks, labels) for i, g in enumerate(got)]
    rows.append(row("mean of the two", [(x + y) / 2 for x, y in zip(first, second)], masks, labels))
    rows.append(row("max of the two", [np.maximum(x, y) for x, y in zip(first, second)], masks, labels))
    for i, g in enumerate(got):  # the bundle's own image score, as `stpm eval` reports it
        rows[i]["image_auroc_as_bundle"] = metrics.auroc(labels, g["scores_as_bundle"])
        rows[i]["image_score_of_bundle"] = g["image_score"]
    fused_scores = (got[0]["scores_on_threshold_scale"] + got[1]["scores_on_threshold_scale"]) / 2
    rows.append({"name": "mean of the two image scores", "image_auroc_as_bundles": metrics.auroc(labels, fused_scores)})
    res = {"command": "benchmarks/ensemble_maps.py " + " ".join(sys.argv[1:]), "machine": machine,
           "data": str(a.data), "n_test": len(samples),
           "bundles": [{k: g[k] for k in ("bundle", "method", "teacher", "student", "image_score")} for g in got],
           "rows": rows, "seconds": time.monotonic() - t0}
    Path(a.out).write_text(json.dumps(res, indent=2))
    for r in rows[:-1]:
        print(f"{r['name']:>18}: image AUROC max {r['image_auroc_max']:.3f} topk {r['image_auroc_topk_mean']:.3f}"
              f"{' (bundle ' + format(r['image_auroc_as_bundle'], '.3f') + ')' if 'image_auroc_as_bundle' in r else ''}"
              f"  pixel AUROC {r['pixel_auroc']:.3f}  AUPRO {r['aupro']:.3f}")
    print(f"mean of the two bundles' own image scores: image AUROC {rows[-1]['image_auroc_as_bundles']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
