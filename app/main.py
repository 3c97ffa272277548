"""The FastAPI app: `create_app(settings)` builds one; `uvicorn app.main:create_app --factory` serves one.

Extension points for later features (training jobs, the web page):
* routers live in ``app/routes/`` and are included in :func:`create_app` (``ROUTERS``);
* ``app.state.settings``, ``app.state.registry`` (:class:`app.registry.ModelRegistry`),
  ``app.state.metrics`` (:class:`app.metrics.Metrics`): handlers get them as dependencies
  (``app.deps``: ``registry: RegistryDep`` ...), never from ``request.app.state``;
* ``app.state.public_paths`` / ``app.state.public_prefixes``: paths served without the API key;
* ``app.state.startup_hooks`` / ``app.state.shutdown_hooks``: async callables ``hook(app)`` run in the
  lifespan after the registry starts / before it stops (e.g. a job worker).

Nothing here imports torch: scoring runs on stpm.runtime (onnxruntime + numpy + Pillow).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import sys
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from app.errors import install_error_handlers
from app.methods import MethodsMiddleware
from app.metrics import Metrics
from app.middleware import APIKeyMiddleware, MetricsMiddleware, RequestLimitMiddleware
from app.registry import ModelRegistry
from app.routes import health, models, score, train, ui
from app.settings import Settings

log = logging.getLogger("app")

ROUTERS = (health.router, score.router, models.router, ui.router, train.router)

DESCRIPTION = """
Unsupervised visual anomaly detection (STPM). POST images to `/score` to get, for each, a score in
[0, 1] (0.5 = the calibrated threshold), a decision and optionally a heatmap.

Errors are JSON `{"error": code, "detail": message}`. When the server has an API key, send it as
`X-API-Key: KEY` or `Authorization: Bearer KEY` (every route but `/healthz` and `/readyz`).
"""


MALLOC_ARENAS = 2


def limit_malloc_arenas(n: int = MALLOC_ARENAS) -> bool:
    """glibc: at most `n` malloc arenas (M_ARENA_MAX) for the threads created from now on.

    Images are decoded in Starlette's thread pool and scored on the inference threads; with glibc's
    default (8 arenas per core) every thread gets its own heap, and the freed memory of a large request
    stays resident in them (measured: 687 MB after one 40 Mpx request vs 179 MB with 2 arenas,
    benchmarks/memory.py). The same as MALLOC_ARENA_MAX=2, set from inside. -> whether it applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(-8, n))  # M_ARENA_MAX
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to do
        return False


def create_app(
    settings: Settings | None = None,
    *,
    scorer_factory: Callable[[Path], Any] | None = None,
) -> FastAPI:
    """Build the app. `scorer_factory(bundle_dir)` overrides how scorers are made (tests, benchmarks)."""
    settings = settings or Settings()
    limit_malloc_arenas()
    metrics = Metrics(replica=settings.replica)
    app = FastAPI(
        title="STPM anomaly detection",
        version=_version(),
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    _set_state(app, settings, metrics, ModelRegistry(settings, metrics, scorer_factory))
    if settings.train_enabled:
        from app.jobs import install as install_jobs

        install_jobs(app)  # POST /train: job store + training worker (lifespan hooks)
    install_error_handlers(app)
    for r in ROUTERS:
        app.include_router(r)
    app.add_middleware(MethodsMiddleware, routes=app.router.routes)  # innermost: HEAD / OPTIONS after the key
    # Added last = outermost: metrics see every answer, including 401 and 413.
    if settings.api_key is not None:
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key.get_secret_value(), state=app.state)
    app.add_middleware(RequestLimitMiddleware, max_bytes=settings.max_request_bytes,
                       body_timeout_s=settings.body_timeout_s, body_deadline_s=settings.body_deadline_s)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.openapi = functools.partial(_openapi, app, settings)  # type: ignore[method-assign]
    return app


def _set_state(app: FastAPI, settings: Settings, metrics: Metrics, registry: ModelRegistry) -> None:
    """What the routes read through app.deps, and what the middleware and lifespan hooks use."""
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.registry = registry
    app.state.started_at = time.time()
    app.state.public_paths = {"/healthz", "/readyz", *ui.PUBLIC_PATHS}  # the web page asks for the key itself
    app.state.public_prefixes = [*ui.PUBLIC_PREFIXES]
    app.state.startup_hooks = []
    app.state.shutdown_hooks = []
    if settings.public_docs:
        app.state.public_paths |= {"/docs", "/docs/oauth2-redirect", "/openapi.json"}


@asynccontextmanager
async def lifespan(app: FastAPI):
    """Start the registry, then the startup hooks; on shutdown the hooks in reverse, then the registry."""
    registry: ModelRegistry = app.state.registry
    await registry.start()
    for hook in app.state.startup_hooks:
        await hook(app)
    try:
        yield
    finally:
        for hook in reversed(app.state.shutdown_hooks):
            try:
                await hook(app)
            except Exception:
                log.exception("shutdown hook failed")
        await registry.stop()


def _openapi(app: FastAPI, settings: Settings) -> dict:
    """The spec, built once: FastAPI's, with every error documented and the API key's schemes."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        document_errors(schema, keyed=settings.api_key is not None, public=app.state.public_paths)
        forms_without_null(schema)
        if settings.api_key is not None:
            schema.setdefault("components", {})["securitySchemes"] = {
                "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "Bearer": {"type": "http", "scheme": "bearer"},
            }
            schema["security"] = [{"ApiKey": []}, {"Bearer": []}]
            for path in app.state.public_paths & set(schema.get("paths", {})):
                for op in schema["paths"][path].values():
                    op["security"] = []  # public: answered without the key (probes, the page)
        app.openapi_schema = schema
    return app.openapi_schema


def forms_without_null(schema: dict) -> None:
    """A multipart form field cannot be null (left out, it takes its default): the `null` branch pydantic
    gives an optional field is dropped from the form schemas, so clients do not send the text `null`."""
    comps = schema.get("components", {}).get("schemas", {})
    for ops in schema.get("paths", {}).values():
        for op in ops.values():
            form = op.get("requestBody", {}).get("content", {}).get("multipart/form-data", {}).get("schema", {})
            target = comps.get(form.get("$ref", "").rsplit("/", 1)[-1], form)
            for prop in target.get("properties", {}).values():
                branches = [b for b in prop.get("anyOf", []) if b.get("type") != "null"]
                if "anyOf" in prop and len(branches) == 1:
                    del prop["anyOf"]
                    prop.update(branches[0])
                elif "anyOf" in prop:
                    prop["anyOf"] = branches


ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
BODY_ERRORS = {
    "400": "Malformed request, Content-Length, multipart body or boundary",
    "408": "The request body stalled (setting body_timeout_s) or took too long (setting body_deadline_s)",
    "413": "The request body over the limit (setting max_request_bytes)",
    "415": "Not multipart/form-data",
    "507": "The server's temporary storage for uploads is full",
}


def document_errors(schema: dict, keyed: bool, public: set[str]) -> None:
    """Make the spec say what the server answers: every error is `ErrorResponse` (422 included, not
    FastAPI's HTTPValidationError); routes with a body can answer 400/408/413/415; with an API key every
    non-public route can answer 401."""
    comps = schema.setdefault("components", {}).setdefault("schemas", {})
    for path, ops in schema.get("paths", {}).items():
        for op in ops.values():
            responses = op.setdefault("responses", {})
            extra: dict[str, str] = {}
            if "requestBody" in op:
                extra.update(BODY_ERRORS)
            if op.get("parameters") or "requestBody" in op:
                extra["422"] = "A parameter or field is invalid"
            if keyed and path not in public:
                extra["401"] = "Missing or wrong API key"
            for code, text in extra.items():
                responses.setdefault(code, {"description": text})
            for code, resp in responses.items():
                if not code.startswith(("4", "5")):
                    continue
                content = resp.get("content", {}).get("application/json", {})
                ref = content.get("schema", {}).get("$ref", "")
                if not content or ref.endswith("/HTTPValidationError"):
                    resp["content"] = {"application/json": {"schema": dict(ERROR_REF)}}
    for unused in ("HTTPValidationError", "ValidationError"):
        comps.pop(unused, None)


def _version() -> str:
    try:
        import importlib.metadata as md

        return md.version("stpm")
    except Exception:  # noqa: BLE001
        return "0"


def __getattr__(name: str):
    """`app.main.app`: built on first access from the environment (for `uvicorn app.main:app`)."""
    if name == "app":
        global app
        app = create_app()
        return app
    raise AttributeError(name)
