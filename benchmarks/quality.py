"""Quality benchmark: train + calibrate + evaluate on every MVTec-layout set in ../shared/data.

Per method (the default: no options but the data and a name, i.e. PatchCore on EfficientNet-Lite1
with sigma and image score chosen on synthetic anomalies; and STPM), one table of image/pixel AUROC,
AUPRO, F1, P/R at the calibrated threshold, train seconds and score ms/image (the exported ONNX
scorer, the service's path):

    .venv/bin/python benchmarks/quality.py --configs default,stpm --out benchmarks/results/quality_methods.json

The default threshold's decisions (P/R, expected vs realised FPR on test/good, the former max_margin rule
and synthetic_f1 from the same run's recorded scores) for the default method:

    .venv/bin/python benchmarks/quality.py --configs default --out benchmarks/results/quality_decisions.json

The older student comparison (STPM, EfficientNet-Lite0 teacher, same-family vs ResNet18 students):

    .venv/bin/python benchmarks/quality.py --students all --epochs 12 --out benchmarks/results/quality_256px.json

Writes a JSON with every number and prints its Markdown table; a result file registered in
benchmarks/report.py also rewrites its block of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stpm.bundle.calibration import Calibration  # noqa: E402
from stpm.evaluation import metrics  # noqa: E402
from stpm.evaluation.report import evaluate  # noqa: E402
from stpm.methods.loading import load_map  # noqa: E402
from stpm.methods.patchcore.spec import layer_candidates  # noqa: E402
from stpm.options import CalibrationOptions, ModelOptions, TilingOptions, TrainingOptions, TrainOptions  # noqa: E402
from stpm.training.calibration import calibrate, recalibrate  # noqa: E402
from stpm.training.pipeline import run_training  # noqa: E402

DATA = Path(os.environ.get("STPM_SHARED_DATA", ROOT.parent / "shared" / "data"))
DATASETS = {
    "bottle": DATA / "mvtec_ad_bottle_512" / "bottle",
    "metal_plate": DATA / "mpdd_metal_plate_512" / "metal_plate",
    "kolektorsdd": DATA / "kolektorsdd_half" / "kolektorsdd",
}
STUDENTS = {"same (efficientnet_lite0)": None, "resnet18 + 1x1 proj": "resnet18"}
# Mixed-size sets: every image of a shared set replaced by a random crop of 0.2-1x its height and width
# (stpm.training.mixed, seed 0; defective crops keep part of the defect and their masks), built at run time
# into a temporary folder, never committed. Small crops are padded (bundle format 3).
MIXED_ROOT = Path(tempfile.gettempdir()) / "stpm-quality-mixed"
MIXED = {f"mixed_{name}": name for name in ("bottle", "metal_plate", "kolektorsdd")}
DATASETS.update({mixed: MIXED_ROOT / name for mixed, name in MIXED.items()})


def build_mixed_sets(names: list[str], seed: int = 0) -> None:
    """The requested mixed-size sets, (re)built from their shared sets into MIXED_ROOT."""
    import shutil

    from stpm.training.mixed import build_mixed_set

    for mixed in (n for n in names if n in MIXED):
        shutil.rmtree(DATASETS[mixed], ignore_errors=True)
        build_mixed_set(DATASETS[MIXED[mixed]], DATASETS[mixed], seed=seed)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.1, help="paper: 0.4 at batch 32; scaled linearly")
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--configs", default="default,stpm", help="method configurations: default, lite2 (the Lite2 teacher), x2 (twice the resolution), x2_tile (the same with a 512 px tile), half (half the resolution), stride4 (a stride-4 patch grid), stride4_bank (the same, the default's bank rows), mirrors (the bank and the map averaged over the hv mirrors), mirrors_bank (the same, the default's bank rows), "
                    "no_prior (the default without a position prior), nbhd1 / nbhd5 (--neighbourhood 1 or 5, not 3), "
                    "search (--search-settings on), no_search (--search-settings off), stpm, stpm_cf (stpm with "
                    "--refit-folds)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--students", default=None, help="'all' or a comma list of " + ", ".join(STUDENTS) +
                    ": the STPM student comparison instead of --configs")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quality.json"))
    ap.add_argument("--report-dir", default=str(ROOT / "benchmarks" / "work" / "quality"))
    ap.add_argument("--redecide", default=None, metavar="RESULT",
                    help="recompute a decisions result's threshold columns from its recorded scores (no training)")
    a = ap.parse_args()
    if a.redecide:
        from benchmarks import report
        from benchmarks.report_quality import decisions_markdown

        res = redecide(Path(a.redecide))
        Path(a.redecide).write_text(json.dumps(res, indent=2))
        print(decisions_markdown(res))
        report.publish(a.redecide, res)
        return 0
    build_mixed_sets(a.datasets.split(","))
    if a.students is None:
        return run_configs(a)
    if a.students == "all":
        a.students = ",".join(STUDENTS)
    rows = []
    models_dir = Path(tempfile.mkdtemp(prefix="stpm-quality-"))
    for ds in a.datasets.split(","):
        for label in a.students.split(","):
            student = STUDENTS[label]
            mcfg = ModelOptions(backbone="efficientnet_lite0", student_backbone=student, image_size=a.image_size)
            tcfg = TrainOptions(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, seed=0, device="cpu")
            name = f"{ds}-{student or 'same'}"
            t0 = time.monotonic()
            out = run_training(DATASETS[ds], name, models_dir, TrainingOptions(model=mcfg, train=tcfg, calibration=CalibrationOptions()), export=False, show_bar=True)
            train_s = time.monotonic() - t0
            model, manifest = load_map(out.path)
            t1 = time.monotonic()
            rep = evaluate(model, manifest, DATASETS[ds], torch.device("cpu"), Path(a.report_dir) / name)
            eval_s = time.monotonic() - t1
            o = rep["metrics"]["overall"]
            n_train = manifest["data"]["n_train"]
            history = out.fitted.record["history"]
            per_epoch = sum(h["seconds"] for h in history) / max(len(history), 1)
            row = {
                "dataset": ds, "teacher": "efficientnet_lite0 (ImageNet)", "student": label,
                "image_size": a.image_size, "epochs": a.epochs, "best_epoch": out.fitted.record["best_epoch"],
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
    from benchmarks import report
    from benchmarks.report_quality import quality_markdown

    res = json.loads(Path(a.out).read_text())
    print(quality_markdown(res))
    report.publish(a.out, res)
    return 0


def config_of(label: str, a: argparse.Namespace) -> TrainingOptions:
    """default: what `stpm train DATA --name X` does (only the device set); lite2: the same on the larger
    EfficientNet-Lite2 teacher (its default layers); x2: the same at twice the default resolution (the
    training images' median short side scaled to two tiles, not one: what `--search-settings` calls scale
    x2, here fixed); x2_tile: x2 with the tile doubled too (what the search's 2x now is: stpm.training.settings.finer);
half: the same at half the default resolution (the median short side scaled to half a tile,
padded to one); stride4: the default layers plus blocks.1, so the patch grid is stride 4 (4x the patches and
queries; benchmarks/feature_taps.py); stride4_bank: the same with a quarter of the coreset ratio, so the bank keeps
the default's rows; mirrors: the default with `--mirrors hv` (the bank also holds each good tile's three
mirror images, a tile's map is averaged over its mirrors: 4x the patches, features and search); mirrors_bank: the
same with a quarter of the coreset ratio, so the bank keeps about the default's rows; no_prior: the default with
`--position-prior off` (the image score never discounts a position prior); nbhd1 / nbhd5: the default with the
patch features averaged over 1 x 1 (none) or 5 x 5 positions instead of 3 x 3 (`--neighbourhood`); search: the same with
`--search-settings on` (the scale and the layers); no_search: the default with `--search-settings off` (the default
before it searched the scale where it shrinks the images 2x or more); every variant above but default and search
keeps the settings search off, so it is the default *scale* with its one change, as when it was measured; stpm: STPM on the same default teacher with
    the ResNet18 student (it beat the same-family student, quality_256px) and a short schedule (--epochs,
    --batch-size, --lr); stpm_cf: the same with `--refit-folds` (a student per calibration fold)."""
    model, tiling, calibration = ModelOptions(), TilingOptions(), CalibrationOptions()
    train = TrainOptions(device=a.device, search_settings="auto" if label == "default" else "off")
    if label == "lite2":
        model = ModelOptions(backbone="efficientnet_lite2")
    elif label == "x2":
        tiling = TilingOptions(resolution=2 * model.image_size)
    elif label == "x2_tile":  # x2 with the tile doubled too: as many tiles as the default, each 4x the pixels
        model = ModelOptions(image_size=2 * model.image_size)
        tiling = TilingOptions(resolution=2 * ModelOptions().image_size, max_tiles=TilingOptions().max_tiles // 4)
    elif label == "half":
        tiling = TilingOptions(resolution=model.image_size // 2)
    elif label.removesuffix("_bank") in ("stride4", "mirrors"):  # 4x the patches; _bank: a quarter of the ratio
        ratio = ModelOptions().coreset_ratio / (4 if label.endswith("_bank") else 1)
        if label.startswith("stride4"):  # what --search-settings tries: blocks.1,2,4
            model = ModelOptions(layers=layer_candidates(ModelOptions().backbone)[-1], coreset_ratio=ratio)
        else:
            model = ModelOptions(mirrors="hv", coreset_ratio=ratio)
    elif label == "no_prior":
        model = ModelOptions(position_prior="off")
    elif label in ("nbhd1", "nbhd5"):  # the patch features' neighbourhood: none (1 x 1) or 5 x 5, not 3 x 3
        model = ModelOptions(neighbourhood=int(label[-1]))
    elif label == "search":
        train = TrainOptions(device=a.device, search_settings="on")
    elif label in ("stpm", "stpm_cf"):
        model = ModelOptions(method="stpm", student_backbone="resnet18", image_size=a.image_size)
        train = TrainOptions(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, seed=0, device=a.device)
        if label == "stpm_cf":
            calibration = CalibrationOptions(refit_folds=True)
    elif label not in ("default", "no_search"):
        raise SystemExit(f"unknown config {label!r}: default, no_search, lite2, x2, x2_tile, half, stride4, stride4_bank, mirrors, "
                         "mirrors_bank, no_prior, nbhd1, nbhd5, search, stpm or stpm_cf")
    return TrainingOptions(model=model, train=train, tiling=tiling, calibration=calibration)


SIMD_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")  # what decides a CPU's speed here


def machine_line() -> str:
    from stpm.runtime.cpu import cpu_flags, cpu_name

    flags = " ".join(f for f in SIMD_FLAGS if f in cpu_flags()) or "none of " + " ".join(SIMD_FLAGS)
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (f"{cpu_name()} ({flags}), {os.cpu_count()} cores{gpu}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), load average at start {os.getloadavg()[0]:.1f}")


def score_ms_per_image(bundle_dir: Path, data: Path, device: str) -> float:
    """Median wall ms of the exported scorer (stpm.runtime.Scorer: decode, tiles, stitch, score; no
    heatmap) per test image, over the first 20 test images after one warm-up."""
    import statistics

    from stpm.runtime.scorer import Scorer
    from stpm.training.data import test_samples

    providers = ("CPUExecutionProvider",) if device == "cpu" else ("auto",)
    scorer = Scorer(bundle_dir, providers=providers)
    paths = [s.path for s in test_samples(data)][:20]
    scorer.score([paths[0].read_bytes()])
    times = []
    for p in paths:
        blob = p.read_bytes()
        t0 = time.perf_counter()
        scorer.score([blob])
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def decision_columns(cal: Calibration, labels: np.ndarray, scores: np.ndarray) -> dict:
    """The default threshold's decisions on the labelled test set beside what the calibration states, and
    the other rules recomputed from the same run's recorded held-out scores (max_margin: the former
    default; synthetic_f1): precision, recall, realised FPR on test/good, expected FPR."""
    rules = {"default": cal}
    for rule in ("max_margin", "synthetic_f1"):
        rules[rule] = recalibrate(cal, CalibrationOptions(method=rule), {"kind": "benchmark"})
    n_held = (cal.source or {}).get("n_held_out")
    if n_held is not None:  # cross-fitted: the default rule on the held-out images alone, as before
        rules["held_out_only"] = calibrate(cal.good_scores[:n_held], CalibrationOptions(), cal.synthetic_scores,
                                           cal.synthetic_kinds, {"kind": "benchmark"})
    out = {}
    for rule, c in rules.items():
        at = metrics.at_threshold(labels, scores, c.threshold)
        out[rule] = {"rule": c.method, "threshold": c.threshold, "expected_fpr": c.expected_fpr,
                     "expected_fpr_interval": c.expected_fpr_interval, "n_good_images": c.n_images,
                     "synthetic_recall": (c.synthetic or {}).get("recall"),
                     "n_synthetic": (c.synthetic or {}).get("n_images"), "precision": at["precision"],
                     "recall": at["recall"], "realised_fpr": at["fpr"], "n_test_good": at["fp"] + at["tn"],
                     "n_test_anomalous": at["tp"] + at["fn"], "estimator": c.estimator}
    return out


def redecide(path: Path) -> dict:
    """A decisions result recomputed from each row's recorded raw scores with the current calibration code
    (the raw scores do not depend on the calibration: no training is needed)."""
    res = json.loads(path.read_text())
    for row in res["rows"]:
        s = row["scores"]
        source = {"n_held_out": len(s["val_good"])} if s.get("out_of_fold_good") else None
        cal = calibrate(s["val_good"] + s.get("out_of_fold_good", []), CalibrationOptions(), s["synthetic"],
                        s["synthetic_kinds"], source)
        labels = np.array([d != "good" for d in s["test_defects"]])
        row["decisions"] = decision_columns(cal, labels, np.asarray(s["test_scores"], dtype=float))
    res["redecided"] = ("decisions recomputed from the recorded scores: benchmarks/quality.py --redecide "
                        f"benchmarks/results/{path.name}")
    return res


def scores_record(ds: str, seed: int, cal: Calibration, rep: dict) -> dict:
    """The raw scores calibration and evaluation saw (benchmarks/calibration_estimators.py reads them)."""
    n_held = (cal.source or {}).get("n_held_out", len(cal.good_scores))
    return {"dataset": ds, "seed": seed, "val_good": cal.good_scores[:n_held],
            "out_of_fold_good": cal.good_scores[n_held:], "synthetic": cal.synthetic_scores,
            "synthetic_kinds": cal.synthetic_kinds, "test_scores": [r["raw_score"] for r in rep["per_image"]],
            "test_defects": [r["defect"] for r in rep["per_image"]]}


def run_configs(a: argparse.Namespace) -> int:
    from stpm.methods.loading import load_map

    device = torch.device(a.device)
    out_path = Path(a.out if a.out != str(ROOT / "benchmarks" / "results" / "quality.json")
                    else ROOT / "benchmarks" / "results" / "quality_methods.json")
    machine = machine_line()
    rows = []
    models_dir = Path(tempfile.mkdtemp(prefix="stpm-quality-"))
    for ds in a.datasets.split(","):
        for label in a.configs.split(","):
            options = config_of(label, a)
            name = f"{ds}-{label}"
            t0 = time.monotonic()
            out = run_training(DATASETS[ds], name, models_dir, options, export=True, show_bar=True)
            train_s = time.monotonic() - t0
            model, manifest = load_map(out.path)
            rep = evaluate(model, manifest, DATASETS[ds], device, Path(a.report_dir) / name)
            o = rep["metrics"]["overall"]
            m = manifest.model
            row = {
                "dataset": ds, "config": label, "method": m.method, "teacher": m.backbone,
                "student": getattr(m, "student_backbone", None), "epochs": options.train.epochs if m.method == "stpm" else None,
                "sigma": m.sigma, "image_score": m.image_score,
                "selection": manifest.training.get("selection"), "settings": manifest.training.get("settings"),
                "image_auroc": o["image_auroc"], "pixel_auroc": o["pixel_auroc"], "aupro": o["aupro_0.3"],
                "f1_max": o.get("image_f1_max"), "calibrated": o.get("at_calibrated_threshold"),
                "decisions": decision_columns(manifest.calibration,
                                              np.array([r["defect"] != "good" for r in rep["per_image"]]),
                                              np.array([r["raw_score"] for r in rep["per_image"]])),
                "scores": scores_record(ds, options.train.seed, manifest.calibration, rep),
                "train_s": train_s, "fit_s": out.fitted.seconds,
                "score_ms_per_image": score_ms_per_image(out.path, DATASETS[ds], a.device),
                "n_train": manifest.data["n_train"], "n_test": len(rep["per_image"]),
            }
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("selection", "scores")}, indent=1), flush=True)
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps({"command": " ".join(["benchmarks/quality.py", *sys.argv[1:]]),
                                            "machine": machine, "rows": rows}, indent=2))
    from benchmarks import report
    from benchmarks.report_quality import decisions_markdown, methods_markdown

    res = json.loads(out_path.read_text())
    print(methods_markdown(res))
    print(decisions_markdown(res))
    report.publish(out_path, res)  # the block of a result file the docs cite (a scratch run to /tmp: none)
    return 0


if __name__ == "__main__":
    sys.exit(main())
