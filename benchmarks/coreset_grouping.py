"""Does choosing the coreset in chunks grouped by fold (cross-fitted calibration, issue 25) cost quality,
or is a difference the coreset's own randomness? From one default KolektorSDD bundle (e.g. the one
benchmarks/quality.py trained), its training patch features recomputed (checked to rebuild its bank),
banks of the default size by seed, grouped by fold and not, each evaluated on the full test set.

    .venv/bin/python benchmarks/coreset_grouping.py BUNDLE_DIR --out benchmarks/results/coreset_grouping.json
"""
import json
import os
import sys
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bank_size import DATASETS
from stpm.evaluation.report import evaluate
from stpm.methods.patchcore import method as pm
from stpm.methods.patchcore.anomaly_map import PatchCoreMap
from stpm.methods.patchcore.coreset import bank_rows, fit_bank
from stpm.methods.base import FitData, FitRun
from stpm.options import TrainingOptions, TrainOptions
from stpm.training.crossfit import fold_labels
from stpm.training.pipeline import load_good_images
from stpm.methods.loading import load_map, model_options

import argparse
ap = argparse.ArgumentParser(description=__doc__)
ap.add_argument("bundle")
ap.add_argument("--seeds", default="0,1,2")
ap.add_argument("--out", default="benchmarks/results/coreset_grouping.json")
args = ap.parse_args()
bundle = Path(args.bundle)
config = TrainingOptions(train=TrainOptions(device="cpu"))
amap, manifest = load_map(bundle)
images = load_good_images(DATASETS["kolektorsdd"], config, False)
folds = fold_labels(len(images.train_idx), 5, 0)
data = FitData(images.train, images.val, 0, torch.Generator(), folds)
collected = pm._features(amap.features, data, FitRun(torch.device("cpu"), show_bar=False), 16)
groups, patches = pm._patch_folds(data, collected), collected.features
m = model_options(manifest)
rows = bank_rows(len(patches), m.coreset_ratio, m.bank_size)
out = []
for seed in (int(s) for s in args.seeds.split(",")):
    for grouped in (True, False):
        bank, _ = fit_bank(patches, rows, seed=seed, groups=groups if grouped else None)
        if seed == 0 and grouped:
            print("reproduces the bundle's bank:", torch.equal(bank, amap.bank), flush=True)
        a = PatchCoreMap(amap.features, bank, float(m.sigma)).eval()
        rep = evaluate(a, manifest, DATASETS["kolektorsdd"], torch.device("cpu"), None, progress=False)
        o = rep["metrics"]["overall"]
        row = {"seed": seed, "grouped": grouped, "rows": len(bank), "image_auroc": o["image_auroc"],
               "pixel_auroc": o["pixel_auroc"], "aupro": o["aupro_0.3"], "load": os.getloadavg()[0]}
        print(row, flush=True); out.append(row)
from benchmarks.quality import machine_line
Path(args.out).write_text(json.dumps({"command": " ".join(["benchmarks/coreset_grouping.py", *sys.argv[1:]]),
                                      "machine": machine_line(), "bundle_bank_rows": int(len(amap.bank)),
                                      "rows": out}, indent=1))
