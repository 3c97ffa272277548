"""POST /score (JSON, many images) and POST /score/overlay (one image -> image/png, jpeg or webp)."""

from __future__ import annotations

import base64
import re
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Query, UploadFile
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from app import budget
from app.deps import MetricsDep, RegistryDep, SettingsDep
from app.errors import APIError
from app.metrics import Metrics
from app.multipart import MultipartRoute
from app.registry import ScoreOptions
from app.schemas import ErrorResponse, HeatmapMode, ScoreResponse
from app.settings import Settings
from stpm import bundle
from stpm.imaging.decode import ImageDecodeError
from stpm.imaging.render import MEDIA_TYPES
from stpm.runtime.images import PreparedImage

router = APIRouter(tags=["score"], route_class=MultipartRoute)

FILES_DOC = "Images (PNG, JPEG, BMP, TIFF, WebP, ...); repeat the field for several. 16-bit, CMYK, palette and alpha are converted."
MODEL_DOC = "`name` (its active version) or `name/vN`; default (absent or empty): the server's default model"
MODEL_REF_RE = re.compile(bundle.MODEL_REF_PATTERN)
ModelRef = Annotated[str | None, Query(max_length=200, description=MODEL_DOC, examples=["bottle", "bottle/v2"],
                                       json_schema_extra={"pattern": bundle.MODEL_REF_PATTERN})]


def _model_ref(model: str | None) -> str | None:
    """The `model` parameter, checked against its documented pattern (400 `invalid_model_name` naming it)."""
    if model is not None and not MODEL_REF_RE.fullmatch(model):
        raise APIError(400, "invalid_model_name", f"invalid model reference {model[:80]!r}: expected NAME or "
                       "NAME/VERSION (1-64 letters, digits, '.', '_' or '-'; versions v1, v2, ...)")
    return model or None

ERRORS = {
    400: {"model": ErrorResponse, "description": "Malformed model name"},
    401: {"model": ErrorResponse, "description": "Missing or wrong API key"},
    404: {"model": ErrorResponse, "description": "Unknown model or version"},
    409: {"model": ErrorResponse, "description": "No model trained yet"},
    413: {"model": ErrorResponse, "description": "Too many files, a file or the request too large, the request's "
          "images and heatmaps over the pixel budget (max_request_pixels), or its tiles at the model's scale over "
          "the work budget (max_request_tile_pixels)"},
    422: {"model": ErrorResponse, "description": "A file is not a decodable image within the limits (`invalid_image`), "
          "its size does not fit the model's geometry (`unsupported_image_size`: more tiles than allowed, or for "
          "bundles before format 3 smaller than one tile at the model's scale), or a field is missing"},
    503: {"model": ErrorResponse, "description": "The model could not be loaded"},
}


async def _read_files(files: list[UploadFile], settings: Settings, metrics: Metrics) -> tuple[list[bytes], list[str]]:
    """The uploads' bytes and names, within the file count and size limits (413 otherwise)."""
    if len(files) > settings.max_files:
        metrics.rejected.labels("too_many_files").inc()
        raise APIError(413, "too_many_files",
                       f"{len(files)} files sent; at most {settings.max_files} per request (setting max_files)")
    names: list[str] = []
    blobs: list[bytes] = []
    for i, f in enumerate(files):
        name = f.filename or f"file{i}"
        if f.size is not None and f.size > settings.max_upload_bytes:
            metrics.rejected.labels("file_too_large").inc()
            raise APIError(413, "file_too_large", f"{name}: {f.size} bytes; at most {settings.max_upload_bytes} "
                           "per file (setting max_upload_bytes)")
        data = await f.read()
        if len(data) > settings.max_upload_bytes:
            metrics.rejected.labels("file_too_large").inc()
            raise APIError(413, "file_too_large", f"{name}: more than {settings.max_upload_bytes} bytes")
        names.append(name)
        blobs.append(data)
    return blobs, names


def _refuse(metrics: Metrics, code: str, errors: list[dict[str, str]]) -> None:
    """422 naming every file refused for the same reason (`code`), if any."""
    if errors:
        metrics.rejected.labels(code).inc(len(errors))
        raise APIError(422, code, "; ".join(f"{e['file']}: {e['reason']}" for e in errors), {"files": errors})


def _read_all(scorer, blobs: list[bytes], names: list[str]) -> list[PreparedImage]:
    """Every file's header size and tile plan; nothing decoded."""
    return [scorer.read(b, n) for b, n in zip(blobs, names)]


def _decode_all(scorer, images: list[PreparedImage]) -> list[dict[str, str]]:
    """Decode every read image in place; -> the ones that failed, named."""
    errors = []
    for im in images:
        try:
            scorer.decode(im)
        except ImageDecodeError as e:
            errors.append({"file": e.name, "reason": e.reason})
    return errors


def _check_budgets(images: list[PreparedImage], heatmaps: int, heatmap_size: str, settings: Settings,
                   metrics: Metrics) -> None:
    """The request's memory (413 `too_many_pixels`) and work (413 `too_many_tiles`), from the headers and plans."""
    for reason, check in (
        ("too_many_pixels", lambda: budget.check(budget.count_pixels(images, heatmaps, heatmap_size == "model"),
                                                 len(images), settings.max_request_pixels)),
        ("too_many_tiles", lambda: budget.check_tiles(images, settings.max_request_tile_pixels)),
    ):
        try:
            check()
        except APIError:
            metrics.rejected.labels(reason).inc()
            raise


def _refuse_unplannable(metrics: Metrics, images: list[PreparedImage]) -> None:
    _refuse(metrics, "unsupported_image_size",
            [{"file": im.name, "reason": im.tiling_error} for im in images if im.tiling_error])


async def _prepare(scorer, files: list[UploadFile], heatmaps: int, heatmap_size: str, settings: Settings,
                   metrics: Metrics) -> list[PreparedImage]:
    """The request's images, each prepared once by the scorer: read (header size, tile plan); the pixel and
    tile budgets checked (413) and the sizes the geometry cannot cover refused (422 `unsupported_image_size`)
    from those, before any pixel is decoded; then decoded (422 `invalid_image`). All before anything is
    queued (a batch shared with other requests must not fail because of one of them). heatmaps: outputs
    per image."""
    blobs, names = await _read_files(files, settings, metrics)
    images = await run_in_threadpool(_read_all, scorer, blobs, names)
    del blobs  # the prepared images hold the bytes until they are decoded, then drop them
    _check_budgets(images, heatmaps, heatmap_size, settings, metrics)
    _refuse_unplannable(metrics, images)
    _refuse(metrics, "invalid_image", await run_in_threadpool(_decode_all, scorer, images))
    _refuse_unplannable(metrics, images)  # a decoded size other than the header's is planned again
    return images


def _outputs(heatmap: str) -> int:
    """Heatmap images rendered per input."""
    return {"none": 0, "overlay": 1, "map": 1, "both": 2}[heatmap]


HeatmapFormat = Literal["png", "jpeg", "webp"]
FORMAT_DOC = ("Encoding of the heatmap images: png (lossless, default), jpeg (quality 90: ~6x faster to encode "
              "and ~4x smaller at 512 px), webp (lossy, the smallest)")


def _options(heatmap: str, heatmap_size: str, heatmap_format: str = "png") -> ScoreOptions:
    if heatmap == "none":
        return ScoreOptions()
    # map_size None: images rendered at each input's size without keeping the float map around;
    # "model": the map's own size, the input at the model's scale (tiled bundles keep the aspect ratio).
    return ScoreOptions(
        overlay=heatmap in ("overlay", "both"),
        raw_map_png=heatmap in ("map", "both"),
        map_size=None if heatmap_size == "input" else "model",
        heatmap_format=heatmap_format,
    )


_TIMING_NAMES = {"decode_ms": "preprocess", "infer_ms": "inference", "render_ms": "render"}


def _b64(b: bytes | None) -> str | None:
    return None if b is None else base64.b64encode(b).decode("ascii")


def _result(r, image: PreparedImage, queued_s: float, heatmap_format: str | None) -> dict[str, Any]:
    """One ScoreResult as the JSON of /score."""
    timings = {"decode": round(image.prepare_ms, 3), "queue": round(queued_s * 1000, 3)}
    timings.update({_TIMING_NAMES.get(k, k): round(float(v), 3) for k, v in (r.timings or {}).items()})
    return {
        "file": r.name,
        "raw_score": float(r.raw_score),
        "score": float(r.score),
        "is_anomaly": bool(r.is_anomaly),
        "threshold": float(r.threshold),
        "width": int(image.size[1]),
        "height": int(image.size[0]),
        "tiles": int(r.tiles),
        "scaled_width": int(r.scaled_size[1]),
        "scaled_height": int(r.scaled_size[0]),
        "timings_ms": timings,
        "overlay_png": _b64(r.overlay_image),
        "map_png": _b64(r.map_image),
        "heatmap_format": heatmap_format,
    }


@router.post(
    "/score",
    response_model=ScoreResponse,
    summary="Score one or many images",
    responses=ERRORS,
)
async def score(
    registry: RegistryDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    files: Annotated[list[UploadFile], File(description=FILES_DOC, min_length=1)],
    model: ModelRef = None,
    heatmap: Annotated[HeatmapMode, Query(description="Add base64 PNGs: the overlay, the raw normalised map, both")] = "none",
    heatmap_size: Annotated[
        Literal["input", "model"],
        Query(description="Heatmaps at the input's size, or at the model's scale (the map's own resolution; "
                          "the aspect ratio is kept unless the model squashes)"),
    ] = "input",
    heatmap_format: Annotated[HeatmapFormat, Query(description=FORMAT_DOC)] = "png",
):
    t0 = time.perf_counter()
    lm = await registry.get(_model_ref(model))
    images = await _prepare(lm.scorer, files, _outputs(heatmap), heatmap_size, settings, metrics)
    results, queued_s = await registry.score(lm, images, [im.name for im in images],
                                             _options(heatmap, heatmap_size, heatmap_format))
    for r in results:
        metrics.observe_result(lm.ref, float(r.score), bool(r.is_anomaly))
    fmt = heatmap_format if heatmap != "none" else None
    return {
        "model": lm.name,
        "version": lm.version,
        "batch_images": len(results),
        "results": [_result(r, im, queued_s, fmt) for r, im in zip(results, images)],
        "timings_ms": {"total": round((time.perf_counter() - t0) * 1000, 3)},
    }


@router.post(
    "/score/overlay",
    summary="Score one image and get its heatmap as an image (PNG by default; for `curl -o overlay.png`)",
    response_class=Response,
    responses={
        200: {
            "content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}},
            "description": "The image in heatmap_format; the score and decision are in the X-STPM-* headers",
        },
        **ERRORS,
    },
)
async def score_overlay(
    registry: RegistryDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    files: Annotated[list[UploadFile], File(description="Exactly one image", min_length=1, max_length=1)],
    model: ModelRef = None,
    kind: Annotated[Literal["overlay", "map"], Query(description="The blended overlay or the grayscale map")] = "overlay",
    heatmap_size: Annotated[Literal["input", "model"], Query()] = "input",
    heatmap_format: Annotated[HeatmapFormat, Query(description=FORMAT_DOC)] = "png",
) -> Response:
    if len(files) != 1:
        raise APIError(422, "validation_error", f"/score/overlay takes exactly one file in field 'files', got {len(files)}")
    lm = await registry.get(_model_ref(model))
    images = await _prepare(lm.scorer, files, 1, heatmap_size, settings, metrics)
    results, _ = await registry.score(lm, images, [im.name for im in images],
                                      _options(kind, heatmap_size, heatmap_format))
    r = results[0]
    metrics.observe_result(lm.ref, float(r.score), bool(r.is_anomaly))
    image = r.overlay_image if kind == "overlay" else r.map_image
    headers = {
        "X-STPM-Model": lm.ref,
        "X-STPM-Score": f"{float(r.score):.6f}",
        "X-STPM-Raw-Score": f"{float(r.raw_score):.6g}",
        "X-STPM-Threshold": f"{float(r.threshold):.6g}",
        "X-STPM-Is-Anomaly": "true" if r.is_anomaly else "false",
    }
    return Response(image, media_type=MEDIA_TYPES[heatmap_format], headers=headers)
