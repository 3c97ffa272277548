"""Assemble and atomically publish a bundle from a trained model and its calibration."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from stpm import bundle
from stpm.training.calibration import Calibration
from stpm.options import ModelOptions, to_dict
from torch import nn
from stpm.imaging.geometry import Geometry
from stpm.methods.weights import save_weights


def build_manifest(
    name: str,
    model_cfg: ModelOptions,
    calibration: Calibration,
    teacher_source: str,
    training: dict[str, Any],
    data: dict[str, Any],
    geometry: Geometry | None = None,
) -> dict[str, Any]:
    """The manifest of a new bundle. geometry None: squash to model.image_size (stpm.tiling).

    A manifest holds concrete settings: what training left to stpm.selection (sigma None, image score
    "auto") has been chosen by then; a bundle built by hand without selection gets the method's
    defaults (the first candidate sigma, the maximum as image score)."""
    from dataclasses import replace

    from stpm.training.selection import AUTO, SIGMA_CANDIDATES

    if model_cfg.sigma is None:
        model_cfg = replace(model_cfg, sigma=SIGMA_CANDIDATES[model_cfg.method][0])
    if model_cfg.image_score == AUTO:
        model_cfg = replace(model_cfg, image_score="max")
    if geometry is None:
        geometry = Geometry.squash(model_cfg.image_size)
    if geometry.tile != model_cfg.image_size:
        raise ValueError(f"geometry tile {geometry.tile} differs from image_size {model_cfg.image_size}")
    return {
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


def publish_model(
    models_dir: str | Path,
    model: nn.Module,
    manifest: dict[str, Any],
    before_publish: Callable[[Path], None] | None = None,
) -> tuple[str, Path]:
    """Write weights + manifest into a staging folder, run `before_publish(staging)` (e.g. the ONNX
    export with its parity check), then rename into the next version. Nothing is visible until the
    rename; on any error the staging folder is removed. -> (version, bundle path)."""
    import shutil

    name = manifest["name"]
    staging = bundle.new_staging_dir(models_dir, name)
    try:
        manifest = dict(manifest)
        manifest["files"] = save_weights(model.cpu(), staging)
        bundle.write_manifest(staging, manifest)
        if before_publish is not None:
            before_publish(staging)
        return bundle.publish(staging, models_dir, name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
