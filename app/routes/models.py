"""The model store: list, inspect, activate and delete versions."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import PurePath
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi import Path as PathParam
from starlette.concurrency import run_in_threadpool

from app.deps import RegistryDep
from app.errors import APIError, model_error
from app.registry import ModelRegistry, inference_info
from app.schemas import (
    ActivateResponse,
    DeleteResponse,
    ErrorResponse,
    ModelDetail,
    ModelList,
    VersionDetail,
)
from stpm import bundle
from stpm.bundle import BundleError
from stpm.bundle.manifest import Manifest
from stpm.runtime.choice import bundle_precisions

router = APIRouter(prefix="/models", tags=["models"])

ERRORS = {
    400: {"model": ErrorResponse, "description": "Malformed name or version"},
    401: {"model": ErrorResponse, "description": "Missing or wrong API key"},
    404: {"model": ErrorResponse, "description": "No such model or version"},
}
# The patterns are documented, not enforced by FastAPI: the store's own check answers 400 with its reason.
Name = Annotated[str, PathParam(description="Model name (others: 400)", examples=["bottle"],
                                json_schema_extra={"pattern": bundle.NAME_PATTERN})]
Version = Annotated[str, PathParam(description="Version: v1, v2, ... (others: 400)", examples=["v2"],
                                   json_schema_extra={"pattern": bundle.VERSION_PATTERN})]


def _check(name: str, version: str | None = None) -> None:
    try:
        bundle.check_name(name)
        if version is not None:
            bundle.check_version(version)
    except BundleError as e:
        raise model_error(e) from None


def _name_only(value: Any) -> Any:
    """A path on the server -> its last part (what a client may see of it); anything else as it is."""
    if isinstance(value, str) and ("/" in value or "\\" in value):
        return PurePath(value.replace("\\", "/")).name or value.strip("/\\")
    return value


def public_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest as clients see it: the paths of the training machine (the data folder, skipped files,
    a teacher weight file) reduced to their names."""
    out = dict(manifest)
    if isinstance(out.get("data"), dict):
        data = out["data"] = dict(out["data"])
        data["source"] = _name_only(data.get("source"))
        if isinstance(data.get("skipped"), list):
            data["skipped"] = [_name_only(p) for p in data["skipped"]]
    if isinstance(out.get("model"), dict) and out["model"].get("weights"):
        out["model"] = {**out["model"], "weights": _name_only(out["model"]["weights"])}
    if "teacher_weights_source" in out:
        out["teacher_weights_source"] = _name_only(out["teacher_weights_source"])
    return out


def _version_info(reg: ModelRegistry, name: str, version: str, active: str | None) -> tuple[dict[str, Any], dict]:
    """A version's summary and its manifest (as stored). A malformed manifest is a BundleError: that version
    is left out of the listing, never an error for the whole list."""
    path = reg.models_dir / name / version
    man = Manifest.read(path)
    info = {
        "version": version,
        "active": version == active,
        "loaded": reg.peek(name, version) is not None,
        "created_at": man.created_at,
        "threshold": man.calibration.threshold,
        "image_size": man.model.image_size,
        "backbone": man.model.backbone,
        "metrics": bundle.read_evaluations(path) or None,
        "precisions": {k: v or "available" for k, v in bundle_precisions(man, path).items()},
    }
    lm = reg.peek(name, version)
    if lm is not None:
        info["inference"] = inference_info(lm) or None
    return info, public_manifest(man.to_dict())


def _summary(reg: ModelRegistry, name: str, default: str | None) -> tuple[dict[str, Any], dict[str, dict]]:
    versions = bundle.list_versions(reg.models_dir, name)
    if not versions:
        raise APIError(404, "model_not_found", f"no model named {name!r}")
    active = bundle.get_active(reg.models_dir, name)
    infos, manifests = [], {}
    for v in versions:
        try:
            info, man = _version_info(reg, name, v, active)
        except BundleError:
            continue  # deleted or being deleted meanwhile
        infos.append(info)
        manifests[v] = man
    return {"name": name, "active_version": active, "default": name == default, "versions": infos}, manifests


def _default(reg: ModelRegistry) -> str | None:
    try:
        return reg.default_name()
    except BundleError:
        return None


@dataclass(frozen=True)
class StoredVersion:
    """A name/version of the path that exists in the store, and the name's active version."""

    name: str
    version: str
    active: str | None


async def stored_version(registry: RegistryDep, name: Name, version: Version) -> StoredVersion:
    """The path's version, checked and found in the store (else 400 / 404, see model_error)."""
    _check(name, version)
    try:
        bundle.resolve(registry.models_dir, f"{name}/{version}")
        return StoredVersion(name, version, bundle.get_active(registry.models_dir, name))
    except BundleError as e:
        raise model_error(e) from None


StoredVersionDep = Annotated[StoredVersion, Depends(stored_version)]


@router.get("", response_model=ModelList, summary="All models with their versions", responses=ERRORS)
async def list_models(registry: RegistryDep):
    def work():
        default = _default(registry)
        out = []
        for n in bundle.list_models(registry.models_dir):
            try:
                out.append(_summary(registry, n, default)[0])
            except APIError:
                continue
        return {"default_model": default, "models": out}

    return await run_in_threadpool(work)


@router.get("/{name}", response_model=ModelDetail, summary="One model: versions, metrics, the active manifest",
            responses=ERRORS)
async def get_model(registry: RegistryDep, name: Name):
    _check(name)
    summary, manifests = await run_in_threadpool(_summary, registry, name, _default(registry))
    return {**summary, "manifest": manifests.get(summary["active_version"], {})}


@router.get("/{name}/versions/{version}", response_model=VersionDetail, summary="One version and its manifest",
            responses=ERRORS)
async def get_version(registry: RegistryDep, stored: StoredVersionDep):
    try:
        info, man = _version_info(registry, stored.name, stored.version, stored.active)
    except BundleError as e:
        raise model_error(e) from None
    return {**info, "name": stored.name, "manifest": man}


@router.post(
    "/{name}/versions/{version}/activate",
    response_model=ActivateResponse,
    summary="Make a version the one `name` resolves to (loaded and warmed up before the answer)",
    responses={**ERRORS, 503: {"model": ErrorResponse, "description": "The version cannot be loaded"}},
)
async def activate(registry: RegistryDep, stored: StoredVersionDep):
    name, version = stored.name, stored.version
    try:
        await registry.load(name, version)  # refuse to activate what cannot serve
        await run_in_threadpool(bundle.set_active, registry.models_dir, name, version)  # under the name's lock
    except BundleError as e:
        raise model_error(e) from None
    return {"name": name, "active_version": version, "previous_version": stored.active, "loaded": True}


@router.delete(
    "/{name}/versions/{version}",
    response_model=DeleteResponse,
    summary="Delete a version (not the active or an in-use one unless force=true)",
    responses={**ERRORS, 409: {"model": ErrorResponse, "description": "The version is active or serving requests"}},
)
async def delete_version(
    registry: RegistryDep,
    stored: StoredVersionDep,
    force: Annotated[bool, Query(description="Delete even the active / in-use version")] = False,
):
    name, version = stored.name, stored.version
    # Is it active? serving? Both asked under the name's lock, so an activation cannot slip in between.
    in_use = None if force else functools.partial(registry.in_use, name, version)
    try:
        await run_in_threadpool(bundle.delete_version, registry.models_dir, name, version, keep_active=not force,
                                in_use=in_use)
    except BundleError as e:
        raise model_error(e) from None
    await registry.forget(name, version, "deleted")  # requests in flight finish; no new one gets it
    return {"name": name, "deleted_version": version, "active_version": bundle.get_active(registry.models_dir, name)}
