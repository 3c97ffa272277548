"""The whole training job: good images -> tiles -> method.fit -> model selection on synthetic anomalies ->
the position prior (from the training images scored out of fold) -> calibration on held-out good images and
those out-of-fold scores -> (ONNX export) -> an atomically published bundle version.

Shared by `stpm train`, `stpm.train` and the service's training worker, so all produce identical bundles.
Each step is a function below; `run_training` reads top to bottom.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stpm.bundle import check_name, fingerprint
from stpm.bundle.calibration import Calibration
from stpm.imaging.decode import read_image
from stpm.imaging.geometry import Geometry, TiledImages
from stpm.imaging.scores import ImageScore, image_scores
from stpm.methods import registry
from stpm.methods.base import FitData, FitRun, Fitted, ProgressFn, TrainingStopped
from stpm.methods.maps import MapModule
from stpm.options import AUTO, ModelOptions, TrainingOptions, to_dict, updated
from stpm.training import position_prior, settings
from stpm.training.calibration import calibrate
from stpm.training.crossfit import fold_labels, out_of_fold_scores
from stpm.training.data import good_train_dir, list_images, load_training_tiles
from stpm.training.publish import build_manifest, publish_model
from stpm.training.reproducible import reproducible, resolve_device, split_indices
from stpm.training.selection import PER_IMAGE, Selection, select

log = logging.getLogger("stpm.training")
MIN_GOOD_IMAGES = 3
PARITY_IMAGES = 8  # held-out good images the ONNX export checks parity on


@dataclass
class TrainOutcome:
    version: str | None  # None when interrupted before publishing
    path: Path | None
    fitted: Fitted
    calibration: Calibration | None
    skipped: list[tuple[Path, str]]

    @property
    def model(self) -> MapModule:
        """The fitted map module as it is in memory (on the CPU once published)."""
        return self.fitted.amap


@dataclass
class GoodImages:
    """A run's good images: decoded, tiled at the geometry chosen from their sizes, split train/held-out."""

    source: str
    paths: list[Path]
    sizes: list[tuple[int, int]]
    skipped: list[tuple[Path, str]]
    geometry: Geometry
    train_idx: list[int]
    val_idx: list[int]
    train: TiledImages
    val: TiledImages

    def val_images(self) -> list[np.ndarray]:
        return [read_image(self.paths[i]) for i in self.val_idx]


def resolved(cfg: ModelOptions) -> ModelOptions:
    """The method's defaults made explicit and every model option checked, before any work."""
    cfg = registry.spec(cfg.method).resolve(cfg)
    if cfg.image_score != AUTO:
        ImageScore(cfg.image_score, cfg.topk)  # type: ignore[arg-type]
    return cfg


def load_good_images(data: str | Path | list[Path], config: TrainingOptions, skip_bad: bool) -> GoodImages:
    """A folder, an MVTec category or a list of files -> its good images, tiled and split."""
    paths = list(data) if isinstance(data, list) else list_images(good_train_dir(data))
    if len(paths) < MIN_GOOD_IMAGES:
        raise ValueError(f"{len(paths)} good image(s) found; at least {MIN_GOOD_IMAGES} are needed")
    tiled, geometry, paths, skipped, sizes = load_training_tiles(paths, config.model.image_size, config.tiling,
                                                                 skip_bad)
    for p, reason in skipped:
        log.warning("skipped %s: %s", p, reason)
    train_idx, val_idx = split_indices(len(paths), config.train.val_fraction, config.train.seed)
    source = str(data) if not isinstance(data, list) else f"{len(paths)} uploaded files"
    images = GoodImages(source, paths, sizes, skipped, geometry, train_idx, val_idx, tiled.subset(train_idx),
                        tiled.subset(val_idx))
    log.info("geometry %s: %d training tiles from %d images, %d validation tiles from %d images", geometry,
             len(images.train.tiles), len(train_idx), len(images.val.tiles), len(val_idx))
    return images


def choose_settings(data: str | Path | list[Path], images: GoodImages, model_cfg: ModelOptions,
                    config: TrainingOptions, run: FitRun, gen: torch.Generator, skip_bad: bool, started: float):
    """The scale and feature layers the options leave open, chosen on synthetic anomalies (stpm.training.settings;
    `started`: time.monotonic() when the training began, for its whole-training budget);
    -> (config, model_cfg, images at the chosen scale, the report or None when nothing was open)."""
    options = settings.candidates(config, model_cfg, images.geometry, images.sizes, len(images.val_idx))
    if len(options) == 1:
        return config, model_cfg, images, None
    pick = settings.sample_indices(len(images.train_idx), settings.SAMPLE_IMAGES, config.train.seed)
    sample = [read_image(images.paths[images.train_idx[i]]) for i in pick]
    choice = settings.choose(options, sample, images.val_images(), len(images.train_idx), images.geometry, model_cfg,
                             config, run, gen, time.monotonic() - started)
    g = settings.finer(images.geometry, choice.setting.factor)  # the tile grows with the scale
    model_cfg = updated(model_cfg, layers=choice.setting.layers, image_size=g.tile)
    config = config.model_copy(update={
        "model": updated(config.model, layers=choice.setting.layers, image_size=g.tile),
        "tiling": updated(config.tiling, scale=g.scale, max_tiles=g.max_tiles)})
    if choice.setting.factor != 1.0:
        images = load_good_images(data, config, skip_bad)  # tiled again at the chosen scale
    return config, model_cfg, images, choice.report


KEEP_OOF_MAPS_BYTES = 256 << 20  # out-of-fold maps kept for rescoring under a prior (else scored again)


@dataclass
class OutOfFold:
    """The training images' out-of-fold scores, their maps on the position prior's grid, and what
    calibration.source records of them. `maps` holds the stitched maps while they fit KEEP_OOF_MAPS_BYTES."""

    scores: np.ndarray
    grids: np.ndarray
    facts: dict[str, Any]
    maps: list[np.ndarray | None]


def out_of_fold(fitted: Fitted, device: torch.device, images: GoodImages, folds: np.ndarray,
                spec: ImageScore | Callable[[int], ImageScore], config: TrainingOptions, run: FitRun | None,
                grid: tuple[int, int], keep_bytes: int = KEEP_OOF_MAPS_BYTES,
                phase: str = "calibration (out-of-fold scores)") -> OutOfFold:
    """The training images' out-of-fold scores (stpm.training.crossfit), with progress and cancellation;
    their maps reduced to `grid`, and the maps themselves while they fit in `keep_bytes`."""

    def on_fold(done: int, total: int) -> None:
        if run is not None:
            run.check_stop()
            run.report({"phase": phase, "epoch": 1, "epochs": 1, "step": done, "steps": total})

    grids = np.zeros((len(images.train_idx), *grid), dtype=np.float32)
    kept: list[np.ndarray | None] = [None] * len(images.train_idx)
    budget = [keep_bytes]

    def on_maps(idx: np.ndarray, maps: list[np.ndarray]) -> None:
        for i, m in zip(idx, maps):
            grids[i] = position_prior.to_grid(m, grid)
            if budget[0] >= m.nbytes:
                kept[i], budget[0] = m, budget[0] - m.nbytes

    t0 = time.monotonic()
    scores = out_of_fold_scores(fitted, images.train, folds, device, spec, config.train.batch_size, on_fold, on_maps)
    facts = {"images": "held-out good images, and the training images scored out of fold",
             "n_held_out": len(images.val_idx), "n_out_of_fold": len(scores), "folds": int(folds.max()) + 1,
             "seconds": round(time.monotonic() - t0, 2)}
    return OutOfFold(scores, grids, facts, kept)


def rescored_out_of_fold(oof: OutOfFold, fitted: Fitted, device: torch.device, images: GoodImages,
                         folds: np.ndarray, spec: ImageScore, config: TrainingOptions, run: FitRun | None) -> np.ndarray:
    """The out-of-fold scores again, each fold's under the position prior estimated without that fold: from
    the kept maps, or (where they did not all fit in memory) by scoring the folds again."""
    specs = {int(f): ImageScore(spec.method, spec.topk, position_prior.leave_fold_out(oof.grids, folds, int(f)))
             for f in np.unique(folds)}
    if all(m is not None for m in oof.maps):
        return np.array([image_scores([m], specs[int(f)])[0] for m, f in zip(oof.maps, folds)])
    gh, gw = oof.grids.shape[1:]
    return out_of_fold(fitted, device, images, folds, lambda f: specs[f], config, run, (int(gh), int(gw)),
                       keep_bytes=0, phase="calibration (position prior)").scores


def choose_and_calibrate(fitted: Fitted, device: torch.device, images: GoodImages, val_images: list[np.ndarray],
                         model_cfg: ModelOptions, config: TrainingOptions, folds: np.ndarray | None = None,
                         run: FitRun | None = None
                         ) -> tuple[ModelOptions, Selection, Calibration, position_prior.PriorChoice]:
    """Model selection on synthetic anomalies of the held-out good images, then the position prior (from the
    training images' out-of-fold maps, where the method offers them: `folds`, stpm.training.crossfit), then
    the threshold from their scores as the runtime computes them (stitched maps, the chosen image score),
    joined by the out-of-fold scores."""
    chosen = select(fitted.amap.to(device), device, images.val, val_images, images.geometry, model_cfg,
                    config.train.seed, config.train.batch_size)
    model_cfg = updated(model_cfg, sigma=chosen.chosen.sigma, image_score=chosen.chosen.image_score)
    spec = ImageScore(model_cfg.image_score, model_cfg.topk)  # type: ignore[arg-type]
    source = {"kind": "training", "images": "held-out good images of the training data",
              "synthetic": f"{PER_IMAGE} synthetic anomalies of each (model selection's)"}
    oof = None
    if folds is not None and fitted.without_fold is not None:
        grid = position_prior.grid_for([(p.h, p.w) for p in images.train.plans + images.val.plans])
        keep = 0 if model_cfg.position_prior == "off" else KEEP_OOF_MAPS_BYTES  # kept to rescore under a prior
        oof = out_of_fold(fitted, device, images, folds, spec, config, run, grid, keep)
        source.update(oof.facts)
    prior = position_prior.choose(model_cfg.position_prior, None if oof is None else oof.grids, chosen.good_maps,
                                  chosen.synthetic_maps, spec)
    chosen.report["position_prior"] = prior.report
    model_cfg = updated(model_cfg, position_prior="on" if prior.prior is not None else "off")
    scored = ImageScore(spec.method, spec.topk, prior.prior)  # the held-out images': the prior of every fold
    good = image_scores(chosen.good_maps, scored)
    if oof is not None:
        oof_scores = oof.scores if prior.prior is None else rescored_out_of_fold(
            oof, fitted, device, images, folds, spec, config, run)
        good = np.r_[good, oof_scores]
    source["n_images"] = len(good)
    cal = calibrate(good, config.calibration, image_scores(chosen.synthetic_maps, scored), chosen.synthetic_kinds,
                    source)
    return model_cfg, chosen, cal, prior


def training_record(config: TrainingOptions, fitted: Fitted, device: torch.device, chosen: Selection,
                    setting_report: dict[str, Any] | None = None) -> dict[str, Any]:
    """manifest["training"]: the run's settings, what the method reports, model selection's candidates."""
    rec = {"config": to_dict(config.train), "calibration_config": to_dict(config.calibration),
           "tiling_config": to_dict(config.tiling)}
    method_facts = {k: v for k, v in fitted.record.items() if k not in ("history",)}
    rec.update({k: v for k, v in method_facts.items() if not isinstance(v, dict)})
    rec.update(seconds=round(fitted.seconds, 2), history=fitted.record.get("history", []), device=str(device))
    rec.update({k: v for k, v in method_facts.items() if isinstance(v, dict)})  # e.g. "patchcore": {...}
    if setting_report is not None:
        rec["settings"] = setting_report
    rec["selection"] = chosen.report
    return rec


def data_record(images: GoodImages) -> dict[str, Any]:
    """manifest["data"]: which images, how they were split and tiled."""
    short = sorted(min(h, w) for h, w in images.sizes)
    return {
        "source": images.source, "fingerprint": fingerprint(images.paths), "n_images": len(images.paths),
        "n_train": len(images.train_idx), "n_val": len(images.val_idx),
        "skipped": [str(p) for p, _ in images.skipped], "val_files": [images.paths[i].name for i in images.val_idx],
        "short_side_px": {"min": short[0], "median": float(np.median(short)), "max": short[-1]},
        "n_train_tiles": len(images.train.tiles), "n_val_tiles": len(images.val.tiles),
        "n_padded": sum(p.padded for p in images.train.plans + images.val.plans),  # smaller than a tile: padded
    }


def publish(models_dir: str | Path, fitted: Fitted, manifest: dict[str, Any], check_images: list[np.ndarray],
            export: bool, should_stop: Callable[[], bool] | None) -> tuple[str, Path]:
    """Weights + manifest staged, ONNX exported and parity-checked on real images, then published."""

    def before_publish(staging: Path) -> None:
        if export:
            from stpm.export import export_bundle

            export_bundle(staging, check_images=check_images)
        if should_stop is not None and should_stop():  # last chance to cancel: nothing is visible yet
            raise TrainingStopped("stop requested before publishing")

    t0 = time.monotonic()
    version, path = publish_model(models_dir, fitted.amap, manifest, before_publish)
    log.info("published %s/%s in %.1fs", manifest["name"], version, time.monotonic() - t0)
    return version, path


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
    """Fit on the good images in `data` (a folder, MVTec category, or a list of files) and publish the next
    version of `name`. The method sees the training images' tiles; what the options leave open (sigma,
    image score) is chosen on synthetic anomalies of the held-out good images, which then set the
    threshold. -> TrainOutcome (version None when Ctrl-C stopped a training loop: nothing published)."""
    started = time.monotonic()
    check_name(name)
    model_cfg = resolved(config.model)
    images = load_good_images(data, config, skip_bad)
    device = resolve_device(config.train.device)
    run = FitRun(device, weights_dir, Path(run_dir) if run_dir else None, resume, progress, should_stop, show_bar)
    with reproducible(config.train.seed, device) as gen:  # seeded; the caller's RNGs and settings come back after
        config, model_cfg, images, setting_report = choose_settings(data, images, model_cfg, config, run, gen,
                                                                    skip_bad, started)
        folds = fold_labels(len(images.train_idx), config.calibration.folds, config.train.seed)
        data_ = FitData(images.train, images.val, config.train.seed, gen, folds, config.calibration.refit_folds)
        fitted = registry.method(model_cfg.method).fit(model_cfg, config.train, data_, run)
        if fitted.interrupted:
            return TrainOutcome(None, None, fitted, None, images.skipped)
        epochs = fitted.record.get("epochs_run", 0)
        run.report({"phase": "selection and calibration", "epoch": epochs, "epochs": epochs})
        val_images = images.val_images()
        model_cfg, chosen, cal, prior = choose_and_calibrate(fitted, device, images, val_images, model_cfg, config,
                                                             folds, run)
        manifest = build_manifest(name, model_cfg, cal, fitted.teacher_source,
                                  training_record(config, fitted, device, chosen, setting_report),
                                  data_record(images),
                                  images.geometry, prior.prior)
        version, path = publish(models_dir, fitted, manifest, val_images[:PARITY_IMAGES], export, should_stop)
    return TrainOutcome(version, path, fitted, cal, images.skipped)


__all__ = ["MIN_GOOD_IMAGES", "GoodImages", "TrainOutcome", "load_good_images", "resolved", "run_training"]
