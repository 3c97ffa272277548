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
from stpm.bundle.manifest import Manifest
from stpm.methods.maps import MapModule, tile_fn


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
        "tiling": geometry.to_dict(), "image_score": spec.method, "threshold": cal.threshold, "metrics": m,
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
