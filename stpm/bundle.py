"""Model bundles: `models/<name>/<version>/` with weights (safetensors) and manifest.json.

Versions are immutable once published: a bundle is written to a temporary folder beside its final
place and renamed into `v<N>`. Derived artefacts (ONNX exports, evaluation metrics) may be added
to a published version later; they never change its weights or calibration, and the manifest is
replaced atomically when they are recorded.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
VERSION_RE = re.compile(r"^v([1-9][0-9]{0,8})$")
MANIFEST = "manifest.json"
ACTIVE = "ACTIVE"
FORMAT_VERSION = 2  # 2: manifest["tiling"] (stpm.tiling); format 1 bundles squash to image_size
# Excluded from the digest that identifies what a model computes: derived artefacts, and the version
# name (given at publish time, after the staged export wrote the digest into the ONNX metadata).
DERIVED_KEYS = ("exports", "metrics", "version")


class BundleError(ValueError):
    """A bad model reference or a missing / malformed bundle; the message says which."""


class ModelNotFoundError(BundleError):
    pass


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise BundleError(
            f"invalid model name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def check_version(version: str) -> str:
    if not isinstance(version, str) or not VERSION_RE.match(version):
        raise BundleError(f"invalid version {version!r}: versions look like v1, v2, ...")
    return version


def parse_ref(ref: str) -> tuple[str, str | None]:
    """'name' or 'name/version' -> (name, version or None), validated (no path traversal)."""
    parts = ref.strip().split("/")
    if len(parts) == 1:
        return check_name(parts[0]), None
    if len(parts) == 2:
        return check_name(parts[0]), check_version(parts[1])
    raise BundleError(f"invalid model reference {ref!r}: expected NAME or NAME/VERSION")


def list_models(models_dir: str | Path) -> list[str]:
    root = Path(models_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and NAME_RE.match(p.name) and list_versions(root, p.name))


def list_versions(models_dir: str | Path, name: str) -> list[str]:
    """Published versions of `name`, oldest first (only complete bundles: a manifest must exist)."""
    d = Path(models_dir) / check_name(name)
    if not d.is_dir():
        return []
    vs = [p.name for p in d.iterdir() if VERSION_RE.match(p.name) and (p / MANIFEST).is_file()]
    return sorted(vs, key=lambda v: int(v[1:]))


def get_active(models_dir: str | Path, name: str) -> str | None:
    """The version `name` resolves to: the ACTIVE pointer if valid, else the newest version."""
    versions = list_versions(models_dir, name)
    p = Path(models_dir) / name / ACTIVE
    if p.is_file():
        v = p.read_text().strip()
        if v in versions:
            return v
    return versions[-1] if versions else None


def set_active(models_dir: str | Path, name: str, version: str) -> None:
    check_name(name)
    check_version(version)
    if version not in list_versions(models_dir, name):
        raise ModelNotFoundError(f"model {name}/{version} does not exist")
    _atomic_write_text(Path(models_dir) / name / ACTIVE, version + "\n")


def resolve(models_dir: str | Path, ref: str) -> Path:
    """'name' (the active version) or 'name/version' -> the bundle folder. Raises ModelNotFoundError."""
    name, version = parse_ref(ref)
    if version is None:
        version = get_active(models_dir, name)
        if version is None:
            known = ", ".join(list_models(models_dir)) or "none"
            raise ModelNotFoundError(f"no model named {name!r} in {models_dir} (known: {known})")
    path = Path(models_dir) / name / version
    if not (path / MANIFEST).is_file():
        raise ModelNotFoundError(f"model {name}/{version} does not exist in {models_dir}")
    return path


def read_manifest(bundle_dir: str | Path) -> dict[str, Any]:
    p = Path(bundle_dir) / MANIFEST
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise ModelNotFoundError(f"{bundle_dir} is not a model bundle (no {MANIFEST})") from None
    except json.JSONDecodeError as e:
        raise BundleError(f"{p} is not valid JSON: {e}") from None


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


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_manifest(bundle_dir: str | Path, manifest: dict[str, Any]) -> None:
    _atomic_write_text(Path(bundle_dir) / MANIFEST, json.dumps(manifest, indent=2, sort_keys=False) + "\n")


def new_staging_dir(models_dir: str | Path, name: str) -> Path:
    """A private temporary folder beside the versions of `name` (same filesystem, so rename is atomic)."""
    d = Path(models_dir) / check_name(name)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".staging-{uuid.uuid4().hex}"
    tmp.mkdir()
    return tmp


def publish(staging: Path, models_dir: str | Path, name: str) -> tuple[str, Path]:
    """Atomically rename a complete staging folder to the next free version; -> (version, path).

    The manifest's `version` field is filled in before the rename, every file is fsynced, and a
    concurrent publisher that wins a version number makes this one take the next.
    """
    manifest = read_manifest(staging)
    for f in staging.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    d = Path(models_dir) / check_name(name)
    while True:
        existing = [int(p.name[1:]) for p in d.iterdir() if VERSION_RE.match(p.name)]
        version = f"v{max(existing, default=0) + 1}"
        manifest["version"] = version
        write_manifest(staging, manifest)
        target = d / version
        try:
            os.rename(staging, target)  # fails if target exists (non-empty dir) -> retry
        except OSError:
            if target.exists():
                continue
            raise
        fsync_dir(d)
        return version, target


def delete_version(models_dir: str | Path, name: str, version: str) -> None:
    """Remove a version: renamed away first (atomic disappearance), then deleted."""
    path = resolve(models_dir, f"{name}/{version}")
    trash = path.with_name(f".deleted-{version}-{uuid.uuid4().hex}")
    os.rename(path, trash)
    fsync_dir(path.parent)
    active = Path(models_dir) / name / ACTIVE
    if active.is_file() and active.read_text().strip() == version:
        active.unlink()
    shutil.rmtree(trash, ignore_errors=True)


def clean_staging(models_dir: str | Path) -> list[Path]:
    """Remove leftovers of interrupted publishes/deletes (call at start-up); returns what was removed."""
    removed = []
    root = Path(models_dir)
    if not root.is_dir():
        return removed
    for name_dir in root.iterdir():
        if not name_dir.is_dir():
            continue
        for p in name_dir.iterdir():
            if p.name.startswith((".staging-", ".deleted-")):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed
