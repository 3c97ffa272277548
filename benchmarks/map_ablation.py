"""Map post-processing ablation on a trained bundle: layer fusion (product / sum) x Gaussian sigma.

    .venv/bin/python benchmarks/map_ablation.py MODELS_DIR/NAME/vN DATA [--sigmas 0,2,4]

No retraining: the same student, only the anomaly-map post-processing changes (what `--combine` and
`--sigma` set at training time). With --out NAME.json registered in benchmarks/report.py it also
rewrites its block of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stpm.evaluation.report import compute_metrics, score_samples  # noqa: E402
from stpm.methods.stpm.anomaly_map import STPMMap  # noqa: E402
from stpm.training.data import test_samples  # noqa: E402
from stpm.methods.loading import load_map  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("data")
    ap.add_argument("--sigmas", default="0,2,4")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    amap, manifest = load_map(a.bundle)
    model = amap.model  # an STPM bundle's student-teacher pair
    samples = test_samples(a.data)
    rows = []
    for combine in ("product", "sum"):
        for sigma in (float(s) for s in a.sigmas.split(",")):
            r = score_samples(STPMMap(model, combine, sigma), samples, manifest.geometry, torch.device("cpu"),
                              manifest.image_score)
            m = compute_metrics(r["labels"], r["scores"], r["masks"], r["maps"], [s.defect for s in samples], None)
            o = m["overall"]
            rows.append({"combine": combine, "sigma": sigma, "image_auroc": o["image_auroc"],
                         "pixel_auroc": o["pixel_auroc"], "aupro": o["aupro_0.3"]})
            print(f"| {combine} | {sigma:g} | {o['image_auroc']:.3f} | {o['pixel_auroc']:.3f} | {o['aupro_0.3']:.3f} |",
                  flush=True)
    if a.out:
        from benchmarks import report

        res = {"bundle": a.bundle, "data": a.data, "rows": rows}
        Path(a.out).write_text(json.dumps(res, indent=2))
        report.publish(a.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
