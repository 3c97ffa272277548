"""Does choosing the coreset in chunks grouped by fold (cross-fitted calibration, issue 25) cost quality,
or is a difference the coreset's own randomness? From one default KolektorSDD bundle (e.g. the one
benchmarks/quality.py trained), its training patch features recomputed (checked to rebuild its bank),
banks of the default size by seed, grouped by fold and not, each evaluated on the full test set.

    .venv/bin/python benchmarks/coreset_grouping.py BUNDLE_DIR --out benchmarks/results/coreset_grouping.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bank_size import DATASETS  # noqa: E402
from benchmarks.quality import machine_line  # noqa: E402
from stpm.evaluation.report import evaluate  # noqa: E402
from stpm.methods.base import FitData, FitRun  # noqa: E402
from stpm.methods.loading import load_map, model_options  # noqa: E402
from stpm.methods.patchcore import method as pm  # noqa: E402
from stpm.methods.patchcore.anomaly_map import PatchCoreMap  # noqa: E402
from stpm.methods.patchcore.coreset import bank_rows, fit_bank  # noqa: E402
from stpm.options import TrainingOptions, TrainOptions  # noqa: E402
from stpm.training.crossfit import fold_labels  # noqa: E402
from stpm.training.pipeline import load_good_images  # noqa: E402

DATA = DATASETS["kolektorsdd"]
FOLDS = 5  # --calibration-folds' default


def training_patches(amap) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The bundle's training patch features, recomputed as `stpm train` computes them, and each one's fold."""
    images = load_good_images(DATA, TrainingOptions(train=TrainOptions(device="cpu")), False)
    folds = fold_labels(len(images.train_idx), FOLDS, 0)
    data = FitData(images.train, images.val, 0, torch.Generator(), folds)
    collected = pm._features(amap.features, data, FitRun(torch.device("cpu"), show_bar=False), 16)
    return collected.features, pm._patch_folds(data, collected)


def measure(amap, manifest, bank: torch.Tensor) -> dict:
    """The full test set's image / pixel AUROC and AUPRO with `bank` in place of the bundle's."""
    a = PatchCoreMap(amap.features, bank, float(model_options(manifest).sigma)).eval()
    o = evaluate(a, manifest, DATA, torch.device("cpu"), None, progress=False)["metrics"]["overall"]
    return {"image_auroc": o["image_auroc"], "pixel_auroc": o["pixel_auroc"], "aupro": o["aupro_0.3"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default="benchmarks/results/coreset_grouping.json")
    args = ap.parse_args()
    amap, manifest = load_map(Path(args.bundle))
    patches, groups = training_patches(amap)
    m = model_options(manifest)
    rows = bank_rows(len(patches), m.coreset_ratio, m.bank_size)
    out = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for grouped in (True, False):
            bank, _ = fit_bank(patches, rows, seed=seed, groups=groups if grouped else None)
            if seed == 0 and grouped:
                print("reproduces the bundle's bank:", torch.equal(bank, amap.bank), flush=True)
            row = {"seed": seed, "grouped": grouped, "rows": len(bank), **measure(amap, manifest, bank),
                   "load": os.getloadavg()[0]}
            print(row, flush=True)
            out.append(row)
    Path(args.out).write_text(json.dumps({"command": " ".join(["benchmarks/coreset_grouping.py", *sys.argv[1:]]),
                                          "machine": machine_line(), "bundle_bank_rows": int(len(amap.bank)),
                                          "rows": out}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
