"""Every error is JSON `{"error": code, "detail": message}` with the right status (never an HTML page);
the model store's errors mapped onto HTTP (`model_error`, `NoModelError`, `ModelRequiredError`); the job
database out of reach (scaled mode: PostgreSQL restarting or cut off) is a 503 with its reason."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.jobs.store import StoreUnavailable
from app.methods import allowed_methods
from stpm.bundle import (
    BundleError,
    MalformedBundleError,
    ModelNotFoundError,
    NoActiveVersionError,
    StoreNotWritableError,
    VersionInUseError,
)

log = logging.getLogger("app")

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    500: "internal_error",
    503: "unavailable",
    507: "insufficient_storage",
}


class APIError(StarletteHTTPException):
    """An error with a machine-readable code. `extra` is merged into the JSON body."""

    def __init__(
        self,
        status_code: int,
        error: str,
        detail: str,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(status_code=status_code, detail=detail, headers=headers)
        self.error = error
        self.extra = extra or {}


class NoModelError(APIError):
    def __init__(self):
        super().__init__(
            409,
            "no_model",
            "no model has been trained yet (the model store is empty): train one with "
            "`stpm train GOOD_IMAGES_DIR --name NAME` (or POST /train); it is picked up automatically",
        )


class ModelRequiredError(APIError):
    def __init__(self, n_models: int):
        super().__init__(
            400,
            "model_required",
            f"the store holds {n_models} models and the server has no default model: name one with "
            "model=NAME (GET /models lists them), or set STPM_DEFAULT_MODEL",
        )


def model_error(exc: BundleError) -> APIError:
    """Map the store's exceptions onto HTTP: unknown -> 404; nothing activated, or a delete refused because
    the version is active or in use -> 409; a bundle whose manifest is broken, or a store that cannot be
    written -> 503 (the server's content, not the request, is at fault); a malformed reference -> 400."""
    if isinstance(exc, NoActiveVersionError):
        return APIError(409, "no_active_version", str(exc))
    if isinstance(exc, ModelNotFoundError):
        return APIError(404, "model_not_found", str(exc))
    if isinstance(exc, VersionInUseError):
        return APIError(409, "version_in_use", f"{exc} (or pass force=true)")
    if isinstance(exc, MalformedBundleError):
        return APIError(503, "model_unavailable", str(exc))
    if isinstance(exc, StoreNotWritableError):
        return APIError(503, "model_store_not_writable", str(exc))
    return APIError(400, "invalid_model_name", str(exc))


def error_body(status: int, detail: Any, error: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"error": error or _CODES.get(status, "error"), "detail": detail, **extra}


def error_response(status: int, detail: Any, error: str | None = None, headers=None, **extra) -> JSONResponse:
    return JSONResponse(jsonable_encoder(error_body(status, detail, error, **extra)), status, headers=headers)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if isinstance(exc, APIError):
        return error_response(exc.status_code, exc.detail, exc.error, exc.headers, **exc.extra)
    detail = exc.detail
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"no route {request.url.path}"
    headers = getattr(exc, "headers", None)
    if exc.status_code == 405:
        detail = f"method {request.method} is not allowed on {request.url.path}"
        allowed = allowed_methods(request.app.router.routes, request.scope)
        headers = {**(headers or {}), "Allow": ", ".join(allowed)} if allowed else headers
    return error_response(exc.status_code, detail, headers=headers)


def _loc(loc: tuple) -> str:
    return ".".join(str(p) for p in loc)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errs = exc.errors()
    parts = []
    for e in errs:
        loc = tuple(e.get("loc", ()))
        msg = e.get("msg", "invalid")
        if e.get("type") == "missing" and loc[:1] == ("body",) and len(loc) > 1:
            msg = f"missing multipart field {loc[1]!r}"
        elif e.get("type") == "extra_forbidden" and loc[:1] == ("body",) and len(loc) > 1:
            msg = f"unknown field {loc[-1]!r} (see this endpoint's fields in /docs)"
        parts.append(f"{_loc(loc)}: {msg}")
    clean = [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in errs]
    return error_response(422, "; ".join(parts) or "invalid request", "validation_error", errors=clean)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, f"internal error ({type(exc).__name__}); see the server log")


async def _store_unavailable(request: Request, exc: StoreUnavailable) -> JSONResponse:
    log.warning("%s %s: %s", request.method, request.url.path, exc)
    return error_response(503, f"{exc}; retry in a few seconds (scoring does not need the job database)",
                          "job_store_unavailable", headers={"Retry-After": "5"})


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(StoreUnavailable, _store_unavailable)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)
