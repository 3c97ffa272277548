"""Training jobs: POST /train (upload good images, 202 + job id), GET /train[/{id}], DELETE /train/{id}."""

from __future__ import annotations

import inspect
import re
import shutil
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from app.deps import JobRunnerDep, JobStoreDep, jobs_of
from app.errors import APIError
from app.jobs.store import STATES, Job, JobStore
from app.jobs.uploads import Limits, UploadError, store_upload
from app.jobs.worker import JobRunner
from app.multipart import MultipartRoute
from app.schemas import ErrorResponse, TrainJob, TrainJobList
from stpm import bundle
from stpm.options import to_params
from stpm.options import TrainingOption, build, training_options

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


async def submit(
    request: Request,
    files: Annotated[list[UploadFile], File(description="Good images (repeat the field), and/or zip/tar archives "
                                                        "of them (.zip, .tar, .tar.gz, .tar.xz, .tgz, .tar.bz2)",
                                            min_length=1)],
    name: Annotated[str, Form(description="Model name; the job publishes its next version (others: 422)",
                              examples=["bottle"], json_schema_extra={"pattern": bundle.NAME_PATTERN})],
    *,
    activate: Annotated[bool, Form(description="Make the new version active when the job succeeds")] = False,
    **options: Any,  # the training options: one keyword per API_OPTIONS entry (see with_option_fields)
):
    store, runner = _engine(request)
    s = request.app.state.settings
    try:
        bundle.check_name(name)
    except bundle.BundleError as e:
        raise APIError(422, "invalid_name", str(e)) from None
    try:
        config = build(options)
    except ValueError as e:
        raise APIError(422, "invalid_parameter", str(e)) from None
    if config.train.epochs > s.train_max_epochs:
        raise APIError(422, "invalid_parameter", f"epochs={config.train.epochs}: at most {s.train_max_epochs} "
                       "(setting train_max_epochs)")
    queued = await run_in_threadpool(store.list, "queued", s.train_max_queued, 0)
    if len(queued) >= s.train_max_queued:
        raise APIError(429, "queue_full", f"{len(queued)} training jobs are already waiting; at most "
                       f"{s.train_max_queued} (setting train_max_queued): retry when one has started",
                       headers={"Retry-After": "60"})
    params: dict[str, Any] = {**to_params(config), "activate": activate}
    params["train"].pop("device")  # the server's setting (train_device), not the client's
    limits = Limits(s.train_min_images, s.train_max_images, s.max_upload_bytes, s.train_max_archive_bytes,
                    s.max_pixels)
    job_id = uuid.uuid4().hex
    jobs_root = s.jobs_data_dir / "jobs"
    uploads = [(f.filename or f"file{i}", f.file) for i, f in enumerate(files)]
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
        job = await run_in_threadpool(store.create, job_id, name, params, stored.job_dir, n, stored.fingerprint)
    except BaseException:
        shutil.rmtree(stored.job_dir, ignore_errors=True)
        raise
    await run_in_threadpool(runner.submit, job_id)  # Celery: a round trip to the broker
    return JSONResponse(_public(store, job), status_code=202, headers={"Location": f"/train/{job_id}"})


def _form_field(o: TrainingOption) -> inspect.Parameter:
    """One training option as a form field: its type (choices as an enum), default, bounds and help."""
    tp: Any = str if o.many else (Literal[o.choices] if o.choices else o.kind)  # type: ignore[valid-type]
    if o.optional:
        tp = tp | None
    limits = {k: v for k, v in (("ge", o.ge), ("gt", o.gt), ("le", o.le), ("lt", o.lt)) if v is not None}
    if o.kind is float and not o.many:
        limits["allow_inf_nan"] = False
    help = o.help + (" (comma-separated)" if o.many else "")
    default = ",".join(o.default) if o.many else o.default
    return inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[tp, Form(description=help, **limits)])


def with_option_fields(endpoint, options: tuple[TrainingOption, ...]):
    """The endpoint's signature as FastAPI reads it: its own fields, then one per training option
    (generated from stpm.config, so a new option is a new field here and in the OpenAPI at once). The
    endpoint takes the options as keywords (`**options`) and hands them to stpm.options.build."""
    sig = inspect.signature(endpoint, eval_str=True)
    own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    endpoint.__signature__ = sig.replace(parameters=own + [_form_field(o) for o in options])
    return endpoint


router.post(
    "",
    status_code=202,
    response_model=TrainJob,
    summary="Train a new model version on uploaded good images (runs in the background)",
    responses={
        **ERRORS,
        413: {"model": ErrorResponse, "description": "Request, an image, an archive or the image count over the limit"},
        429: {"model": ErrorResponse, "description": "The training queue is full (train_max_queued); retry later"},
        422: {"model": ErrorResponse, "description": "A file is not a decodable image (all named in `files`), too "
              "few images, or a bad parameter"},
        507: {"model": ErrorResponse, "description": "Disk full while storing the upload (nothing stored)"},
    },
)(with_option_fields(submit, API_OPTIONS))


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
