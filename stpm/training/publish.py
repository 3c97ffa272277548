"""Assemble a bundle's manifest from a training run and publish the bundle atomically."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stpm import bundle
from stpm.bundle.calibration import Calibration
from stpm.bundle.manifest import Manifest
from stpm.imaging.geometry import Geometry
from stpm.imaging.scores import PositionPrior
from stpm.methods import registry
from stpm.methods.loading import save_map
from stpm.methods.maps import MapModule
from stpm.options import AUTO, ModelOptions, to_dict, updated


def concrete(model_cfg: ModelOptions) -> ModelOptions:
    """What a manifest records: settings model selection left open (sigma None, image score and position prior
    "auto") get the method's defaults (its first candidate sigma, the map maximum, no prior) when no selection
    chose them."""
    if model_cfg.sigma is None:
        model_cfg = updated(model_cfg, sigma=registry.spec(model_cfg.method).default_sigma)
    if model_cfg.image_score == AUTO:
        model_cfg = updated(model_cfg, image_score="max")
    if model_cfg.position_prior == AUTO:
        model_cfg = updated(model_cfg, position_prior="off")
    return model_cfg


def build_manifest(
    name: str,
    model_cfg: ModelOptions,
    calibration: Calibration,
    teacher_source: str,
    training: dict[str, Any],
    data: dict[str, Any],
    geometry: Geometry | None = None,
    position_prior: PositionPrior | None = None,
) -> dict[str, Any]:
    """The manifest of a new bundle (validated as a Manifest). geometry None: squash to model.image_size;
    position_prior: what the image score discounts (stpm.training.position_prior), if anything."""
    model_cfg = concrete(model_cfg)
    geometry = geometry or Geometry.squash(model_cfg.image_size)
    raw = {
        "format_version": bundle.FORMAT_VERSION,
        "name": bundle.check_name(name),
        "version": None,  # set by bundle.publish
        "created_at": bundle.utc_now(),
        "model": to_dict(model_cfg),
        "tiling": geometry.to_dict(),
        "teacher_weights_source": teacher_source,
        "calibration": calibration.to_dict(),
        "training": training,
        "data": data,
        "files": {},
        "library_versions": bundle.library_versions(),
    }
    if position_prior is not None:
        raw["position_prior"] = {**position_prior.to_record(),
                                 "estimate": "the mean of the training images' out-of-fold maps on this grid "
                                             "(training.selection.position_prior)"}
    Manifest.parse(raw, f"{name} (new)")  # every manifest written is one every reader parses
    return raw


def publish_model(
    models_dir: str | Path,
    amap: MapModule,
    manifest: dict[str, Any],
    before_publish: Callable[[Path], None] | None = None,
) -> tuple[str, Path]:
    """Write weights + manifest into a staging folder, run `before_publish(staging)` (e.g. the ONNX
    export with its parity check), then rename into the next version. Nothing is visible until the
    rename; on any error the staging folder is removed. -> (version, bundle path)."""
    name = manifest["name"]
    staging = bundle.new_staging_dir(models_dir, name)
    try:
        manifest = {**manifest, "files": save_map(amap, manifest["model"]["method"], staging)}
        bundle.write_manifest(staging, manifest)
        if before_publish is not None:
            before_publish(staging)
        return bundle.publish(staging, models_dir, name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


__all__ = ["build_manifest", "concrete", "publish_model"]
