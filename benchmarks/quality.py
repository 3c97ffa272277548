"""Quality benchmark: train + calibrate + evaluate on the real MVTec bottle and MPDD metal plate.

    .venv/bin/python benchmarks/quality.py --epochs 10 --out benchmarks/results/quality.json

Teacher: EfficientNet-Lite0 with genuine ImageNet weights (the pretrained teacher available offline);
students: the same architecture, and ResNet18 with 1x1 projections. Writes a JSON with every number and
prints its Markdown table; a result file registered in benchmarks/report.py (quality_128px,
quality_256px) also rewrites its block of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stpm.config import CalibrationConfig, ModelConfig, TrainConfig  # noqa: E402
from stpm.evaluate import evaluate  # noqa: E402
from stpm.pipeline import train_and_publish  # noqa: E402
from stpm.weights import load_model  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
DATASETS = {
    "bottle": DATA / "mvtec_ad_bottle_512" / "bottle",
    "metal_plate": DATA / "mpdd_metal_plate_512" / "metal_plate",
}
STUDENTS = {"same (efficientnet_lite0)": None, "resnet18 + 1x1 proj": "resnet18"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.1, help="paper: 0.4 at batch 32; scaled linearly")
    ap.add_argument("--datasets", default="bottle,metal_plate")
    ap.add_argument("--students", default=",".join(STUDENTS))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quality.json"))
    ap.add_argument("--report-dir", default=str(ROOT / "benchmarks" / "work" / "quality"))
    a = ap.parse_args()
    rows = []
    models_dir = Path(tempfile.mkdtemp(prefix="stpm-quality-"))
    for ds in a.datasets.split(","):
        for label in a.students.split(","):
            student = STUDENTS[label]
            mcfg = ModelConfig(backbone="efficientnet_lite0", student_backbone=student, image_size=a.image_size)
            tcfg = TrainConfig(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, seed=0, device="cpu")
            name = f"{ds}-{student or 'same'}"
            t0 = time.monotonic()
            out = train_and_publish(DATASETS[ds], name, models_dir, mcfg, tcfg, CalibrationConfig(), export=False,
                                    show_bar=True)
            train_s = time.monotonic() - t0
            model, manifest = load_model(out.path)
            t1 = time.monotonic()
            rep = evaluate(model, manifest, DATASETS[ds], torch.device("cpu"), Path(a.report_dir) / name)
            eval_s = time.monotonic() - t1
            o = rep["metrics"]["overall"]
            n_train = manifest["data"]["n_train"]
            per_epoch = sum(h["seconds"] for h in out.fit.history) / max(len(out.fit.history), 1)
            row = {
                "dataset": ds, "teacher": "efficientnet_lite0 (ImageNet)", "student": label,
                "image_size": a.image_size, "epochs": a.epochs, "best_epoch": out.fit.best_epoch,
                "image_auroc": o["image_auroc"], "pixel_auroc": o["pixel_auroc"], "aupro": o["aupro_0.3"],
                "f1_max": o.get("image_f1_max"), "calibrated": o.get("at_calibrated_threshold"),
                "per_defect": {k: {m: v[m] for m in ("image_auroc", "pixel_auroc", "aupro_0.3")}
                               for k, v in rep["metrics"]["per_defect"].items()},
                "train_s_per_epoch": per_epoch, "train_images_per_s": n_train / per_epoch,
                "eval_images_per_s": len(rep["per_image"]) / eval_s, "total_train_s": train_s,
            }
            rows.append(row)
            print(json.dumps(row, indent=1), flush=True)
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps({
                "command": " ".join(sys.argv), "machine": f"{platform.processor() or platform.machine()}, "
                f"{torch.get_num_threads()} threads, torch {torch.__version__}", "rows": rows}, indent=2))
    from benchmarks.report import BLOCKS, DOC, quality_markdown, write_block

    res = json.loads(Path(a.out).read_text())
    print(quality_markdown(res))
    if Path(a.out).stem in BLOCKS:
        write_block(DOC, Path(a.out).stem, quality_markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
