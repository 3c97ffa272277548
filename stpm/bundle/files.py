"""A bundle's files on disk: atomic, durable writes; the manifest as JSON and its digest; file digests;
the facts a manifest records about the machine (library versions, time). Torch-free."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from stpm.bundle.errors import MalformedBundleError, ModelNotFoundError
from stpm.bundle.names import MANIFEST

# Excluded from the digest that identifies what a model computes: the ONNX export record (`stpm export`
# may add or redo exports of a published version), `metrics` (where `stpm eval` recorded results before
# they moved to eval.json), and the version name (given at publish time, after the staged export wrote
# the digest into the ONNX metadata). Nothing else of a published manifest ever changes.
DERIVED_KEYS = ("exports", "metrics", "version")


def read_manifest(bundle_dir: str | Path) -> dict[str, Any]:
    """A bundle's manifest.json as a dict. Errors name the bundle as name/version (never the store's path):
    ModelNotFoundError without a manifest, MalformedBundleError for one that is not a JSON object."""
    bundle_dir = Path(bundle_dir)
    where = f"{bundle_dir.parent.name}/{bundle_dir.name}"
    try:
        raw = json.loads((bundle_dir / MANIFEST).read_text())
    except FileNotFoundError:
        raise ModelNotFoundError(f"{where} is not a model bundle (no {MANIFEST})") from None
    except OSError as e:
        raise MalformedBundleError(f"{where}: the manifest cannot be read ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MalformedBundleError(f"{where}: the manifest is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise MalformedBundleError(f"{where}: the manifest is not a JSON object")
    return raw


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 over the manifest without its derived sections: identifies what the model computes."""
    core = {k: v for k, v in manifest.items() if k not in DERIVED_KEYS}
    return hashlib.sha256(json.dumps(core, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("stpm", "torch", "torchvision", "timm", "onnx", "onnxruntime", "numpy", "pillow"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable (best effort where directories can't be fsynced)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fingerprint(paths: list[Path]) -> str:
    """sha256 over the sorted (file name, content digest) pairs: identifies a training set."""
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda q: q.name):
        h.update(p.name.encode())
        h.update(hashlib.sha256(Path(p).read_bytes()).digest())
    return h.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_manifest(bundle_dir: str | Path, manifest: dict[str, Any]) -> None:
    atomic_write_text(Path(bundle_dir) / MANIFEST, json.dumps(manifest, indent=2, sort_keys=False) + "\n")


__all__ = ["DERIVED_KEYS", "atomic_write_text", "fingerprint", "fsync_dir", "library_versions", "manifest_digest",
           "read_manifest", "sha256_file", "utc_now", "write_manifest"]
