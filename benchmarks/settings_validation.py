"""Does the settings search's synthetic AUROC rank candidates as the real test set does? (issue 25 part 3)

Per candidate setting (stpm.training.settings.candidates with the search on): fit on the same 24-image
sample of the training images, model selection on synthetic anomalies of the held-out good images, then
the same fitted model scored on the labelled test set. One JSON row per candidate is appended to
benchmarks/results/settings_validation.jsonl (with the load average at its end).

    .venv/bin/python benchmarks/settings_validation.py kolektorsdd   # or bottle, metal_plate
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.quality import DATASETS, machine_line  # noqa: E402
from stpm.evaluation.report import compute_metrics, score_samples  # noqa: E402
from stpm.imaging.decode import read_image  # noqa: E402
from stpm.imaging.geometry import tile_images  # noqa: E402
from stpm.imaging.scores import ImageScore  # noqa: E402
from stpm.methods import registry  # noqa: E402
from stpm.methods.base import FitData, FitRun  # noqa: E402
from stpm.options import build, updated  # noqa: E402
from stpm.training import pipeline, settings  # noqa: E402
from stpm.training.data import test_samples  # noqa: E402
from stpm.training.selection import select  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "settings_validation.jsonl"


def main(ds: str) -> None:
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    config = build({"device": "cpu", "search_settings": True})
    model_cfg = pipeline.resolved(config.model)
    images = pipeline.load_good_images(DATASETS[ds], config, False)
    options = settings.candidates(config, model_cfg, images.geometry, images.sizes, len(images.val_idx))
    pick = settings.sample_indices(len(images.train_idx), settings.SAMPLE_IMAGES, 0)
    sample = [read_image(images.paths[images.train_idx[i]]) for i in pick]
    val, samples, dev = images.val_images(), test_samples(DATASETS[ds]), torch.device("cpu")
    for s in options:
        t0 = time.time()
        g = replace(images.geometry, scale=images.geometry.scale * s.factor)
        cfg = updated(model_cfg, layers=s.layers)
        tr, va = tile_images(sample, g), tile_images(val, g)
        fitted = registry.method(cfg.method).fit(cfg, config.train, FitData(tr, va, 0, torch.Generator().manual_seed(0)),
                                                 FitRun(dev, show_bar=False))
        sel = select(fitted.amap, dev, va, val, g, cfg, 0, 16)
        best = max(sel.report["candidates"], key=lambda r: r["synthetic_image_auroc"])
        fit_s = time.time() - t0
        fitted.amap.with_sigma(best["sigma"])
        res = score_samples(fitted.amap, samples, g, dev, ImageScore(best["image_score"], cfg.topk), progress=False)
        m = compute_metrics(res["labels"], res["scores"], res["masks"], res["maps"], [x.defect for x in samples],
                            None)["overall"]
        row = {"ds": ds, "setting": s.describe(), "fit_select_s": round(fit_s, 1),
               "total_s": round(time.time() - t0, 1), "tiles_per_img": round(len(tr.tiles) / len(sample), 2),
               "synthetic": best, "real_image_auroc": round(m["image_auroc"], 4),
               "real_pixel_auroc": round(m["pixel_auroc"] or 0, 4), "real_f1": round(m.get("image_f1_max", 0), 4),
               "load": open("/proc/loadavg").read().split()[0], "machine": machine_line()}
        print(json.dumps(row), flush=True)
        with OUT.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
