"""Which scale for a training set of mixed image sizes? Each shared set as a mixed-size set (every image a
random crop of 0.2-1x its height and width, stpm.training.mixed, seed 0, built into a temporary folder),
trained with the defaults at the scale tile / (a quantile of the training images' short sides), for
several quantiles (0.5 = the median, the rule before format 3); evaluated on the set's own mixed-size test
crops (every test image scored; small ones padded). No ONNX export (quality only; the torch maps are what
the export reproduces).

    .venv/bin/python benchmarks/mixed_scale.py --out benchmarks/results/mixed_scale.json

Resumable: rows already in --out are kept and not run again (the lead may pause long runs). Writes its
block of docs/BENCHMARKS.md when done.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.quality import DATA, machine_line  # noqa: E402
from stpm.evaluation.report import evaluate  # noqa: E402
from stpm.methods.loading import load_map  # noqa: E402
from stpm.options import TilingOptions, TrainingOptions, TrainOptions  # noqa: E402
from stpm.training.mixed import build_mixed_set  # noqa: E402
from stpm.training.pipeline import run_training  # noqa: E402

SOURCES = {
    "bottle": DATA / "mvtec_ad_bottle_512" / "bottle",
    "metal_plate": DATA / "mpdd_metal_plate_512" / "metal_plate",
    "kolektorsdd": DATA / "kolektorsdd_half" / "kolektorsdd",
}
TILE = 256  # the default model input


def run_one(name: str, data: Path, quantile: float, short_sides: list[int], models: Path, report_dir: Path) -> dict:
    """Train with the defaults at scale TILE / quantile of the short sides, evaluate; -> one result row."""
    load_at_start = os.getloadavg()[0]
    scale = TILE / float(np.quantile(short_sides, quantile))
    config = TrainingOptions(train=TrainOptions(device="cpu"), tiling=TilingOptions(scale=scale))
    t0 = time.monotonic()
    out = run_training(data, f"{name}-q{int(quantile * 100)}", models, config, export=False, show_bar=False)
    train_s = time.monotonic() - t0
    amap, manifest = load_map(out.path)
    t1 = time.monotonic()
    rep = evaluate(amap, manifest, data, torch.device("cpu"), report_dir / f"{name}-q{int(quantile * 100)}",
                   progress=False)
    o = rep["metrics"]["overall"]
    padded = [p for p in rep["per_image"] if min(p["scaled_size"]) < TILE]
    return {
        "dataset": f"mixed_{name}", "quantile": quantile, "scale": scale,
        "sigma": manifest.model.sigma, "image_score": manifest.model.image_score,
        "image_auroc": o["image_auroc"], "pixel_auroc": o["pixel_auroc"], "aupro": o["aupro_0.3"],
        "f1_max": o.get("image_f1_max"), "calibrated": o.get("at_calibrated_threshold"),
        "train_s": train_s, "eval_s": time.monotonic() - t1,
        "n_train_tiles": manifest.data["n_train_tiles"], "n_train": manifest.data["n_train"],
        "n_test": len(rep["per_image"]), "n_test_padded": len(padded),
        "test_tiles": int(sum(p["tiles"] for p in rep["per_image"])),
        "padding_positions": manifest.training.get("patchcore", {}).get("n_padding_positions"),
        "load_at_start": load_at_start,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default=",".join(SOURCES))
    ap.add_argument("--quantiles", default="0.5,0.9,1.0,0.75", help="short-side quantiles (0.5: the median)")
    ap.add_argument("--seed", type=int, default=0, help="of the crops")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mixed_scale.json"))
    a = ap.parse_args()
    out = Path(a.out)
    res = json.loads(out.read_text()) if out.is_file() else {"rows": []}
    command = "benchmarks/mixed_scale.py " + " ".join(sys.argv[1:])
    earlier = res.get("command") if res["rows"] else None  # resumed: the rows came from these commands
    res.update(command=command if not earlier or command in earlier else f"{earlier}; .venv/bin/python {command}",
               machine=machine_line(), crop_seed=a.seed)
    work = Path(tempfile.mkdtemp(prefix="stpm-mixed-scale-"))
    for q in (float(x) for x in a.quantiles.split(",")):
        for name in a.datasets.split(","):
            if any(r["dataset"] == f"mixed_{name}" and r["quantile"] == q for r in res["rows"]):
                continue
            data = work / "data" / name
            if not data.is_dir():
                build_mixed_set(SOURCES[name], data, seed=a.seed)
            shorts = [min(h, w) for h, w in _sizes(data / "train" / "good")]
            row = run_one(name, data, q, shorts, work / "models", work / "reports")
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(res, indent=2))
    from benchmarks import report
    from benchmarks.report_quality import mixed_scale_markdown

    report.publish(out, res)
    print(mixed_scale_markdown(res))
    return 0


def _sizes(folder: Path) -> list[tuple[int, int]]:
    from stpm.training.data import list_images, read_sizes

    return read_sizes(list_images(folder))[0]


if __name__ == "__main__":
    sys.exit(main())
