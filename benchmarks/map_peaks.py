"""Where do a bundle's maps peak on a labelled test set, and how does its image AUROC move with the top-k
fraction? A diagnostic for a set whose ranking falls short (KolektorSDD, issue 25): it reads the test labels
and chooses nothing.

Per good test image: the position of its map's maximum, as a fraction of the width and height (a histogram
of each). Per defect image: whether its mask reaches each border (within 2 % of the size). The mean good map
profile across the width. The image AUROC of the same maps under top-k means of several fractions and the
maximum.

    .venv/bin/python benchmarks/map_peaks.py --bundle BUNDLE --data ../shared/data/kolektorsdd_half/kolektorsdd \\
        --out benchmarks/results/map_peaks_ksdd.json
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
from stpm.evaluation import metrics  # noqa: E402
from stpm.evaluation.report import score_samples  # noqa: E402
from stpm.imaging.scores import ImageScore, image_scores  # noqa: E402
from stpm.methods.loading import load_map  # noqa: E402
from stpm.training.data import test_samples  # noqa: E402

BINS = [0, .1, .2, .3, .4, .5, .6, .7, .8, .9, .95, 1.0]
TOPK = (0.0005, 0.001, 0.003, 0.01, 0.02, 0.05, 0.1, 0.2)
EDGE = 0.02  # a mask "reaches" a border within this fraction of the size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--data", required=True, help="an MVTec-layout category folder (test/, ground_truth/)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    machine, t0 = machine_line(), time.monotonic()
    amap, manifest = load_map(Path(a.bundle))
    samples = test_samples(Path(a.data))
    out = score_samples(amap, samples, manifest.geometry, torch.device("cpu"), spec=manifest.image_score,
                        progress=False)
    maps, labels, masks = out["maps"], out["labels"], out["masks"]
    good = np.flatnonzero(labels == 0)
    peaks = [np.unravel_index(int(np.argmax(maps[i])), maps[i].shape) for i in good]
    x = [c / maps[i].shape[1] for i, (_, c) in zip(good, peaks)]
    y = [r / maps[i].shape[0] for i, (r, _) in zip(good, peaks)]
    reach = {"left": 0, "right": 0, "top": 0, "bottom": 0}
    for i in np.flatnonzero(labels == 1):
        ys, xs = np.nonzero(masks[i])
        h, w = masks[i].shape
        reach["left"] += int(xs.min() <= EDGE * w)
        reach["right"] += int(xs.max() >= (1 - EDGE) * w - 1)
        reach["top"] += int(ys.min() <= EDGE * h)
        reach["bottom"] += int(ys.max() >= (1 - EDGE) * h - 1)
    width = min(maps[i].shape[1] for i in good)
    profile = np.mean([np.interp(np.linspace(0, 1, 16), np.linspace(0, 1, maps[i].shape[1]), maps[i].mean(axis=0))
                       for i in good], axis=0)
    res = {"command": "benchmarks/map_peaks.py " + " ".join(sys.argv[1:]), "machine": machine,
           "bundle": a.bundle, "data": a.data, "n_good": len(good), "n_defect": int((labels == 1).sum()),
           "bins": BINS, "good_peak_x_histogram": np.histogram(x, bins=BINS)[0].tolist(),
           "good_peak_y_histogram": np.histogram(y, bins=BINS)[0].tolist(),
           "defect_masks_reaching_border": reach, "good_mean_map_across_width_16": [round(float(v), 3) for v in profile],
           "min_map_width": int(width),
           "image_auroc_by_topk": {str(k): metrics.auroc(labels, image_scores(maps, ImageScore("topk_mean", k)))
                                   for k in TOPK},
           "image_auroc_max": metrics.auroc(labels, image_scores(maps, ImageScore("max"))),
           "seconds": round(time.monotonic() - t0, 1)}
    Path(a.out).write_text(json.dumps(res, indent=2))
    print(json.dumps({k: v for k, v in res.items() if k not in ("command", "machine")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
