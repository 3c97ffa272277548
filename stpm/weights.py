"""Torch side of a bundle: write and read the weights of an STPM model (safetensors, no pickles)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from stpm import bundle
from stpm.config import ModelConfig, from_dict
from stpm.model import STPM, build_stpm
from stpm.names import STUDENT_WEIGHTS, TEACHER_WEIGHTS


def _contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def save_weights(model: STPM, folder: str | Path) -> dict[str, str]:
    """Write teacher and student weights into `folder`; -> {file name: sha256}."""
    folder = Path(folder)
    save_file(_contiguous(model.teacher.state_dict()), str(folder / TEACHER_WEIGHTS))
    save_file(_contiguous(model.student_state_dict()), str(folder / STUDENT_WEIGHTS))
    return {f: bundle.sha256_file(folder / f) for f in (TEACHER_WEIGHTS, STUDENT_WEIGHTS)}


def model_config(manifest: dict[str, Any]) -> ModelConfig:
    return from_dict(ModelConfig, manifest["model"])


def load_model(bundle_dir: str | Path, verify: bool = True) -> tuple[STPM, dict[str, Any]]:
    """Bundle folder -> (STPM in eval mode on CPU, manifest). Weights come only from the bundle."""
    bundle_dir = Path(bundle_dir)
    manifest = bundle.read_manifest(bundle_dir)
    if verify:
        for fname, digest in manifest.get("files", {}).items():
            p = bundle_dir / fname
            if not p.is_file():
                raise bundle.BundleError(f"{bundle_dir}: {fname} is missing")
            if bundle.sha256_file(p) != digest:
                raise bundle.BundleError(f"{bundle_dir}: {fname} does not match its sha256 in the manifest")
    cfg = model_config(manifest)
    # Architecture only: the teacher's ImageNet weights are the bundle's own copy.
    model, _ = build_stpm(ModelConfig(**{**cfg.__dict__, "pretrained": False}))
    model.teacher.load_state_dict(load_file(str(bundle_dir / TEACHER_WEIGHTS)), strict=True)
    sd = load_file(str(bundle_dir / STUDENT_WEIGHTS))
    model.student.load_state_dict({k[8:]: v for k, v in sd.items() if k.startswith("student.")}, strict=True)
    if model.projections is not None:
        model.projections.load_state_dict(
            {k[12:]: v for k, v in sd.items() if k.startswith("projections.")}, strict=True
        )
    return model.eval(), manifest
