"""PatchCore's memory-bank size against quality (issue 26): per shared set, the default trained once, then banks
of several sizes built from the SAME patch features with the same seed, each evaluated on the full labelled
test set with the default's geometry, sigma and image score (the torch map, stpm.evaluation):

    nice -n 19 .venv/bin/python benchmarks/bank_size.py --bundles /tmp/bank-bundles

Per set and bank: image / pixel AUROC, AUPRO, the coreset seconds and rows; and the decision threshold
recalibrated for that bank as training would (stpm.training.pipeline.choose_and_calibrate, with the default's
sigma and image score fixed) with the test set's recall and FPR there. The patch features are the ones
`run_training` fits on: captured where the method hands them to `fit_bank`. With --bundles, the bottle banks
are also published as exported bundles (the pipeline's `publish`) for benchmarks/bank_speed.py.
Writes benchmarks/results/bank_size.json (--out) and rewrites its block of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.peer import cpu_info  # noqa: E402
from benchmarks.quality import DATASETS  # noqa: E402
from stpm.evaluation import metrics  # noqa: E402
from stpm.evaluation.report import evaluate  # noqa: E402
from stpm.methods.patchcore import method as patchcore_method  # noqa: E402
from stpm.methods.patchcore.anomaly_map import PatchCoreMap  # noqa: E402
from stpm.methods.patchcore.coreset import bank_rows, fit_bank  # noqa: E402
from stpm.training.crossfit import fold_labels  # noqa: E402
from stpm.options import TrainingOptions, TrainOptions  # noqa: E402
from stpm.training.pipeline import choose_and_calibrate, load_good_images, publish, run_training  # noqa: E402
from stpm.training.reproducible import reproducible  # noqa: E402

TODAY = "cap 16384 (today)"


@contextlib.contextmanager
def captured_patches() -> Iterator[list[torch.Tensor]]:
    """While open, every patch-feature matrix PatchCore's fit hands to `fit_bank` is kept (in order)."""
    seen: list[torch.Tensor] = []
    original = patchcore_method.fit_bank

    def recording(patches: torch.Tensor, bank_size: int, seed: int = 0, groups: torch.Tensor | None = None):
        seen.append(patches)
        return original(patches, bank_size, seed=seed, groups=groups)

    patchcore_method.fit_bank = recording
    try:
        yield seen
    finally:
        patchcore_method.fit_bank = original


def variants(n_patches: int, caps: list[int]) -> dict[str, int]:
    """label -> bank rows: today's rule (bank_rows: 10 % of the patches, at least MIN_BANK) at each cap, and
    the paper's 1 % ratio under the same rule (uncapped)."""
    out = {(TODAY if cap == 16384 else f"cap {cap}"): bank_rows(n_patches, 0.1, cap) for cap in caps}
    out["ratio 0.01 (paper)"] = bank_rows(n_patches, 0.01, 1_000_000)
    return out


def recalibrated(amap: PatchCoreMap, trained, images, config: TrainingOptions, cfg):
    """The threshold training would set for this bank: selection (sigma, image score fixed to the default's
    choice) and calibration on the held-out good images, as run_training does."""
    device = torch.device("cpu")
    fitted = dataclasses.replace(trained.fitted, amap=amap)
    with reproducible(config.train.seed, device):
        _, _, cal, _ = choose_and_calibrate(fitted, device, images, images.val_images(), cfg, config)
    return cal


def measure(name: str, rows: int, patches: torch.Tensor, trained, manifest, images, config, cfg) -> tuple[dict[str, Any], PatchCoreMap, Any]:
    """One bank: coreset, full test-set evaluation, recalibrated threshold."""
    t0 = time.monotonic()
    bank, _ = fit_bank(patches, rows, seed=config.train.seed)  # one coreset over all patches (no folds)
    coreset_s = time.monotonic() - t0
    amap = PatchCoreMap(trained.fitted.amap.features, bank, float(cfg.sigma)).eval()
    rep = evaluate(amap, manifest, DATASETS[name], torch.device("cpu"), None, progress=False)
    o = rep["metrics"]["overall"]
    cal = recalibrated(amap, trained, images, config, cfg)
    labels = np.array([r["defect"] != "good" for r in rep["per_image"]])
    raw = np.array([r["raw_score"] for r in rep["per_image"]])
    at = metrics.at_threshold(labels, raw, cal.threshold)
    return {"bank_rows": int(len(bank)), "requested_rows": rows, "coreset_s": round(coreset_s, 2),
            "image_auroc": o["image_auroc"], "pixel_auroc": o["pixel_auroc"], "aupro": o["aupro_0.3"],
            "threshold": cal.threshold, "recall": at["recall"], "fpr_test_good": at["fpr"],
            "precision": at["precision"], "load_average": round(os.getloadavg()[0], 2)}, amap, cal


def export_variant(models_dir: Path, label: str, rows: int, amap, cal, trained, manifest, images) -> str:
    """A bottle bundle with this bank (the default's manifest, this bank's calibration), exported by the
    pipeline's publish; -> its path."""
    raw = manifest.to_dict()
    raw.update(name=f"bottle-bank{rows}", version=None, files={}, calibration=cal.to_dict())
    raw.pop("exports", None)
    raw["model"] = {**raw["model"], "bank_size": rows}
    raw["training"] = {**raw["training"], "bank_variant": label}
    raw["training"]["patchcore"] = {**raw["training"].get("patchcore", {}), "bank_size": int(len(amap.bank))}
    fitted = dataclasses.replace(trained.fitted, amap=amap)
    _, path = publish(models_dir, fitted, raw, images.val_images()[:8], True, None)
    return str(path)


def from_bundle(name: str, bundle: Path, config: TrainingOptions):
    """A default bundle trained earlier on `name` (e.g. by a run that was stopped) and the patch features its fit
    saw, recomputed by PatchCore's own feature step on the same training tiles with the bundle's teacher."""
    from stpm.methods.base import FitData, FitRun, Fitted
    from stpm.methods.loading import load_map, model_options

    amap, manifest = load_map(bundle)
    images = load_good_images(DATASETS[name], config, False)
    folds = fold_labels(len(images.train_idx), config.calibration.folds, config.train.seed)  # as training did
    data = FitData(images.train, images.val, config.train.seed, torch.Generator(), folds)
    collected = patchcore_method._features(amap.features, data, FitRun(torch.device("cpu"), show_bar=False),
                                           config.train.batch_size)
    m = model_options(manifest)
    groups, patches = patchcore_method._patch_folds(data, collected), collected.features
    rebuilt, _ = fit_bank(patches, bank_rows(len(patches), m.coreset_ratio, m.bank_size), config.train.seed, groups)
    same = torch.equal(rebuilt, amap.bank)
    if not same:
        raise SystemExit(f"{bundle}: the recomputed patch features do not rebuild the bundle's bank")
    fitted = Fitted(amap, str(manifest.teacher_weights_source), {})
    return SimpleNamespace(path=bundle, fitted=fitted), patches


def run_set(name: str, caps: list[int], work: Path, bundles: Path | None, bundle: Path | None = None) -> dict[str, Any]:
    """Train the default once on `name` (or take `bundle`), then measure every bank variant from the same features."""
    from stpm.methods.loading import load_map, model_options

    # the default scale, as when the recorded results were measured (the settings search would train bottle and
    # metal plate at 2x if it won there: another bank study)
    config = TrainingOptions(train=TrainOptions(device="cpu", search_settings="off"))
    t0 = time.monotonic()
    if bundle is not None:
        trained, patches = from_bundle(name, bundle, config)
    else:
        with captured_patches() as seen:
            trained = run_training(DATASETS[name], name, work, config, export=False, show_bar=False)
        patches = seen[-1]
    train_s = time.monotonic() - t0
    _, manifest = load_map(trained.path)
    cfg = model_options(manifest)  # the default as trained: sigma and image score as selection chose them
    images = load_good_images(DATASETS[name], config, False)
    out: dict[str, Any] = {"n_patches": int(len(patches)), "feature_dim": int(patches.shape[1]),
                           "train_s": round(train_s, 1), "sigma": manifest.model.sigma,
                           "image_score": manifest.model.image_score, "bundle_threshold": manifest.calibration.threshold,
                           "banks": {}}
    done: dict[int, str] = {}
    for label, rows in variants(len(patches), caps).items():
        if rows in done:  # e.g. the 1 % ratio floored at MIN_BANK: the same bank as a cap already measured
            out["banks"][label] = {**out["banks"][done[rows]], "same_bank_as": done[rows]}
            continue
        done[rows] = label
        row, amap, cal = measure(name, rows, patches, trained, manifest, images, config, cfg)
        if len(amap.bank) == len(trained.fitted.amap.bank):  # the default's own bank, rebuilt: it must be equal
            row["same_as_trained_bank"] = bool(torch.equal(amap.bank, trained.fitted.amap.bank.float()))
        if bundles is not None and name == "bottle":
            row["bundle"] = export_variant(bundles, label, rows, amap, cal, trained, manifest, images)
        out["banks"][label] = row
        print(name, label, json.dumps(row), flush=True)
    return out


def merge(parts: list[Path], out: Path) -> int:
    """One result from runs that measured different sets (each keeps its own command and load averages)."""
    runs = [json.loads(p.read_text()) for p in parts]
    res = {**runs[0], "command": " ; ".join(r["command"] for r in runs), "sets": {}}
    res["load_average_start"] = max((r["load_average_start"] for r in runs), key=lambda x: x[0])
    res["load_average_end"] = max((r["load_average_end"] for r in runs), key=lambda x: x[0])
    for r in runs:  # a set measured by several runs (one stopped, one --from-bundle): its banks merged
        for name, s in r["sets"].items():
            banks = {k: {**b, "command": r["command"]} for k, b in s.get("banks", {}).items()}
            old = res["sets"].get(name, {})
            res["sets"][name] = {**old, **s, "banks": {**old.get("banks", {}), **banks}}
    out.write_text(json.dumps(res, indent=1) + "\n")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", default="bottle,metal_plate,kolektorsdd")
    ap.add_argument("--caps", default="16384,8192,4096,2048")
    ap.add_argument("--bundles", default=None, help="publish the bottle banks as exported bundles here")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bank_size.json"))
    ap.add_argument("--from-bundle", default=None, metavar="BUNDLE",
                    help="one set (--datasets): a default bundle trained on it earlier instead of training now")
    ap.add_argument("--merge", nargs="+", default=None, metavar="RESULT",
                    help="no run: the union of the sets of these result files (runs split across processes) -> --out")
    a = ap.parse_args()
    if a.merge:
        return merge([Path(p) for p in a.merge], Path(a.out))
    caps = [int(c) for c in a.caps.split(",")]
    work = Path(tempfile.mkdtemp(prefix="stpm-bank-"))
    res: dict[str, Any] = {"command": " ".join(["benchmarks/bank_size.py", *sys.argv[1:]]), "cpu": cpu_info(),
                           "torch": f"{torch.__version__} ({torch.get_num_threads()} threads)",
                           "load_average_start": [round(x, 2) for x in os.getloadavg()], "sets": {}}
    for name in a.datasets.split(","):
        res["sets"][name] = run_set(name, caps, work, Path(a.bundles) if a.bundles else None,
                                    Path(a.from_bundle) if a.from_bundle else None)
        if a.from_bundle:
            res["sets"][name]["from_bundle"] = a.from_bundle
        res["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
