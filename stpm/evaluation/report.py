"""Evaluate a model on an MVTec-layout test set: metrics per defect type and overall, plus pictures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from stpm.evaluation import metrics
from stpm.evaluation.pictures import write_html, write_pictures
from stpm.training.data import Sample, load_mask, load_tiled, test_samples
from stpm.imaging.geometry import Geometry, predict_maps
from stpm.imaging.scores import ImageScore, image_scores
from stpm.bundle.calibration import Calibration
from stpm.bundle.manifest import Manifest
from stpm.methods.maps import MapModule, tile_fn
from stpm.options import CalibrationOptions
from stpm.training.calibration import recalibrate

OPERATING_FPRS = (0.005, 0.01, 0.02, 0.05, 0.1)  # the targets `stpm eval` shows beside the bundle's own


def score_samples(
    amap: MapModule, samples: list[Sample], geometry: Geometry, device: torch.device,
    spec: ImageScore = ImageScore(), batch_size: int = 16, progress: bool = True,
) -> dict[str, Any]:
    """Decode, tile, score (`amap`: a map module, stpm.methods), stitch and load masks. -> maps (list of
    float32 [h_i, w_i], each image at the model's scale), scores [N], masks (list of bool [h_i, w_i],
    nearest-resized), labels [N], plans. progress: a tqdm bar over the tiles (on a terminal)."""
    tiled, _, _ = load_tiled([s.path for s in samples], geometry)
    fn = tile_fn(amap.to(device), device)
    with tqdm(total=len(tiled.tiles), desc="eval", unit="tile", disable=None if progress else True) as bar:
        def counted(batch: np.ndarray) -> np.ndarray:
            out = fn(batch)
            bar.update(len(batch))
            return out

        maps = predict_maps(counted, tiled, batch_size)
    masks = [load_mask(s.mask, (p.h, p.w)) for s, p in zip(samples, tiled.plans)]
    labels = np.array([s.label for s in samples])
    return {"maps": maps, "scores": image_scores(maps, spec), "masks": masks, "labels": labels,
            "map_offset": spec.map_offset,
            "plans": tiled.plans}


def compute_metrics(
    labels: np.ndarray, scores: np.ndarray, masks: list[np.ndarray], maps: list[np.ndarray], defects: list[str],
    threshold: float | None,
) -> dict[str, Any]:
    """Overall metrics and one block per defect type (that type against all good images).
    masks / maps: one array per image (any sizes, pairwise equal)."""

    def block(sel: np.ndarray) -> dict[str, Any]:
        idx = np.nonzero(sel)[0]
        y, s = labels[idx], scores[idx]
        ms, mp = [masks[i] for i in idx], [maps[i] for i in idx]
        out: dict[str, Any] = {"n_images": int(idx.size), "n_anomalous": int(y.sum()),
                               "image_auroc": metrics.auroc(y, s)}
        has_masks = any(m.any() for m in ms)
        out["pixel_auroc"] = metrics.auroc(ms, mp) if has_masks else None
        out["aupro_0.3"] = metrics.aupro(ms, mp) if has_masks else None
        if 0 < y.sum() < y.size:
            out["image_f1_max"], out["f1_max_threshold"] = metrics.f1_max(y, s)
        if threshold is not None:
            out["at_calibrated_threshold"] = metrics.at_threshold(y, s, threshold)
        return out

    good = labels == 0
    report = {"overall": block(np.ones_like(labels, dtype=bool)), "per_defect": {}}
    for d in sorted(set(defects) - {"good"}):
        report["per_defect"][d] = block(good | (np.array(defects) == d))
    return report


def decision(cal: Calibration, overall: dict[str, Any]) -> dict[str, Any]:
    """What the calibration promised beside what the labelled test set shows at its threshold: the
    realised false-positive rate on test/good, precision and recall, and the counts they come from."""
    at = overall.get("at_calibrated_threshold") or {}
    n_good = at.get("fp", 0) + at.get("tn", 0)
    realised = {"fpr_on_test_good": at.get("fpr") if n_good else None, "n_test_good": n_good,
                "precision": at.get("precision"), "recall": at.get("recall"),
                "n_test_anomalous": at.get("tp", 0) + at.get("fn", 0)}
    f1_thr = overall.get("f1_max_threshold")
    return {"expected": cal.expectation(), "realised": realised,
            "f1_max": overall.get("image_f1_max"), "f1_max_threshold": f1_thr}


def operating_points(cal: Calibration, labels: np.ndarray, scores: np.ndarray,
                     targets: tuple[float, ...] = OPERATING_FPRS) -> list[dict[str, Any]]:
    """For each target false-positive rate T: the threshold `stpm calibrate MODEL --target-fpr T` would
    set from the scores the bundle's calibration recorded (no retraining, the default rule), what that
    calibration expects, and what this labelled test set shows at it. `current`: the row whose rule and
    target are the bundle's own. Empty where the calibration records no scores (bundles before them)."""
    if not cal.good_scores:
        return []
    own = (cal.target_fpr,) if cal.method == "target_fpr" and cal.target_fpr is not None else ()
    rows = []
    for t in sorted({*targets, *own}):
        c = recalibrate(cal, CalibrationOptions(method="target_fpr", target_fpr=t), {"kind": "eval"})
        at = metrics.at_threshold(labels, scores, c.threshold)
        n_good = at["fp"] + at["tn"]
        rows.append({"target_fpr": t, "threshold": c.threshold, "expected_fpr": c.expected_fpr,
                     "expected_fpr_interval": c.expected_fpr_interval,
                     "synthetic_recall": (c.synthetic or {}).get("recall"),
                     "fpr_on_test_good": at["fpr"] if n_good else None, "n_flagged_good": at["fp"],
                     "precision": at["precision"] if at["tp"] + at["fp"] else None,
                     "recall": at["recall"] if at["tp"] + at["fn"] else None,
                     "current": t in own})
    return rows


def format_operating_points(points: list[dict[str, Any]]) -> str:
    """operating_points as a text table for the terminal ("*" marks the model's own row)."""
    if not points:
        return ""

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f} %"

    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    lines = ["other operating points (stpm calibrate MODEL --target-fpr T; no retraining):",
             f"  {'T':>8} {'threshold':>10} {'expected FPR':>13} {'FPR test/good':>14} {'precision':>10} {'recall':>7}"]
    for p in points:
        lines.append(f"{'*' if p['current'] else ' '} {pct(p['target_fpr']):>8} {p['threshold']:>10.4g} "
                     f"{pct(p['expected_fpr']):>13} {pct(p['fpr_on_test_good']):>14} {num(p['precision']):>10} "
                     f"{num(p['recall']):>7}")
    return "\n".join(lines)


def evaluate(
    amap: MapModule, manifest: Manifest, data: str | Path, device: torch.device, out_dir: str | Path | None,
    progress: bool = True,
) -> dict[str, Any]:
    """Full evaluation of a bundle's model on `data` (MVTec layout); writes report.json + pictures (into
    out_dir, never into the bundle). `amap`: its map module (stpm.methods.loading.load_map). progress: a
    tqdm bar (on a terminal)."""
    cal = manifest.calibration
    geometry, spec = manifest.geometry, manifest.image_score
    samples = test_samples(data)
    result = score_samples(amap, samples, geometry, device, spec, progress=progress)
    m = compute_metrics(result["labels"], result["scores"], result["masks"], result["maps"],
                        [s.defect for s in samples], cal.threshold)
    report: dict[str, Any] = {
        "model": manifest.ref, "data": str(data), "image_size": manifest.model.image_size,
        "tiling": geometry.to_dict(), "image_score": spec.method,
        "position_prior": None if spec.prior is None else list(spec.prior.grid),  # discounted from the image score
        "threshold": cal.threshold, "metrics": m,
        "decision": {**decision(cal, m["overall"]),
                     "operating_points": operating_points(cal, result["labels"], result["scores"])},
        "per_image": [{"file": str(s.path), "defect": s.defect, "raw_score": float(sc),
                       "score": float(cal.normalise(sc)), "tiles": p.n_tiles, "scaled_size": [p.h, p.w]}
                      for s, sc, p in zip(samples, result["scores"], result["plans"])],
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        report["pictures"] = write_pictures(out, result, samples, cal)
        (out / "report.json").write_text(json.dumps(report, indent=2))
        write_html(out, report, report["pictures"])
    return report
