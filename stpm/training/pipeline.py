"""The whole training job: data -> fit -> calibrate on held-out good images -> (export) -> publish.

Shared by `stpm train` and the service's training worker, so both produce identical bundles.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn
from torch.utils.data import DataLoader

from stpm.training.calibration import Calibration, calibrate
from stpm.options import CalibrationOptions, ModelOptions, TilingOptions, TrainOptions, TrainingOptions, to_dict
from stpm.methods.stpm.dataset import ImageArrayDataset
from stpm.training.data import fingerprint, good_train_dir, list_images, load_training_tiles
from stpm.imaging.decode import read_image
from stpm.methods.stpm.model import STPM, build_stpm
from stpm.training.publish import build_manifest, publish_model
from stpm.methods.maps import STPMMap, resolved, tile_fn
from stpm.training.selection import AUTO, select
from stpm.imaging.scores import ImageScore, image_scores
from stpm.methods.stpm.trainer import (
    FitResult,
    ProgressFn,
    TrainingStopped,
    fit,
    resolve_device,
    reproducible,
    split_indices,
)

log = logging.getLogger("stpm.pipeline")
MIN_GOOD_IMAGES = 3


@dataclass
class TrainOutcome:
    version: str | None  # None when interrupted before publishing
    path: Path | None
    fit: FitResult
    calibration: Calibration | None
    skipped: list[tuple[Path, str]]
    model: nn.Module | None = None  # the trained model as it is in memory (STPM or PatchCoreMap; on CPU once published)


def run_training(
    data: str | Path | list[Path],
    name: str,
    models_dir: str | Path,
    config: TrainingOptions = TrainingOptions(),
    *,
    run_dir: str | Path | None = None,
    weights_dir: str | Path | None = None,
    skip_bad: bool = False,
    resume: bool = False,
    export: bool = True,
    progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
    show_bar: bool = True,
) -> TrainOutcome:
    """`train_and_publish` with one TrainingOptions: what `stpm train`, the training worker and
    `stpm.train` call. A new config section is passed on here."""
    return train_and_publish(data, name, models_dir, config.model, config.train, config.calibration, config.tiling,
                             run_dir, weights_dir, skip_bad, resume, export, progress, should_stop, show_bar)


def train_and_publish(
    data: str | Path | list[Path],
    name: str,
    models_dir: str | Path,
    model_cfg: ModelOptions = ModelOptions(),
    train_cfg: TrainOptions = TrainOptions(),
    calib_cfg: CalibrationOptions = CalibrationOptions(),
    tiling_cfg: TilingOptions = TilingOptions(),
    run_dir: str | Path | None = None,
    weights_dir: str | Path | None = None,
    skip_bad: bool = False,
    resume: bool = False,
    export: bool = True,
    progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
    show_bar: bool = True,
) -> TrainOutcome:
    """Fit on the good images in `data` (a folder, MVTec category, or a list of files) and publish.

    Both methods see the tiles of the training images (stpm.tiling, geometry from tiling_cfg): STPM's
    student learns on them (validation loss on the held-out images' tiles), PatchCore keeps a coreset
    of their patch features. Then the map smoothing and image score left open are chosen on synthetic
    anomalies of the held-out good images (stpm.selection), and the threshold is calibrated on their
    stitched per-image scores, computed as the runtime computes them."""
    from stpm.bundle.store import check_name

    check_name(name)
    model_cfg = resolved(model_cfg)  # method defaults (layers) made explicit, validated before any work
    if model_cfg.image_score != AUTO:
        ImageScore(model_cfg.image_score, model_cfg.topk)  # validated before any work
    paths = list(data) if isinstance(data, list) else list_images(good_train_dir(data))
    if len(paths) < MIN_GOOD_IMAGES:
        raise ValueError(f"{len(paths)} good image(s) found; at least {MIN_GOOD_IMAGES} are needed")
    tiled, geometry, paths, skipped, sizes = load_training_tiles(paths, model_cfg.image_size, tiling_cfg, skip_bad)
    for p, reason in skipped:
        log.warning("skipped %s: %s", p, reason)
    train_idx, val_idx = split_indices(len(paths), train_cfg.val_fraction, train_cfg.seed)
    train_set, val_set = tiled.subset(train_idx), tiled.subset(val_idx)
    del tiled
    n_train_tiles = len(train_set.tiles)
    log.info("geometry %s: %d training tiles from %d images, %d validation tiles from %d images",
             geometry, len(train_set.tiles), len(train_idx), len(val_set.tiles), len(val_idx))
    device = resolve_device(train_cfg.device)
    method_info: dict[str, Any] = {}
    with reproducible(train_cfg.seed, device) as gen:  # seeded; the caller's RNGs and settings come back after
        if model_cfg.method == "patchcore":
            from stpm.methods.patchcore import model as patchcore

            t0 = time.monotonic()
            amap, teacher_source, method_info = patchcore.fit(
                model_cfg, train_set.tiles, device, weights_dir, train_cfg.seed, train_cfg.batch_size, progress,
                should_stop, show_bar)
            result = FitResult(best_epoch=0, best_val_loss=float("nan"), epochs_run=0,
                               seconds=time.monotonic() - t0)
            trained: nn.Module = amap
        else:
            model, teacher_source = build_stpm(model_cfg, weights_dir, seed=train_cfg.seed)
            train_loader = DataLoader(
                ImageArrayDataset(train_set.tiles, augment=train_cfg.augment), batch_size=train_cfg.batch_size,
                shuffle=True, drop_last=n_train_tiles > train_cfg.batch_size, generator=gen,
                num_workers=train_cfg.num_workers,
            )
            val_loader = DataLoader(ImageArrayDataset(val_set.tiles), batch_size=train_cfg.batch_size)
            checkpoint = None
            if run_dir is not None:
                Path(run_dir).mkdir(parents=True, exist_ok=True)
                checkpoint = Path(run_dir) / "checkpoint.pt"
            result = fit(model, train_loader, val_loader, train_cfg, device, checkpoint, resume, progress,
                         should_stop, show_bar)
            if result.interrupted:
                return TrainOutcome(None, None, result, None, skipped)
            amap, trained = STPMMap(model, model_cfg.combine, float(model_cfg.sigma or 0.0)), model

        if progress is not None:
            progress({"phase": "selection and calibration", "epoch": result.epochs_run, "epochs": result.epochs_run})
        amap.to(device)
        val_images = [read_image(paths[i]) for i in val_idx]
        chosen = select(amap, lambda m: tile_fn(m, device), val_set, val_images, geometry, model_cfg,
                        train_cfg.seed, train_cfg.batch_size)
        model_cfg = replace(model_cfg, sigma=chosen.chosen.sigma, image_score=chosen.chosen.image_score)
        spec = ImageScore(model_cfg.image_score, model_cfg.topk)
        cal = calibrate(image_scores(chosen.good_maps, spec), calib_cfg)
        training: dict[str, Any] = {
            "config": to_dict(train_cfg), "calibration_config": to_dict(calib_cfg),
            "tiling_config": to_dict(tiling_cfg),
            "epochs_run": result.epochs_run, "best_epoch": result.best_epoch,
            "best_val_loss": result.best_val_loss if model_cfg.method == "stpm" else None,
            "stopped_early": result.stopped_early, "seconds": round(result.seconds, 2),
            "history": result.history, "device": str(device),
        }
        if method_info:
            training[model_cfg.method] = method_info
        training["selection"] = chosen.report
        short = sorted(min(h, w) for h, w in sizes)
        data_info = {
            "source": str(data) if not isinstance(data, list) else f"{len(paths)} uploaded files",
            "fingerprint": fingerprint(paths), "n_images": len(paths), "n_train": len(train_idx),
            "n_val": len(val_idx), "skipped": [str(p) for p, _ in skipped],
            "val_files": [paths[i].name for i in val_idx],
            "short_side_px": {"min": short[0], "median": float(np.median(short)), "max": short[-1]},
            "n_train_tiles": n_train_tiles, "n_val_tiles": len(val_set.tiles),
        }
        manifest = build_manifest(name, model_cfg, cal, teacher_source, training, data_info, geometry)
        check_images = val_images[:8]  # real images for the ONNX parity check

        def before_publish(staging: Path) -> None:
            if export:
                from stpm.export.onnx import export_bundle

                export_bundle(staging, check_images=check_images)
            if should_stop is not None and should_stop():  # last chance to cancel: nothing is visible yet
                raise TrainingStopped("stop requested before publishing")

        t0 = time.monotonic()
        version, path = publish_model(models_dir, trained, manifest, before_publish)
        log.info("published %s/%s in %.1fs", name, version, time.monotonic() - t0)
        return TrainOutcome(version, path, result, cal, skipped, trained)
