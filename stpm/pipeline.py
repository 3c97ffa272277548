"""The whole training job: data -> fit -> calibrate on held-out good images -> (export) -> publish.

Shared by `stpm train` and the service's training worker, so both produce identical bundles.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from stpm.calibrate import Calibration, calibrate
from stpm.config import CalibrationConfig, ModelConfig, TrainConfig, to_dict
from stpm.data import ImageArrayDataset, fingerprint, good_train_dir, list_images, load_images, to_tensor
from stpm.model import build_stpm
from stpm.publish import build_manifest, publish_model
from stpm.train import (
    FitResult,
    ProgressFn,
    TrainingStopped,
    fit,
    predict,
    resolve_device,
    seed_everything,
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


def train_and_publish(
    data: str | Path | list[Path],
    name: str,
    models_dir: str | Path,
    model_cfg: ModelConfig = ModelConfig(),
    train_cfg: TrainConfig = TrainConfig(),
    calib_cfg: CalibrationConfig = CalibrationConfig(),
    run_dir: str | Path | None = None,
    weights_dir: str | Path | None = None,
    skip_bad: bool = False,
    resume: bool = False,
    export: bool = True,
    progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
    show_bar: bool = True,
) -> TrainOutcome:
    """Train on the good images in `data` (a folder, MVTec category, or a list of files) and publish."""
    from stpm.bundle import check_name

    check_name(name)
    paths = list(data) if isinstance(data, list) else list_images(good_train_dir(data))
    if len(paths) < MIN_GOOD_IMAGES:
        raise ValueError(f"{len(paths)} good image(s) found; at least {MIN_GOOD_IMAGES} are needed")
    images, paths, skipped = load_images(paths, model_cfg.image_size, skip_bad)
    for p, reason in skipped:
        log.warning("skipped %s: %s", p, reason)
    train_idx, val_idx = split_indices(len(paths), train_cfg.val_fraction, train_cfg.seed)
    gen = seed_everything(train_cfg.seed)
    device = resolve_device(train_cfg.device)
    if device.type == "cpu":
        import torch

        torch.use_deterministic_algorithms(True, warn_only=True)
    model, teacher_source = build_stpm(model_cfg, weights_dir, seed=train_cfg.seed)
    train_loader = DataLoader(
        ImageArrayDataset(images[train_idx], augment=train_cfg.augment), batch_size=train_cfg.batch_size,
        shuffle=True, drop_last=len(train_idx) > train_cfg.batch_size, generator=gen,
        num_workers=train_cfg.num_workers,
    )
    val_loader = DataLoader(ImageArrayDataset(images[val_idx]), batch_size=train_cfg.batch_size)
    checkpoint = None
    if run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        checkpoint = Path(run_dir) / "checkpoint.pt"
    result = fit(model, train_loader, val_loader, train_cfg, device, checkpoint, resume, progress, should_stop,
                 show_bar)
    if result.interrupted:
        return TrainOutcome(None, None, result, None, skipped)

    _, val_scores = predict(model, to_tensor(images[val_idx]), device, model_cfg.combine, model_cfg.sigma)
    cal = calibrate(val_scores, calib_cfg)
    training: dict[str, Any] = {
        "config": to_dict(train_cfg), "calibration_config": to_dict(calib_cfg),
        "epochs_run": result.epochs_run, "best_epoch": result.best_epoch, "best_val_loss": result.best_val_loss,
        "stopped_early": result.stopped_early, "seconds": round(result.seconds, 2),
        "history": result.history, "device": str(device),
    }
    data_info = {
        "source": str(data) if not isinstance(data, list) else f"{len(paths)} uploaded files",
        "fingerprint": fingerprint(paths), "n_images": len(paths), "n_train": len(train_idx),
        "n_val": len(val_idx), "skipped": [str(p) for p, _ in skipped],
        "val_files": [paths[i].name for i in val_idx],
    }
    manifest = build_manifest(name, model_cfg, cal, teacher_source, training, data_info)
    check_images = [images[i] for i in val_idx[:8]]  # real images for the ONNX parity check

    def before_publish(staging: Path) -> None:
        if export:
            from stpm.export import export_bundle

            export_bundle(staging, check_images=check_images)
        if should_stop is not None and should_stop():  # last chance to cancel: nothing is visible yet
            raise TrainingStopped("stop requested before publishing")

    t0 = time.monotonic()
    version, path = publish_model(models_dir, model, manifest, before_publish)
    log.info("published %s/%s in %.1fs", name, version, time.monotonic() - t0)
    return TrainOutcome(version, path, result, cal, skipped)

