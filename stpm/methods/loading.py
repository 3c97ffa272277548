"""A bundle's model in torch: its method's map module loaded from the bundle's weights, or written into a
bundle folder. Weights are safetensors (no pickles), checked against the manifest's sha256 on load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stpm import bundle
from stpm.bundle.manifest import Manifest
from stpm.methods import registry
from stpm.methods.maps import MapModule
from stpm.options import ModelOptions, from_dict


def model_options(manifest: Manifest) -> ModelOptions:
    """The ModelOptions a bundle was trained with (manifest["model"]; older manifests lack some fields)."""
    return from_dict(ModelOptions, {**manifest.to_dict()["model"], "method": manifest.method})


def verify_files(bundle_dir: Path, manifest: Manifest) -> None:
    for fname, digest in manifest.files.items():
        p = bundle_dir / fname
        if not p.is_file():
            raise bundle.BundleError(f"{manifest.ref}: {fname} is missing")
        if bundle.sha256_file(p) != digest:
            raise bundle.BundleError(f"{manifest.ref}: {fname} does not match its sha256 in the manifest")


def load_map(bundle_dir: str | Path, verify: bool = True) -> tuple[MapModule, Manifest]:
    """A bundle folder -> (its map module in eval mode on the CPU, its manifest): float tiles [N, 3, S, S]
    in [0, 1] -> raw anomaly maps [N, S, S]. Weights come from the bundle only."""
    bundle_dir = Path(bundle_dir)
    manifest = Manifest.read(bundle_dir)
    if verify:
        verify_files(bundle_dir, manifest)
    amap = registry.method(manifest.method).load(model_options(manifest), bundle_dir)
    return amap.eval(), manifest


def save_map(amap: MapModule, method: str, folder: str | Path) -> dict[str, Any]:
    """Write a fitted map module's weights into `folder`; -> {file name: sha256} (the manifest's `files`)."""
    folder = Path(folder)
    written = registry.method(method).save(amap.cpu(), folder)
    return {f: bundle.sha256_file(folder / f) for f in written}


__all__ = ["load_map", "model_options", "save_map", "verify_files"]
