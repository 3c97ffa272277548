"""Lower-precision parity on real test sets: bf16 (OpenVINO) and int8 (NNCF on OpenVINO; ONNX Runtime static)
against fp32, per bundle; writes benchmarks/results/precision.json and the "precision" block of docs/BENCHMARKS.md.

    .venv/bin/python benchmarks/precision.py --bundle bottle=models/bottle/v1 --bundle metal_plate=models/metal_plate/v1

Each bundle is copied to a temporary folder (the originals are not changed) and checked on its MVTec /
MPDD category's full test set: decision agreement with fp32 (target >= 0.995), |AUROC change| (target
<= 0.005), the largest normalised score move. int8 is calibrated on 32 train/good images.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

DATA = {"bottle": "mvtec_ad_bottle_512/bottle", "metal_plate": "mpdd_metal_plate_512/metal_plate"}


def main() -> int:
    import report
    from speed import shared_data
    from stpm.runtime import cpu
    from stpm import export as ex
    from stpm.training.data import good_train_dir, list_images, test_samples
    from stpm.imaging.decode import read_image

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", action="append", required=True, help="DATASET=BUNDLE_DIR (bottle, metal_plate)")
    ap.add_argument("--int8", default="nncf,onnxruntime", help="int8 engines to try ('' for none)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "precision.json"))
    ap.add_argument("--no-doc", action="store_true")
    a = ap.parse_args()

    res = {"command": " ".join(["benchmarks/precision.py", *sys.argv[1:]]), "cpu": cpu.cpu_name(), "cpu_flags": sorted(f for f in cpu.cpu_flags()
                                                            if "bf16" in f or "vnni" in f or "amx" in f),
           "load_avg_at_start": list(os.getloadavg()), "bundles": {}}
    for spec in a.bundle:
        ds, path = spec.split("=", 1)
        root = shared_data() / DATA[ds]
        train, test = list_images(good_train_dir(root)), test_samples(root)
        cal = [read_image(p) for p in train[:: max(1, len(train) // 32)][:32]]
        imgs, labels = [read_image(s.path) for s in test], [s.label for s in test]
        with tempfile.TemporaryDirectory(prefix="stpm-precision-") as tmp:
            work = Path(tmp) / "b"
            shutil.copytree(path, work)
            r = {"bundle": path, "n_test": len(imgs), "bf16": ex.check_bf16(work, imgs, labels)}
            for engine in [e for e in a.int8.split(",") if e]:
                r[f"int8_{engine}"] = ex.quantize_int8(work, cal, imgs, labels, engine=engine,
                                                       max_decision_disagreement=0.005, max_auroc_drop=0.005)
        res["bundles"][ds] = r
        print(ds, json.dumps(r, indent=1), flush=True)
    res["load_avg_at_end"] = list(os.getloadavg())
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    if not a.no_doc:
        report.publish(a.out, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
