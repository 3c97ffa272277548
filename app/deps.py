"""The app's shared state as FastAPI dependencies: a handler names what it needs in its signature
(`registry: RegistryDep`, `settings: SettingsDep`, ...) instead of looking it up on `request.app.state`.

`create_app` (app/main.py) puts the objects on `app.state`, and the job store and runner are added by
`app.jobs.install`'s start hook (training enabled); this module is the one place that reads them back. Tests may
swap any of them through `app.dependency_overrides`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, FastAPI, Request

from app.errors import APIError
from app.jobs.store import JobStore
from app.jobs.worker import JobRunner
from app.metrics import Metrics
from app.registry import ModelRegistry
from app.settings import Settings


def jobs_of(app: FastAPI) -> tuple[JobStore, JobRunner]:
    """The job store and runner; 503 when training is disabled or the store has not started."""
    store = getattr(app.state, "job_store", None)
    runner = getattr(app.state, "job_runner", None)
    if store is None or runner is None:
        raise APIError(503, "training_unavailable", "training jobs are disabled (setting train_enabled) or the job "
                       "store has not started")
    return store, runner


# async: FastAPI would run a plain `def` dependency on its thread pool, for an attribute lookup.
async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def get_registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


async def get_started_at(request: Request) -> float:
    """When the app was built (time.time())."""
    return request.app.state.started_at


async def get_job_store(request: Request) -> JobStore:
    return jobs_of(request.app)[0]


async def get_job_runner(request: Request) -> JobRunner:
    return jobs_of(request.app)[1]


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
StartedAtDep = Annotated[float, Depends(get_started_at)]
JobStoreDep = Annotated[JobStore, Depends(get_job_store)]
JobRunnerDep = Annotated[JobRunner, Depends(get_job_runner)]
