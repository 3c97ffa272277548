"""Model bundles: `models/<name>/<version>/` with weights (safetensors) and manifest.json.

Versions are immutable once published: a bundle is written to a temporary folder beside its final
place and renamed into `v<N>`. Its weights, calibration and every manifest field but `exports` never
change afterwards (the digest, `manifest_digest`, covers them). Two things may be added later:
`stpm export` writes ONNX files and records them under the manifest's `exports` (the manifest is
replaced atomically); `stpm eval` records its metrics in `eval.json` beside the manifest.

Activation rule: `name` means its activated version (`models/<name>/ACTIVE`) and nothing else. The
first version published under a name is activated; later ones only when asked (`set_active`).
Version numbers are never reused: `models/<name>/.last-version` keeps the highest number ever
given, so a deleted `name/v2` can never come back as another model. Publishing, activating and
deleting take a per-name lock (`models/<name>/.lock`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stpm.bundle.errors import (
    BundleError,
    MalformedBundleError,
    ModelNotFoundError,
    NoActiveVersionError,
    VersionInUseError,
)
from stpm.bundle.files import (
    atomic_write_text,
    fsync_dir,
    read_manifest,
    write_manifest,
)
from stpm.bundle.lock import LOCK, NOT_WRITABLE, check_writable, name_lock, not_writable
from stpm.bundle.names import EVALUATIONS, MANIFEST

# Patterns as JSON Schema / ECMA regexes (the API spec shows them); Python matches them with fullmatch.
NAME_PATTERN = r"^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
VERSION_PATTERN = r"^v[1-9][0-9]{0,8}$"
# A /score `model` parameter: NAME or NAME/VERSION, or empty (the server's default model).
MODEL_REF_PATTERN = r"^((?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._-]{0,63}(/v[1-9][0-9]{0,8})?)?$"
NAME_RE = re.compile(NAME_PATTERN)
VERSION_RE = re.compile(r"^v([1-9][0-9]{0,8})$")
ACTIVE = "ACTIVE"
LAST_VERSION = ".last-version"  # the highest version number ever given under a name
STAGING = ".staging-"
DELETED = ".deleted-"
STALE_STAGING_S = 6 * 3600.0  # a staging folder whose owner cannot be checked is stale after this long
FORMAT_VERSION = 3  # 3: tiling.small_images ("pad"); 2: manifest["tiling"]; format 1 bundles squash to image_size


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise BundleError(
            f"invalid model name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def check_version(version: str) -> str:
    if not isinstance(version, str) or not VERSION_RE.fullmatch(version):
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
    return sorted(p.name for p in root.iterdir() if p.is_dir() and NAME_RE.fullmatch(p.name) and list_versions(root, p.name))


def list_versions(models_dir: str | Path, name: str) -> list[str]:
    """Published versions of `name`, oldest first (only complete bundles: a manifest must exist)."""
    d = Path(models_dir) / check_name(name)
    if not d.is_dir():
        return []
    vs = [p.name for p in d.iterdir() if VERSION_RE.fullmatch(p.name) and (p / MANIFEST).is_file()]
    return sorted(vs, key=lambda v: int(v[1:]))


def get_active(models_dir: str | Path, name: str) -> str | None:
    """The version `name` resolves to: its ACTIVE pointer, or None when no version is activated.

    A store written before the activation rule (versions, but neither ACTIVE nor .last-version)
    keeps resolving to its newest version, as it did then, until its first publish or delete
    under the lock pins that version (`_adopt_legacy`)."""
    versions = list_versions(models_dir, name)
    d = Path(models_dir) / name
    p = d / ACTIVE
    if p.is_file():
        v = p.read_text().strip()
        return v if v in versions else None
    if versions and not (d / LAST_VERSION).is_file():
        return versions[-1]
    return None


def set_active(models_dir: str | Path, name: str, version: str) -> None:
    check_name(name)
    check_version(version)
    d = Path(models_dir) / name
    if not d.is_dir():
        raise ModelNotFoundError(f"model {name}/{version} does not exist")
    with name_lock(d):
        _adopt_legacy(d)
        if version not in list_versions(models_dir, name):
            raise ModelNotFoundError(f"model {name}/{version} does not exist")
        atomic_write_text(d / ACTIVE, version + "\n")


def resolve(models_dir: str | Path, ref: str) -> Path:
    """'name' (its activated version) or 'name/version' -> the bundle folder. Raises ModelNotFoundError
    (NoActiveVersionError when `name` has versions but none is activated). Messages name the model,
    never the store's path or its other models (they reach API clients)."""
    name, version = parse_ref(ref)
    if version is None:
        version = get_active(models_dir, name)
        if version is None:
            if list_versions(models_dir, name):
                raise NoActiveVersionError(
                    f"model {name!r} has no activated version: activate one "
                    f"(POST /models/{name}/versions/VERSION/activate or `stpm activate {name}/VERSION`) "
                    f"or name a version ({name}/vN)"
                )
            raise ModelNotFoundError(f"no model named {name!r}")
    path = Path(models_dir) / name / version
    if not (path / MANIFEST).is_file():
        raise ModelNotFoundError(f"model {name}/{version} does not exist")
    return path


MODEL_REF_HELP = ("NAME or NAME/VERSION in --models-dir, a bundle folder, or a model folder (its activated "
                  "version)")  # what locate() accepts, for the CLI commands that take a model


def locate(models_dir: str | Path, ref: str) -> Path:
    """A bundle folder given as a path (it holds a manifest); a model's folder given as a path (models/NAME:
    its activated version); else `resolve(models_dir, ref)`."""
    p = Path(ref)
    if (p / MANIFEST).is_file():
        return p
    if len(p.parts) > 1 and p.is_dir() and NAME_RE.fullmatch(p.name) and list_versions(p.parent, p.name):
        return resolve(p.parent, p.name)
    if p.is_absolute() or len(p.parts) > 2:  # a path, not NAME or NAME/VERSION
        raise BundleError(f"invalid model reference {ref!r}: expected NAME, NAME/VERSION, a bundle folder (with "
                          f"{MANIFEST}) or a model folder with published versions")
    return resolve(models_dir, ref)


def default_models_dir() -> str:
    """The model store the command line uses unless told: $STPM_MODELS_DIR, else ./models."""
    return os.environ.get("STPM_MODELS_DIR") or "models"


def read_evaluations(bundle_dir: str | Path) -> dict[str, Any]:
    """The version's recorded evaluations {dataset: metrics} (`stpm eval`); {} when none. Versions from
    before eval.json kept them in the manifest's `metrics`; those are returned too."""
    bundle_dir = Path(bundle_dir)
    where = f"{bundle_dir.parent.name}/{bundle_dir.name}"
    legacy = (read_manifest(bundle_dir).get("metrics") or {}) if (bundle_dir / MANIFEST).is_file() else {}
    try:
        recorded = json.loads((bundle_dir / EVALUATIONS).read_text())
    except FileNotFoundError:
        recorded = {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MalformedBundleError(f"{where}: {EVALUATIONS} is not valid JSON ({e})") from None
    if not isinstance(legacy, dict) or not isinstance(recorded, dict):
        raise MalformedBundleError(f"{where}: its evaluations are not a JSON object")
    return {**legacy, **recorded}


def record_evaluation(bundle_dir: str | Path, dataset: str, result: dict[str, Any]) -> None:
    """Add (or replace) one dataset's evaluation in the version's eval.json, atomically, under the name's
    lock. The manifest, the weights and the exports are not touched."""
    bundle_dir = Path(bundle_dir)
    read_manifest(bundle_dir)  # a bundle, not any folder
    with name_lock(bundle_dir.parent):
        try:
            recorded = json.loads((bundle_dir / EVALUATIONS).read_text())
        except FileNotFoundError:
            recorded = {}
        recorded[dataset] = result
        atomic_write_text(bundle_dir / EVALUATIONS, json.dumps(recorded, indent=2) + "\n")


def _last_version(name_dir: Path) -> int:
    try:
        return int((name_dir / LAST_VERSION).read_text().strip())
    except (OSError, ValueError):
        return 0


def _numbers_on_disk(name_dir: Path) -> list[int]:
    """Every version number present, complete or not, and those of deletions still in progress."""
    out = []
    for p in name_dir.iterdir():
        m = VERSION_RE.fullmatch(p.name)
        if m is None and p.name.startswith(DELETED):
            m = VERSION_RE.fullmatch(p.name[len(DELETED):].split("-", 1)[0])
        if m is not None:
            out.append(int(m.group(1)))
    return out


def _raise_last_version(name_dir: Path, n: int) -> None:
    if n > _last_version(name_dir):
        atomic_write_text(name_dir / LAST_VERSION, f"{n}\n")


def _adopt_legacy(name_dir: Path) -> None:
    """(under the lock) A name from before the activation rule: pin what it resolved to (its newest
    version) as ACTIVE and start its high-water mark, so the next publish changes nothing it served."""
    if (name_dir / ACTIVE).is_file() or (name_dir / LAST_VERSION).is_file():
        return
    versions = list_versions(name_dir.parent, name_dir.name)
    if versions:
        atomic_write_text(name_dir / ACTIVE, versions[-1] + "\n")
    _raise_last_version(name_dir, max(_numbers_on_disk(name_dir), default=0))


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def new_staging_dir(models_dir: str | Path, name: str) -> Path:
    """A private temporary folder beside the versions of `name` (same filesystem, so rename is atomic).

    Its name records the owner (`.staging-<pid>-<host>-<random>`) so that start-up cleanup removes
    only folders whose publisher is gone (`clean_staging`)."""
    d = Path(models_dir) / check_name(name)
    tmp = d / f"{STAGING}{os.getpid()}-{_host_tag()}-{uuid.uuid4().hex}"
    try:
        d.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as e:
        if e.errno in NOT_WRITABLE:
            raise not_writable(e, f"model {name} cannot be published") from None
        raise
    return tmp


def publish(staging: Path, models_dir: str | Path, name: str) -> tuple[str, Path]:
    """Atomically rename a complete staging folder to the next version number; -> (version, path).

    The number is one past the highest ever given under `name` (never reused after a delete). The
    manifest's `version` field is filled in before the rename and every file is fsynced. The first
    version of a name (none published yet) becomes its ACTIVE version; later ones only through
    `set_active`.
    """
    manifest = read_manifest(staging)
    for f in staging.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    d = Path(models_dir) / check_name(name)
    with name_lock(d):
        _adopt_legacy(d)
        first = not list_versions(models_dir, name)
        while True:
            n = max(_last_version(d), *_numbers_on_disk(d), 0) + 1
            version = f"v{n}"
            manifest["version"] = version
            write_manifest(staging, manifest)
            _raise_last_version(d, n)  # first: a crash after this only skips a number
            target = d / version
            try:
                os.rename(staging, target)  # fails if target exists (a writer outside the lock) -> retry
            except OSError:
                if target.exists():
                    continue
                raise
            fsync_dir(d)
            if first:
                atomic_write_text(d / ACTIVE, version + "\n")
            return version, target


def delete_version(models_dir: str | Path, name: str, version: str, *, keep_active: bool = False,
                   in_use: Callable[[], bool] | None = None) -> None:
    """Remove a version: renamed away first (atomic disappearance), then deleted. Its number stays taken.

    keep_active: refuse (VersionInUseError) when it is the active version; in_use: refuse when this says
    it serves requests. Both are checked under the name's lock, so an activation cannot slip in between
    the check and the delete."""
    path = resolve(models_dir, f"{name}/{version}")
    d = path.parent
    with name_lock(d):
        _adopt_legacy(d)
        path = resolve(models_dir, f"{name}/{version}")
        if keep_active and get_active(models_dir, name) == version:
            raise VersionInUseError(f"{name}/{version} is the active version; activate another one first")
        if in_use is not None and in_use():
            raise VersionInUseError(f"{name}/{version} is serving requests")
        _raise_last_version(d, int(version[1:]))
        trash = path.with_name(f"{DELETED}{version}-{uuid.uuid4().hex}")
        os.rename(path, trash)
        fsync_dir(d)
        active = d / ACTIVE
        if active.is_file() and active.read_text().strip() == version:
            active.unlink()
            fsync_dir(d)
    shutil.rmtree(trash, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    try:  # a zombie has finished
        return not Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return True


def staging_is_stale(path: Path, now: float | None = None, max_age_s: float = STALE_STAGING_S) -> bool:
    """True when the publish that owns a `.staging-*` folder cannot be running any more: its process
    (on this host) is gone, or (owner on another host, an old-style name, or a reused pid) the folder
    has not changed for `max_age_s`."""
    now = time.time() if now is None else now
    try:
        old = now - path.stat().st_mtime > max_age_s
    except OSError:
        return False  # already gone
    parts = path.name[len(STAGING):].split("-")
    if len(parts) == 3 and parts[0].isdigit() and parts[1] == _host_tag():
        return old or not _pid_alive(int(parts[0]))
    return old


def clean_staging(models_dir: str | Path, max_age_s: float = STALE_STAGING_S) -> list[Path]:
    """Remove leftovers of interrupted publishes/deletes (call at start-up); returns what was removed.

    A staging folder is removed only when its publisher is gone (`staging_is_stale`): a server that
    starts while `stpm train` publishes leaves that publish alone."""
    removed = []
    root = Path(models_dir)
    if not root.is_dir():
        return removed
    now = time.time()
    for name_dir in root.iterdir():
        if not name_dir.is_dir():
            continue
        for p in name_dir.iterdir():
            if p.name.startswith(DELETED) or (p.name.startswith(STAGING) and staging_is_stale(p, now, max_age_s)):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


__all__ = [
    "MODEL_REF_HELP",
    "NAME_PATTERN",
    "MODEL_REF_PATTERN",
    "VERSION_PATTERN",
    "NAME_RE",
    "VERSION_RE",
    "ACTIVE",
    "LAST_VERSION",
    "LOCK",
    "STAGING",
    "DELETED",
    "STALE_STAGING_S",
    "FORMAT_VERSION",
    "check_name",
    "check_writable",
    "check_version",
    "parse_ref",
    "list_models",
    "list_versions",
    "get_active",
    "set_active",
    "resolve",
    "locate",
    "default_models_dir",
    "read_evaluations",
    "record_evaluation",
    "new_staging_dir",
    "publish",
    "delete_version",
    "staging_is_stale",
    "clean_staging",
]
