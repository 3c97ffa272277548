"""Collect the scores that calibration works from, per shared set and training seed, with the defaults:
the held-out good images' scores (what calibration sees), their synthetic anomalies' scores (the recall
side), and the labelled test set's scores (test/good and the defects). No bundle is published; each seed
is a different train / held-out split (and coreset), so the held-out scores differ from seed to seed.

    .venv/bin/python benchmarks/calibration_scores.py --seeds 0,1,2,3,4 --out benchmarks/results/calibration_scores.json

benchmarks/calibration_estimators.py reads the result to compare tail estimators. Resumable: a
(dataset, seed) already in --out is not run again.
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

from benchmarks.quality import DATASETS, machine_line  # noqa: E402
from stpm.evaluation.report import score_samples  # noqa: E402
from stpm.imaging.scores import ImageScore, image_scores  # noqa: E402
from stpm.methods import registry  # noqa: E402
from stpm.methods.base import FitData, FitRun  # noqa: E402
from stpm.options import TrainingOptions, TrainOptions  # noqa: E402
from stpm.training.data import test_samples  # noqa: E402
from stpm.training.pipeline import choose_and_calibrate, load_good_images, resolved  # noqa: E402
from stpm.training.reproducible import reproducible  # noqa: E402


def scores_of(ds: str, seed: int) -> dict:
    """Train with the defaults (seed `seed`), select, and score held-out, synthetic and test images."""
    config = TrainingOptions(train=TrainOptions(seed=seed, device="cpu"))
    device = torch.device("cpu")
    t0 = time.monotonic()
    model_cfg = resolved(config.model)
    images = load_good_images(DATASETS[ds], config, skip_bad=False)
    run = FitRun(device, None, None, False, None, None, False)
    with reproducible(seed, device) as gen:
        fitted = registry.method(model_cfg.method).fit(model_cfg, config.train, FitData(images.train, images.val,
                                                                                       seed, gen), run)
        model_cfg, chosen, _, _ = choose_and_calibrate(fitted, device, images, images.val_images(), model_cfg, config)
    spec = ImageScore(model_cfg.image_score, model_cfg.topk)  # type: ignore[arg-type]
    samples = test_samples(DATASETS[ds])
    test = score_samples(fitted.amap, samples, images.geometry, device, spec, progress=False)
    return {
        "dataset": ds, "seed": seed, "sigma": model_cfg.sigma, "image_score": model_cfg.image_score,
        "n_train": len(images.train_idx), "n_val": len(images.val_idx),
        "val_good": image_scores(chosen.good_maps, spec).tolist(),
        "synthetic": image_scores(chosen.synthetic_maps, spec).tolist(), "synthetic_kinds": chosen.synthetic_kinds,
        "test_scores": np.asarray(test["scores"], dtype=float).tolist(),
        "test_defects": [s.defect for s in samples], "seconds": round(time.monotonic() - t0, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "calibration_scores.json"))
    a = ap.parse_args()
    out = Path(a.out)
    res = json.loads(out.read_text()) if out.is_file() else {
        "command": " ".join(["benchmarks/calibration_scores.py", *sys.argv[1:]]), "machine": machine_line(), "runs": []}
    done = {(r["dataset"], r["seed"]) for r in res["runs"]}
    for seed in (int(s) for s in a.seeds.split(",")):  # seeds outer: a partial run covers every set
        for ds in a.datasets.split(","):
            if (ds, seed) in done:
                continue
            row = scores_of(ds, seed)
            res["runs"].append(row)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(res, indent=1))
            print(f"{ds} seed {seed}: n_val {row['n_val']}, {row['seconds']} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
