"""What an export writes besides the graphs: the ONNX metadata that ties a graph to its manifest, and the
records under manifest["exports"]."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stpm import bundle
from stpm.bundle.calibration import Calibration
from stpm.bundle.names import SCORER_ONNX


def calibration_of(manifest: dict[str, Any]) -> Calibration:
    """The bundle's threshold and normalisation (manifest["calibration"])."""
    return Calibration.from_dict(manifest["calibration"])


def scorer_metadata(calibration: Calibration, precision: str) -> dict[str, str]:
    return {"stpm.graph": "scorer", "stpm.precision": precision,
            "stpm.threshold": repr(calibration.threshold), "stpm.low": repr(calibration.low)}


def set_metadata(path: Path, manifest: dict[str, Any], extra: dict[str, str]) -> None:
    """Write the bundle's identity (name, version, manifest digest, image size) and `extra` into an
    ONNX file's metadata_props (what the runtime checks a graph against its manifest with)."""
    import onnx

    m = onnx.load(str(path))
    props = {
        "stpm.name": str(manifest.get("name")),
        # a staged bundle (export inside publish) has no version yet; the digest does not depend on it
        "stpm.version": str(manifest.get("version") or "staged"),
        "stpm.manifest_digest": bundle.manifest_digest(manifest),
        "stpm.image_size": str(manifest["model"]["image_size"]),
        **extra,
    }
    del m.metadata_props[:]
    for k, v in props.items():
        e = m.metadata_props.add()
        e.key, e.value = k, v
    m.producer_name = "stpm"
    onnx.save(m, str(path))


def bundle_label(manifest: dict[str, Any]) -> str:
    """name/version for logs; "name (staged)" while a bundle is exported before it is published."""
    version = manifest.get("version")
    return f"{manifest.get('name')}/{version}" if version else f"{manifest.get('name')} (staged)"


def file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": bundle.sha256_file(path), "bytes": path.stat().st_size}


def exported_manifest(bundle_dir: Path) -> dict[str, Any]:
    """The manifest of a bundle whose fp32 scorer is exported; BundleError otherwise."""
    manifest = bundle.read_manifest(bundle_dir)
    if SCORER_ONNX not in ((manifest.get("exports") or {}).get("files") or {}):
        raise bundle.BundleError(f"{bundle_dir}: export the fp32 scorer first")
    return manifest


def record_export(bundle_dir: Path, manifest: dict[str, Any], key: str, record: dict[str, Any]) -> None:
    """manifest["exports"][key] = record, written."""
    manifest["exports"][key] = record
    bundle.write_manifest(bundle_dir, manifest)


__all__ = ["bundle_label", "calibration_of", "exported_manifest", "file_entry", "record_export", "scorer_metadata", "set_metadata"]
