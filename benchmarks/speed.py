"""Speed benchmark: torch eager vs ONNX Runtime vs the full scoring path; writes its block of docs/BENCHMARKS.md.

    .venv/bin/python benchmarks/speed.py                      # resnet18 STPM at 256 px (weights random: speed only)
    .venv/bin/python benchmarks/speed.py --bundle models/bottle/v1 --int8-data ../shared/data/mvtec_ad_bottle_512/bottle

Without --bundle it builds a resnet18 teacher + student bundle at 256 px with random weights (speed does
not depend on the weights); INT8 parity needs a trained bundle (--bundle) and labelled data (--int8-data).
Results go to benchmarks/results/speed-NAME.json (with the command that made them) and to the generated
block `speed-NAME` of docs/BENCHMARKS.md (benchmarks/report.py renders it; nothing else in the doc is
touched). A new NAME needs its block registered in benchmarks/report.py BLOCKS and its markers in the doc.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def shared_data() -> Path:
    env = os.environ.get("STPM_SHARED_DATA")
    return Path(env) if env else ROOT.parent / "shared" / "data"


def speed_bundle(models_dir: Path, image_size: int = 256, backbone: str = "resnet18",
                 student_backbone: str | None = None) -> Path:
    """resnet18 teacher + student by default (random weights), calibrated on a few random images, exported."""
    import numpy as np
    import torch

    from stpm.training.calibration import calibrate
    from stpm.options import ModelOptions
    from stpm.export.onnx import export_bundle
    from stpm.methods.maps import tile_score as image_score
    from stpm.methods.stpm.loss import anomaly_map
    from stpm.methods.stpm.model import build_stpm
    from stpm.methods.stpm.anomaly_map import STPMMap
    from stpm.training.publish import build_manifest, publish_model

    cfg = ModelOptions(method="stpm", backbone=backbone, student_backbone=student_backbone, pretrained=False,
                      image_size=image_size)
    # seeded (build_stpm seeds its random teacher and the student; the calibration images too): every build is
    # the same bundle, and the bf16 gate's verdict at export the same too
    model, _ = build_stpm(cfg, seed=0)
    model.eval()
    with torch.no_grad():
        t, s = model(torch.rand(4, 3, image_size, image_size, generator=torch.Generator().manual_seed(1)))
        scores = image_score(anomaly_map(t, s, (image_size, image_size))).numpy()
    manifest = build_manifest(f"speed-{backbone}", cfg, calibrate(np.asarray(scores)), "random-init", {}, {})
    amap = STPMMap(model, manifest["model"]["combine"], manifest["model"]["sigma"])
    _, path = publish_model(models_dir, amap, manifest, before_publish=lambda d: export_bundle(d))
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", default=None, help="bundle folder (default: build a resnet18 speed bundle)")
    ap.add_argument("--images", default=None, help="images to score (default: the bottle test set)")
    ap.add_argument("--int8-data", default=None, help="MVTec category folder for INT8 parity")
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--overlay-size", choices=("input", "model", "both"), default="both")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/speed-NAME.json)")
    ap.add_argument("--no-doc", action="store_true", help="do not touch docs/BENCHMARKS.md")
    a = ap.parse_args()

    from benchmarks import report
    from stpm.evaluation.speed import run_bench

    images = a.images or str(shared_data() / "mvtec_ad_bottle_512" / "bottle" / "test")
    with tempfile.TemporaryDirectory(prefix="stpm-speed-") as tmp:
        bundle = Path(a.bundle) if a.bundle else speed_bundle(Path(tmp))
        name = bundle.parent.name
        out = Path(a.out) if a.out else ROOT / "benchmarks" / "results" / f"speed-{name}.json"
        res = run_bench(bundle, images, tuple(int(b) for b in a.batch_sizes.split(",")), a.seconds, a.threads,
                        a.overlay_size, a.int8_data, out_json=out, print_table=True)
    res["command"] = ".venv/bin/python benchmarks/speed.py " + " ".join(sys.argv[1:])
    out.write_text(json.dumps(res, indent=2) + "\n")
    if not a.no_doc:
        report.publish(out, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
