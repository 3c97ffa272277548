"""Response models (documented in OpenAPI with real examples)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

HeatmapMode = Literal["none", "overlay", "map", "both"]


class FieldError(BaseModel):
    loc: list[str | int] = Field(description="Where: e.g. [\"query\", \"offset\"] or [\"body\", \"files\"]")
    msg: str
    type: str


class FileError(BaseModel):
    file: str = Field(description="The uploaded file (archive:member for archive contents)")
    reason: str


class ErrorResponse(BaseModel):
    """Every error the service answers (4xx and 5xx), 422 validation errors included."""

    error: str = Field(description="Machine-readable code")
    detail: str = Field(description="What went wrong and what to do")
    errors: list[FieldError] | None = Field(None, description="validation_error: every invalid field")
    files: list[FileError] | None = Field(None, description="invalid_image / invalid_upload: every bad file")
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "error": "invalid_image",
                    "detail": "broken.png: cannot decode (OSError: image file is truncated)",
                    "files": [{"file": "broken.png", "reason": "cannot decode (OSError: image file is truncated)"}],
                }
            ]
        },
        extra="allow",
    )


class ScoreItem(BaseModel):
    file: str = Field(description="The uploaded file name")
    raw_score: float = Field(description="The image score from its stitched anomaly map (the model's "
                             "`image_score`: max or top-k mean), in the model's own units")
    score: float = Field(ge=0, le=1, description="Normalised score in [0, 1]; 0.5 is the decision threshold")
    is_anomaly: bool
    threshold: float = Field(description="The raw-score threshold used (normalised: always 0.5)")
    width: int = Field(description="Input width in pixels (after EXIF orientation)")
    height: int
    tiles: int = Field(1, description="Model tiles the image was covered with at the model's scale")
    scaled_width: int | None = Field(None, description="Width of the image at the model's scale: the anomaly map's "
                                     "own resolution (what heatmap_size=model returns)")
    scaled_height: int | None = None
    timings_ms: dict[str, float] = Field(description="decode, queue and the scorer's own stages")
    overlay_png: str | None = Field(None, description="Base64 image in `heatmap_format` (PNG by default; the field "
                                    "name is historical): the image with the heatmap blended on top")
    map_png: str | None = Field(None, description="Base64 image in `heatmap_format`: the normalised anomaly map "
                                "as grayscale")
    heatmap_format: str | None = Field(None, description="png, jpeg or webp: the encoding of overlay_png / map_png")


class ScoreResponse(BaseModel):
    model: str
    version: str
    batch_images: int = Field(description="Images in this request")
    results: list[ScoreItem] = Field(description="One per uploaded file, in upload order")
    timings_ms: dict[str, float]

    model_config = ConfigDict(
        protected_namespaces=(),
        json_schema_extra={
            "examples": [
                {
                    "model": "bottle",
                    "version": "v3",
                    "batch_images": 2,
                    "results": [
                        {
                            "file": "good_000.png",
                            "raw_score": 0.0312,
                            "score": 0.21,
                            "is_anomaly": False,
                            "threshold": 0.0544,
                            "width": 512,
                            "height": 512,
                            "tiles": 1,
                            "scaled_width": 256,
                            "scaled_height": 256,
                            "timings_ms": {"decode": 3.1, "queue": 0.4, "preprocess": 1.2, "inference": 38.5, "render": 0.0},
                            "overlay_png": None,
                            "map_png": None,
                        },
                        {
                            "file": "broken_large_000.png",
                            "raw_score": 0.1911,
                            "score": 1.0,
                            "is_anomaly": True,
                            "threshold": 0.0544,
                            "width": 512,
                            "height": 512,
                            "tiles": 1,
                            "scaled_width": 256,
                            "scaled_height": 256,
                            "timings_ms": {"decode": 3.0, "queue": 0.4, "preprocess": 1.2, "inference": 38.5, "render": 0.0},
                            "overlay_png": None,
                            "map_png": None,
                        },
                    ],
                    "timings_ms": {"total": 52.7},
                }
            ]
        },
    )


class VersionInfo(BaseModel):
    version: str
    active: bool = Field(description="The version `name` resolves to")
    loaded: bool = Field(description="Held in memory by this server process")
    created_at: str | None = None
    threshold: float | None = None
    calibration: dict[str, Any] | None = Field(None, description="What the threshold promises: the rule and its "
                                               "target, the false-positive rate on good parts to expect (with an "
                                               "interval), the recall on synthetic anomalies, how many images each "
                                               "came from; `metrics` holds what a labelled test set showed")
    image_size: int | None = None
    backbone: str | None = None
    metrics: dict[str, Any] | None = None
    precisions: dict[str, str] | None = Field(None, description="Per precision: `available`, or why the bundle "
                                              "does not offer it (file missing, parity not held)")
    inference: dict[str, Any] | None = Field(None, description="When loaded: backend, precision, why, batching")
    model_config = ConfigDict(protected_namespaces=())


class ModelSummary(BaseModel):
    name: str
    active_version: str | None
    default: bool = Field(description="Used by /score when the request names no model")
    versions: list[VersionInfo]

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "bottle",
                    "active_version": "v2",
                    "default": True,
                    "versions": [
                        {"version": "v1", "active": False, "loaded": False, "created_at": "2025-05-01T10:00:00+00:00",
                         "threshold": 0.061, "image_size": 256, "backbone": "resnet18", "metrics": None},
                        {"version": "v2", "active": True, "loaded": True, "created_at": "2025-05-02T09:30:00+00:00",
                         "threshold": 0.0544, "image_size": 256, "backbone": "resnet18",
                         "metrics": {"image_auroc": 0.998, "pixel_auroc": 0.981}},
                    ],
                }
            ]
        }
    )


class ModelList(BaseModel):
    default_model: str | None = Field(description="What /score uses without `model`")
    models: list[ModelSummary]


class ModelDetail(ModelSummary):
    manifest: dict[str, Any] = Field(description="The active version's manifest.json")


class VersionDetail(VersionInfo):
    name: str
    manifest: dict[str, Any]


class ActivateResponse(BaseModel):
    name: str
    active_version: str
    previous_version: str | None
    loaded: bool


class DeleteResponse(BaseModel):
    name: str
    deleted_version: str
    active_version: str | None = Field(description="What `name` resolves to now (None: no versions left)")


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    uptime_s: float
    replica: str | None = Field(None, description="Which replica answered (setting replica_name, default HOST:PORT)")
    model_config = ConfigDict(json_schema_extra={"examples": [{"status": "ok", "uptime_s": 12.5, "replica": "api-1:8000"}]})


class Ready(BaseModel):
    ready: bool
    model: str | None = None
    version: str | None = None
    warm: bool | None = None
    providers: list[str] | None = None
    load_seconds: float | None = None
    backend: str | None = Field(None, description="Inference backend in use (onnxruntime, openvino)")
    precision: str | None = Field(None, description="Precision in use (fp32, fp16, bf16, int8)")
    selection: dict[str, Any] | None = Field(None, description="What was asked, what runs and why: the "
                                             "candidates' timings under auto, fallback warnings")
    batch_max_images: int | None = None
    batch_wait_ms: float | None = None
    error: str | None = None
    detail: str | None = None
    model_config = ConfigDict(
        protected_namespaces=(),
        json_schema_extra={
            "examples": [
                {"ready": True, "model": "bottle", "version": "v2", "warm": True,
                 "providers": ["CPUExecutionProvider"], "load_seconds": 0.41}
            ]
        },
    )


class TrainJob(BaseModel):
    """A training job (POST /train, GET /train/{id})."""

    job_id: str
    name: str = Field(description="The model the job publishes a new version of")
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    params: dict[str, Any] = Field(description="model / train / calibration configuration and `activate`")
    progress: dict[str, Any] | None = Field(
        None, description="phase, epoch, epochs, step, steps, loss, val_loss, best_val_loss, eta_s, elapsed_s"
    )
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    updated_at: str
    error: str | None = Field(None, description="Why it failed or was cancelled (or a note on success)")
    version: str | None = Field(None, description="The published version when succeeded")
    model: str | None = Field(None, description="NAME/VERSION to pass to /score?model=")
    activated: bool
    n_images: int
    uploads_kept: bool
    cancel_requested: bool
    queue_position: int | None = Field(None, description="1 = runs next (queued jobs only)")
    worker: str | None = Field(None, description="Who runs or ran it: the server's host, or a Celery worker")
    model_config = ConfigDict(
        protected_namespaces=(),
        json_schema_extra={
            "examples": [
                {"job_id": "3f2c9a0e8b7d4c1a9e6f5d4c3b2a1908", "name": "bottle", "state": "running",
                 "params": {"model": {"backbone": "resnet18", "image_size": 256}, "train": {"epochs": 100},
                            "activate": True},
                 "progress": {"phase": "training", "epoch": 3, "epochs": 100, "step": 5, "steps": 6,
                              "loss": 0.812, "val_loss": 0.9, "best_val_loss": 0.9, "eta_s": 410.2,
                              "elapsed_s": 13.1},
                 "created_at": "2025-05-02T09:30:00.000+00:00", "started_at": "2025-05-02T09:30:00.200+00:00",
                 "finished_at": None, "updated_at": "2025-05-02T09:30:13.300+00:00", "error": None,
                 "version": None, "model": None, "activated": False, "n_images": 209, "uploads_kept": True,
                 "cancel_requested": False, "queue_position": None}
            ]
        },
    )


class TrainJobList(BaseModel):
    jobs: list[TrainJob] = Field(description="Newest first")
