"""What an export writes besides the graphs: the ONNX metadata that ties a graph to its manifest, and the
records under manifest["exports"]."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stpm import bundle
from stpm.bundle.calibration import Calibration
from stpm.bundle.manifest import Manifest
from stpm.bundle.names import SCORER_ONNX


def scorer_metadata(calibration: Calibration, precision: str) -> dict[str, str]:
    return {"stpm.graph": "scorer", "stpm.precision": precision,
            "stpm.threshold": repr(calibration.threshold), "stpm.low": repr(calibration.low)}


def set_metadata(path: Path, manifest: Manifest, extra: dict[str, str]) -> None:
    """Write the bundle's identity (name, version, manifest digest, image size) and `extra` into an
    ONNX file's metadata_props (what the runtime checks a graph against its manifest with)."""
    import onnx

    m = onnx.load(str(path))
    props = {
        "stpm.name": manifest.name,
        # a staged bundle (export inside publish) has no version yet; the digest does not depend on it
        "stpm.version": manifest.version or "staged",
        "stpm.manifest_digest": manifest.digest(),
        "stpm.image_size": str(manifest.model.image_size),
        **extra,
    }
    del m.metadata_props[:]
    for k, v in props.items():
        e = m.metadata_props.add()
        e.key, e.value = k, v
    m.producer_name = "stpm"
    onnx.save(m, str(path))


def bundle_label(manifest: Manifest) -> str:
    """name/version for logs; "name (staged)" while a bundle is exported before it is published."""
    return manifest.ref if manifest.version else f"{manifest.name} (staged)"


def file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": bundle.sha256_file(path), "bytes": path.stat().st_size}


def exported_manifest(bundle_dir: Path) -> Manifest:
    """The manifest of a bundle whose fp32 scorer is exported; BundleError otherwise."""
    manifest = Manifest.read(bundle_dir)
    if SCORER_ONNX not in manifest.export_files:
        raise bundle.BundleError(f"{manifest.ref}: export the fp32 scorer first")
    return manifest


def record_export(bundle_dir: Path, manifest: Manifest, key: str, record: dict[str, Any],
                  files: dict[str, Any | None] | None = None) -> None:
    """exports[key] = record (and exports.files changed as `files` says: None removes a file), written."""
    raw = manifest.to_dict()
    raw["exports"][key] = record
    for name, entry in (files or {}).items():
        if entry is None:
            raw["exports"]["files"].pop(name, None)
        else:
            raw["exports"]["files"][name] = entry
    bundle.write_manifest(bundle_dir, raw)


__all__ = ["bundle_label", "exported_manifest", "file_entry", "record_export", "scorer_metadata", "set_metadata"]
