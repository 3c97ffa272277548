"""Training jobs: POST /train (upload good images, 202 + job id), GET /train[/{id}], DELETE /train/{id}."""

from __future__ import annotations

import re
import shutil
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Form, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from app.deps import JobRunnerDep, JobStoreDep, jobs_of
from app.errors import APIError, model_error
from app.jobs.store import STATES, Job, JobStore, QueueFullError
from app.jobs.uploads import Limits, UploadError, store_upload
from app.jobs.worker import JobRunner
from app.multipart import MultipartRoute
from app.schemas import ErrorResponse, TrainJob, TrainJobList
from app.settings import Settings
from stpm import bundle
from stpm.options import build, form_model, options_of, to_params, training_options

router = APIRouter(prefix="/train", tags=["train"], route_class=MultipartRoute)

JOB_ID_RE = re.compile(r"^[0-9a-f]{32}$")

ERRORS = {
    401: {"model": ErrorResponse, "description": "Missing or wrong API key"},
    404: {"model": ErrorResponse, "description": "No such job"},
    503: {"model": ErrorResponse, "description": "Training is disabled (setting train_enabled)"},
}
MAX_OFFSET = 1_000_000_000
JobId = Annotated[str, PathParam(description="The job id from POST /train (others: 404)",
                                 json_schema_extra={"pattern": JOB_ID_RE.pattern})]

# POST /train offers every training option but those that name the server's own resources (api=False:
# the device, DataLoader workers, a teacher weight file path)
API_OPTIONS = tuple(o for o in training_options() if o.api)


def _engine(request: Request) -> tuple[JobStore, JobRunner]:
    """POST /train's store and runner (its signature is generated: see with_option_fields)."""
    return jobs_of(request.app)


def _public(store: JobStore, job: Job) -> dict:
    return {**job.public(), "queue_position": store.queue_position(job)}


def _get(store: JobStore, job_id: str) -> Job:
    job = store.get(job_id) if JOB_ID_RE.match(job_id) else None
    if job is None:
        raise APIError(404, "job_not_found", f"no training job {job_id!r}")
    return job


def _queue_full(queued: int, limit: int) -> APIError:
    return APIError(429, "queue_full", f"{queued} training jobs are already waiting; at most {limit} (setting "
                    "train_max_queued): retry when one has started", headers={"Retry-After": "60"})


async def _check_room(store: JobStore, s: Settings) -> None:
    """Before the upload is stored: 429 when the queue is full (checked again, under the store's lock, when
    the job is created), 503 when the model store cannot be written (the job could never publish)."""
    queued = await run_in_threadpool(store.list, "queued", s.train_max_queued, 0)
    if len(queued) >= s.train_max_queued:
        raise _queue_full(len(queued), s.train_max_queued)
    try:
        await run_in_threadpool(bundle.check_writable, s.models_dir, "a training job could not publish its model")
    except bundle.BundleError as e:
        raise model_error(e) from None


TrainForm = form_model("TrainForm", {
    "files": (list[UploadFile], Field(..., min_length=1, description="Good images (repeat the field), and/or zip/tar "
                                      "archives of them (.zip, .tar, .tar.gz, .tar.xz, .tgz, .tar.bz2)")),
    "name": (str, Field(..., description="Model name; the job publishes its next version (others: 422)",
                        examples=["bottle"], json_schema_extra={"pattern": bundle.NAME_PATTERN})),
    "activate": (bool, Field(False, description="Make the new version active when the job succeeds")),
}, API_OPTIONS)


@router.post(
    "",
    status_code=202,
    response_model=TrainJob,
    summary="Train a new model version on uploaded good images (runs in the background)",
    responses={
        **ERRORS,
        413: {"model": ErrorResponse, "description": "Request, an image, an archive or the image count over the limit"},
        429: {"model": ErrorResponse, "description": "The training queue is full (train_max_queued); retry later"},
        503: {"model": ErrorResponse, "description": "Training is disabled, or the model store cannot be written"},
        422: {"model": ErrorResponse, "description": "A file is not a decodable image (all named in `files`), too "
              "few images, a bad parameter, or an unknown form field"},
        507: {"model": ErrorResponse, "description": "Disk full while storing the upload (nothing stored)"},
    },
)
async def submit(request: Request, form: Annotated[TrainForm, Form(media_type="multipart/form-data")]):
    store, runner = _engine(request)
    s = request.app.state.settings
    try:
        bundle.check_name(form.name)
    except bundle.BundleError as e:
        raise APIError(422, "invalid_name", str(e)) from None
    try:
        config = build(options_of(form, API_OPTIONS))
    except ValueError as e:
        raise APIError(422, "invalid_parameter", str(e)) from None
    if config.train.epochs > s.train_max_epochs:
        raise APIError(422, "invalid_parameter", f"epochs={config.train.epochs}: at most {s.train_max_epochs} "
                       "(setting train_max_epochs)")
    await _check_room(store, s)
    params: dict[str, Any] = {**to_params(config), "activate": form.activate}
    params["train"].pop("device")  # the server's setting (train_device), not the client's
    limits = Limits(s.train_min_images, s.train_max_images, s.max_upload_bytes, s.train_max_archive_bytes,
                    s.max_pixels)
    job_id = uuid.uuid4().hex
    jobs_root = s.jobs_data_dir / "jobs"
    uploads = [(f.filename or f"file{i}", f.file) for i, f in enumerate(form.files)]
    try:
        stored = await run_in_threadpool(store_upload, uploads, jobs_root, job_id, limits)
    except UploadError as e:
        request.app.state.metrics.rejected.labels(e.error).inc(max(1, len(e.files)))
        raise APIError(e.status, e.error, e.detail, {"files": e.files} if e.files else None) from None
    n = len(stored.images)
    val_fraction = config.train.val_fraction
    n_val = max(1, round(n * val_fraction))
    if n - n_val < 1:
        shutil.rmtree(stored.job_dir, ignore_errors=True)
        raise APIError(422, "invalid_parameter", f"val_fraction={val_fraction} leaves no training image out of {n}")
    try:
        job = await run_in_threadpool(store.create, job_id, form.name, params, stored.job_dir, n, stored.fingerprint,
                                      s.train_max_queued)  # counted and inserted under one lock
    except BaseException as e:
        shutil.rmtree(stored.job_dir, ignore_errors=True)
        if isinstance(e, QueueFullError):
            raise _queue_full(e.queued, e.limit) from None
        raise
    await run_in_threadpool(runner.submit, job_id)  # Celery: a round trip to the broker
    return JSONResponse(_public(store, job), status_code=202, headers={"Location": f"/train/{job_id}"})


@router.get("", response_model=TrainJobList, summary="Training jobs, newest first", responses=ERRORS)
async def list_jobs(
    store: JobStoreDep,
    state: Annotated[Literal[STATES] | None, Query(description="Only jobs in this state")] = None,  # type: ignore[valid-type]
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
):
    def work():
        return {"jobs": [_public(store, j) for j in store.list(state, limit, offset)]}

    return await run_in_threadpool(work)


@router.get("/{job_id}", response_model=TrainJob, summary="One job: state, progress, error, resulting version",
            responses=ERRORS)
async def get_job(store: JobStoreDep, job_id: JobId):
    return _public(store, await run_in_threadpool(_get, store, job_id))


@router.delete(
    "/{job_id}",
    response_model=TrainJob,
    summary="Cancel a queued job (200, cancelled at once) or a running one (202, stops within seconds)",
    responses={**ERRORS, 202: {"model": TrainJob, "description": "Running: cancel requested"},
               409: {"model": ErrorResponse, "description": "The job has already finished"}},
)
async def cancel_job(store: JobStoreDep, runner: JobRunnerDep, job_id: JobId):
    job = await run_in_threadpool(_get, store, job_id)
    if job.finished:
        raise APIError(409, "job_finished", f"job {job_id} has already finished ({job.state}); nothing to cancel")
    job = await run_in_threadpool(runner.cancel, job_id)
    status = 202 if job.state == "running" else 200
    return JSONResponse(_public(store, job), status_code=status)
