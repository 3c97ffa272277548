"""`stpm calibrate`: a new version of a model with only its calibration changed, no retraining.

The scores come from good images the model has not seen (a folder, or an MVTec category's train/good of
another data set), scored by the bundle's own model with one synthetic anomaly each (the recall side),
or from the scores the bundle's calibration recorded (a new rule or target only). The new version gets
the old weights byte for byte, so its maps are the old maps bit for bit; the ONNX graphs are exported
again (the scorer carries the threshold) with their parity check; its calibration records where it came
from (`calibration.source`).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stpm import bundle
from stpm.bundle.calibration import Calibration
from stpm.bundle.manifest import Manifest
from stpm.imaging.decode import read_image
from stpm.imaging.geometry import predict_maps, tile_images
from stpm.imaging.scores import image_scores
from stpm.methods.loading import load_map
from stpm.methods.maps import MapModule, tile_fn
from stpm.options import CalibrationOptions
from stpm.training.calibration import calibrate, recalibrate
from stpm.training.data import good_train_dir, list_images, load_tiled
from stpm.training.reproducible import resolve_device
from stpm.training.synthetic import make_anomalies

log = logging.getLogger("stpm.calibrate")
MAX_SYNTHETIC = 64  # good images that get a synthetic anomaly (as model selection)
PARITY_IMAGES = 8  # of the new images, the export's parity check uses this many


@dataclass
class Recalibrated:
    version: str
    path: Path
    calibration: Calibration
    previous: Calibration


def score_good_images(amap: MapModule, manifest: Manifest, paths: list[Path], device: torch.device, seed: int = 0,
                      batch_size: int = 16) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Good images -> (their scores, their synthetic anomalies' scores, those anomalies' kinds), computed
    as the runtime computes scores (the bundle's geometry and image score)."""
    fn = tile_fn(amap.to(device), device)
    tiled, kept, _ = load_tiled(paths, manifest.geometry)
    good = image_scores(predict_maps(fn, tiled, batch_size), manifest.image_score)
    images = [read_image(p) for p in kept[:MAX_SYNTHETIC]]
    synth = make_anomalies(images, 1, seed=seed)
    bad_maps = predict_maps(fn, tile_images([a for a, _, _ in synth], manifest.geometry), batch_size)
    return good, image_scores(bad_maps, manifest.image_score), [k for _, _, k in synth]


def _new_good_images(data: str | Path, manifest: Manifest) -> list[Path]:
    paths = list_images(good_train_dir(data))
    if not paths:
        raise ValueError(f"{data}: no images")
    if bundle.fingerprint(paths) == manifest.data.get("fingerprint"):
        raise ValueError(f"{data} holds exactly the images {manifest.ref} was trained on: their scores are "
                         "biased low; calibrate on good images the model has not seen")
    return paths


def new_calibration(amap: MapModule, manifest: Manifest, data: str | Path | None, cfg: CalibrationOptions,
                    device: torch.device) -> tuple[Calibration, list[Path]]:
    """The calibration from new good images in `data`, or (data None) from the recorded scores."""
    source: dict[str, Any] = {"kind": "stpm calibrate", "from": manifest.ref, "at": bundle.utc_now()}
    if data is None:
        source.update(images=f"the held-out scores recorded by {manifest.ref}",
                      n_images=len(manifest.calibration.good_scores))
        return recalibrate(manifest.calibration, cfg, source), []
    paths = _new_good_images(data, manifest)
    good, synthetic, kinds = score_good_images(amap, manifest, paths, device)
    source.update(images=str(data), n_images=len(paths), fingerprint=bundle.fingerprint(paths),
                  synthetic=f"one synthetic anomaly of each (at most {MAX_SYNTHETIC})")
    return calibrate(good, cfg, synthetic, kinds, source), paths


def _check_images(manifest: Manifest, new_paths: list[Path]) -> list[np.ndarray] | None:
    """Real images for the export's parity check: the new good images, else the training run's held-out
    images where they are still readable, else None (the export's synthetic check images)."""
    paths = new_paths[:PARITY_IMAGES]
    source = str(manifest.data.get("source") or "")
    if not paths and source and Path(source).is_dir():
        try:
            folder = good_train_dir(source)
            paths = [folder / f for f in manifest.data.get("val_files", [])[:PARITY_IMAGES] if (folder / f).is_file()]
        except (OSError, ValueError):
            paths = []
    return [read_image(p) for p in paths] or None


def calibrate_bundle(models_dir: str | Path, ref: str, data: str | Path | None = None,
                     cfg: CalibrationOptions = CalibrationOptions(), device: str = "auto",
                     activate: bool = False) -> Recalibrated:
    """Publish the next version of `ref`'s name: `ref`'s weights and settings, a new calibration."""
    src = bundle.locate(models_dir, ref)
    amap, manifest = load_map(src)
    cal, new_paths = new_calibration(amap, manifest, data, cfg, resolve_device(device))
    raw = {**manifest.to_dict(), "version": None, "created_at": bundle.utc_now(), "calibration": cal.to_dict()}
    exported = raw.pop("exports", None) is not None
    raw.pop("metrics", None)  # measured at the old threshold
    raw.setdefault("training", {})["calibration_config"] = cfg.model_dump(mode="json")
    Manifest.parse(raw, f"{manifest.name} (new)")
    staging = bundle.new_staging_dir(models_dir, manifest.name)
    try:
        for fname in manifest.files:
            shutil.copy2(src / fname, staging / fname)
        bundle.write_manifest(staging, raw)
        if exported:
            from stpm.export import export_bundle

            export_bundle(staging, check_images=_check_images(manifest, new_paths))
        version, path = bundle.publish(staging, models_dir, manifest.name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if activate:
        bundle.set_active(models_dir, manifest.name, version)
    log.info("published %s/%s: %s's model, threshold %.6g -> %.6g", manifest.name, version, manifest.ref,
             manifest.calibration.threshold, cal.threshold)
    return Recalibrated(version, path, cal, manifest.calibration)


__all__ = ["Recalibrated", "calibrate_bundle", "new_calibration", "score_good_images"]
