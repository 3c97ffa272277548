"""Torch side of a bundle: write and read a model's weights (safetensors, no pickles).

stpm: teacher.safetensors + student.safetensors (student and 1x1 projections).
patchcore: teacher.safetensors + memory_bank.safetensors (the coreset of patch features).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from stpm import bundle
from stpm.options import ModelOptions, from_dict
from stpm.methods.stpm.model import STPM, build_stpm
from stpm.bundle.names import MEMORY_BANK_WEIGHTS, STUDENT_WEIGHTS, TEACHER_WEIGHTS


def _contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def save_weights(model: nn.Module, folder: str | Path) -> dict[str, str]:
    """Write a model's weights into `folder` (an STPM, or a PatchCoreMap); -> {file name: sha256}."""
    from stpm.methods.patchcore.model import PatchCoreMap

    folder = Path(folder)
    if isinstance(model, STPM):
        save_file(_contiguous(model.teacher.state_dict()), str(folder / TEACHER_WEIGHTS))
        save_file(_contiguous(model.student_state_dict()), str(folder / STUDENT_WEIGHTS))
        names = (TEACHER_WEIGHTS, STUDENT_WEIGHTS)
    elif isinstance(model, PatchCoreMap):
        save_file(_contiguous(model.features.teacher.state_dict()), str(folder / TEACHER_WEIGHTS))
        save_file({"bank": model.bank.detach().cpu().contiguous()}, str(folder / MEMORY_BANK_WEIGHTS))
        names = (TEACHER_WEIGHTS, MEMORY_BANK_WEIGHTS)
    else:
        raise TypeError(f"no bundle layout for {type(model).__name__}")
    return {f: bundle.sha256_file(folder / f) for f in names}


def model_config(manifest: dict[str, Any]) -> ModelOptions:
    return from_dict(ModelOptions, manifest["model"])


def _verify(bundle_dir: Path, manifest: dict[str, Any]) -> None:
    for fname, digest in manifest.get("files", {}).items():
        p = bundle_dir / fname
        if not p.is_file():
            raise bundle.BundleError(f"{bundle_dir}: {fname} is missing")
        if bundle.sha256_file(p) != digest:
            raise bundle.BundleError(f"{bundle_dir}: {fname} does not match its sha256 in the manifest")


def load_model(bundle_dir: str | Path, verify: bool = True) -> tuple[STPM, dict[str, Any]]:
    """An STPM bundle folder -> (STPM in eval mode on CPU, manifest). Weights come only from the bundle."""
    bundle_dir = Path(bundle_dir)
    manifest = bundle.read_manifest(bundle_dir)
    if manifest["model"].get("method", "stpm") != "stpm":
        raise bundle.BundleError(f"{bundle_dir} holds a {manifest['model']['method']} model, not stpm: use load_map")
    if verify:
        _verify(bundle_dir, manifest)
    cfg = model_config(manifest)
    # Architecture only: the teacher's ImageNet weights are the bundle's own copy.
    model, _ = build_stpm(ModelOptions(**{**cfg.__dict__, "pretrained": False}))
    model.teacher.load_state_dict(load_file(str(bundle_dir / TEACHER_WEIGHTS)), strict=True)
    sd = load_file(str(bundle_dir / STUDENT_WEIGHTS))
    model.student.load_state_dict({k[8:]: v for k, v in sd.items() if k.startswith("student.")}, strict=True)
    if model.projections is not None:
        model.projections.load_state_dict(
            {k[12:]: v for k, v in sd.items() if k.startswith("projections.")}, strict=True
        )
    return model.eval(), manifest


def load_map(bundle_dir: str | Path, verify: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """Any bundle folder -> (its map module in eval mode on CPU, manifest): float tiles [N, 3, S, S] in
    [0, 1] -> raw anomaly maps [N, S, S] (stpm.methods)."""
    from stpm.methods.maps import STPMMap, method_of

    bundle_dir = Path(bundle_dir)
    manifest = bundle.read_manifest(bundle_dir)
    m = manifest["model"]
    if method_of(m) == "stpm":
        model, manifest = load_model(bundle_dir, verify)
        return STPMMap(model, m.get("combine", "product"), m.get("sigma") or 0.0).eval(), manifest
    from stpm.methods.patchcore.model import PatchCoreMap, build_features

    if verify:
        _verify(bundle_dir, manifest)
    cfg = model_config(manifest)
    features, _ = build_features(ModelOptions(**{**cfg.__dict__, "pretrained": False}))
    features.teacher.load_state_dict(load_file(str(bundle_dir / TEACHER_WEIGHTS)), strict=True)
    bank = load_file(str(bundle_dir / MEMORY_BANK_WEIGHTS))["bank"]
    return PatchCoreMap(features, bank, float(m["sigma"])).eval(), manifest
