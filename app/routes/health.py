"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from app.deps import MetricsDep, RegistryDep, SettingsDep, StartedAtDep
from app.middleware import has_valid_key
from app.schemas import ErrorResponse, Health, Ready

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, response_model_exclude_none=True,
            summary="Liveness: the process answers",
            description="Public. When the server has an API key, `replica` (host and port) is shown only to "
            "requests that send the key.")
async def healthz(request: Request, started_at: StartedAtDep, settings: SettingsDep) -> Health:
    key = settings.api_key
    private = key is not None and not has_valid_key(request.scope["headers"], key.get_secret_value())
    return Health(uptime_s=round(time.time() - started_at, 3), replica=None if private else settings.replica)


@router.get(
    "/readyz",
    response_model=Ready,
    summary="Readiness: the default model is loaded and a warm-up inference passed",
    description="Public. When the server has an API key, a request without it gets only `ready`; the "
    "model, its version, providers and any error are shown to requests that send the key.",
    responses={503: {"model": Ready, "description": "No model yet, or it failed to load"}},
)
async def readyz(request: Request, registry: RegistryDep, settings: SettingsDep):
    ok, info = await registry.readiness()
    key = settings.api_key
    if key is not None and not has_valid_key(request.scope["headers"], key.get_secret_value()):
        info = {}  # the probe's answer only: what is loaded stays private
    body = Ready(ready=ok, **info).model_dump(exclude_none=True)
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}, 401: {"model": ErrorResponse}},
)
async def metrics(prometheus: MetricsDep) -> Response:
    body = await run_in_threadpool(prometheus.render)  # the job-state gauge reads the job store
    return Response(body, media_type=prometheus.content_type)
