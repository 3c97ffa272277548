"""POST /score (JSON, many images) and POST /score/overlay (one image -> image/png, jpeg or webp)."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from typing import Annotated, Literal

from fastapi import APIRouter, File, Query, Request, UploadFile
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from app import budget
from app.errors import APIError
from app.multipart import MultipartRoute
from app.registry import ScoreOptions
from app.schemas import ErrorResponse, HeatmapMode, ScoreResponse
from stpm.imaging.decode import ImageDecodeError, decode_image
from stpm.imaging.render import MEDIA_TYPES
from stpm.imaging.geometry import TilingError

router = APIRouter(tags=["score"], route_class=MultipartRoute)

FILES_DOC = "Images (PNG, JPEG, BMP, TIFF, WebP, ...); repeat the field for several. 16-bit, CMYK, palette and alpha are converted."
MODEL_DOC = "`name` (its active version) or `name/vN`; default: the server's default model"

ERRORS = {
    400: {"model": ErrorResponse, "description": "Malformed model name"},
    401: {"model": ErrorResponse, "description": "Missing or wrong API key"},
    404: {"model": ErrorResponse, "description": "Unknown model or version"},
    409: {"model": ErrorResponse, "description": "No model trained yet"},
    413: {"model": ErrorResponse, "description": "Too many files, a file or the request too large, or the request's "
          "images and heatmaps over the pixel budget (max_request_pixels)"},
    422: {"model": ErrorResponse, "description": "A file is not a decodable image within the limits (`invalid_image`), "
          "its size does not fit the model's geometry (`unsupported_image_size`: smaller than one tile at the "
          "model's scale, or more tiles than allowed), or a field is missing"},
    503: {"model": ErrorResponse, "description": "The model could not be loaded"},
}


async def _read_and_decode(
    request: Request, files: list[UploadFile], heatmaps: int, model_pixels: Callable[[int, int], int] | None
) -> tuple[list, list[str], list[float]]:
    """Read, check the pixel budget from the headers, then decode. heatmaps: outputs per image (0-2);
    model_pixels: None when heatmaps are rendered at each input's size, else (width, height) -> the
    pixels of that input's heatmap at the model's scale."""
    s = request.app.state.settings
    metrics = request.app.state.metrics
    if len(files) > s.max_files:
        metrics.rejected.labels("too_many_files").inc()
        raise APIError(
            413, "too_many_files", f"{len(files)} files sent; at most {s.max_files} per request (setting max_files)"
        )
    names: list[str] = []
    blobs: list[bytes] = []
    for i, f in enumerate(files):
        name = f.filename or f"file{i}"
        if f.size is not None and f.size > s.max_upload_bytes:
            metrics.rejected.labels("file_too_large").inc()
            raise APIError(
                413, "file_too_large", f"{name}: {f.size} bytes; at most {s.max_upload_bytes} per file "
                "(setting max_upload_bytes)"
            )
        data = await f.read()
        if len(data) > s.max_upload_bytes:
            metrics.rejected.labels("file_too_large").inc()
            raise APIError(413, "file_too_large", f"{name}: more than {s.max_upload_bytes} bytes")
        names.append(name)
        blobs.append(data)

    sizes = await run_in_threadpool(lambda: [budget.header_size(b) for b in blobs])
    try:
        budget.check(budget.count_pixels(sizes, heatmaps, model_pixels), len(blobs), s.max_request_pixels)
    except APIError:
        metrics.rejected.labels("too_many_pixels").inc()
        raise

    def decode_all():
        arrays, errors, times = [], [], []
        for data, name in zip(blobs, names):
            t0 = time.perf_counter()
            try:
                arrays.append(decode_image(data, name, s.max_pixels))
            except ImageDecodeError as e:
                errors.append({"file": e.name, "reason": e.reason})
            times.append((time.perf_counter() - t0) * 1000)
        return arrays, errors, times

    arrays, errors, times = await run_in_threadpool(decode_all)
    if errors:
        metrics.rejected.labels("invalid_image").inc(len(errors))
        raise APIError(
            422, "invalid_image", "; ".join(f"{e['file']}: {e['reason']}" for e in errors), {"files": errors}
        )
    return arrays, names, times


def _check_geometry(request: Request, scorer, arrays: list, names: list[str]) -> None:
    """422 naming every image the model's tiling cannot cover, before anything is queued (a batch
    shared with other requests must not fail because of one of them)."""
    plan = getattr(scorer, "plan", None)
    if plan is None:  # a scorer without geometry (test doubles)
        return
    errors = []
    for arr, name in zip(arrays, names):
        try:
            plan(arr.shape[0], arr.shape[1])
        except TilingError as e:
            errors.append({"file": name, "reason": str(e)})
    if errors:
        request.app.state.metrics.rejected.labels("unsupported_image_size").inc(len(errors))
        raise APIError(422, "unsupported_image_size", "; ".join(f"{e['file']}: {e['reason']}" for e in errors),
                       {"files": errors})


def _outputs(heatmap: str) -> int:
    """Heatmap images rendered per input."""
    return {"none": 0, "overlay": 1, "map": 1, "both": 2}[heatmap]


def _model_map_pixels(scorer):
    """(width, height) -> pixels of that input's heatmap at the model's scale (its tile plan's scaled size)."""
    plan = getattr(scorer, "plan", None)

    def pixels(width: int, height: int) -> int:
        if plan is None:
            return scorer.image_size * scorer.image_size
        try:
            p = plan(height, width)
        except TilingError:  # refused by the geometry check, with its own message
            return 0
        return p.h * p.w

    return pixels


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


@router.post(
    "/score",
    response_model=ScoreResponse,
    summary="Score one or many images",
    responses=ERRORS,
)
async def score(
    request: Request,
    files: Annotated[list[UploadFile], File(description=FILES_DOC, min_length=1)],
    model: Annotated[str | None, Query(max_length=200, description=MODEL_DOC, examples=["bottle", "bottle/v2"])] = None,
    heatmap: Annotated[HeatmapMode, Query(description="Add base64 PNGs: the overlay, the raw normalised map, both")] = "none",
    heatmap_size: Annotated[
        Literal["input", "model"],
        Query(description="Heatmaps at the input's size, or at the model's scale (the map's own resolution; "
                          "the aspect ratio is kept unless the model squashes)"),
    ] = "input",
    heatmap_format: Annotated[HeatmapFormat, Query(description=FORMAT_DOC)] = "png",
):
    t0 = time.perf_counter()
    registry = request.app.state.registry
    lm = await registry.get(model)
    model_pixels = None if heatmap_size == "input" else _model_map_pixels(lm.scorer)
    arrays, names, decode_ms = await _read_and_decode(request, files, _outputs(heatmap), model_pixels)
    _check_geometry(request, lm.scorer, arrays, names)
    results, queued_s = await registry.score(lm, arrays, names, _options(heatmap, heatmap_size, heatmap_format))
    metrics = request.app.state.metrics
    items = []
    for r, arr, dms in zip(results, arrays, decode_ms):
        metrics.observe_result(lm.ref, float(r.score), bool(r.is_anomaly))
        timings = {"decode": round(dms, 3), "queue": round(queued_s * 1000, 3)}
        timings.update({_TIMING_NAMES.get(k, k): round(float(v), 3) for k, v in (r.timings or {}).items()})
        items.append(
            {
                "file": r.name,
                "raw_score": float(r.raw_score),
                "score": float(r.score),
                "is_anomaly": bool(r.is_anomaly),
                "threshold": float(r.threshold),
                "width": int(arr.shape[1]),
                "height": int(arr.shape[0]),
                "tiles": int(r.tiles),
                "scaled_width": int(r.scaled_size[1]),
                "scaled_height": int(r.scaled_size[0]),
                "timings_ms": timings,
                "overlay_png": _b64(r.overlay_png),
                "map_png": _b64(r.map_png),
                "heatmap_format": heatmap_format if heatmap != "none" else None,
            }
        )
    return {
        "model": lm.name,
        "version": lm.version,
        "batch_images": len(items),
        "results": items,
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
    request: Request,
    files: Annotated[list[UploadFile], File(description="Exactly one image", min_length=1, max_length=1)],
    model: Annotated[str | None, Query(max_length=200, description=MODEL_DOC)] = None,
    kind: Annotated[Literal["overlay", "map"], Query(description="The blended overlay or the grayscale map")] = "overlay",
    heatmap_size: Annotated[Literal["input", "model"], Query()] = "input",
    heatmap_format: Annotated[HeatmapFormat, Query(description=FORMAT_DOC)] = "png",
) -> Response:
    if len(files) != 1:
        raise APIError(422, "validation_error", f"/score/overlay takes exactly one file in field 'files', got {len(files)}")
    registry = request.app.state.registry
    lm = await registry.get(model)
    model_pixels = None if heatmap_size == "input" else _model_map_pixels(lm.scorer)
    arrays, names, _ = await _read_and_decode(request, files, 1, model_pixels)
    _check_geometry(request, lm.scorer, arrays, names)
    results, _ = await registry.score(lm, arrays, names, _options(kind, heatmap_size, heatmap_format))
    r = results[0]
    request.app.state.metrics.observe_result(lm.ref, float(r.score), bool(r.is_anomaly))
    image = r.overlay_png if kind == "overlay" else r.map_png
    headers = {
        "X-STPM-Model": lm.ref,
        "X-STPM-Score": f"{float(r.score):.6f}",
        "X-STPM-Raw-Score": f"{float(r.raw_score):.6g}",
        "X-STPM-Threshold": f"{float(r.threshold):.6g}",
        "X-STPM-Is-Anomaly": "true" if r.is_anomaly else "false",
    }
    return Response(image, media_type=MEDIA_TYPES[heatmap_format], headers=headers)
