"""Loaded scorers per model version, the default model, hot reload, and micro-batching.

* Resolution is done on every request against the model store (a directory listing and a few stats,
  well under a millisecond), so a newly published or activated version is used by the very next
  request; a background poll (``reload_interval_s``) loads and warms it before that request arrives.
* The default model (requests without ``model``): ``settings.default_model`` if set, else the only
  model name in the store; with several names and no setting, a request must name one (400).
  A name serves only its activated version (see stpm.bundle).
* The cache of loaded scorers is keyed by name/version and checked against the bundle on disk at
  every request (the manifest's inode and mtime): a deleted or replaced bundle is never served.
* Each loaded version owns a :class:`app.batcher.Batcher` (micro-batching of its requests on the
  registry's inference and render thread pools). Versions that are no longer active, not used for
  ``IDLE_UNLOAD_S`` and not serving a request are unloaded; so are deleted ones.

State is touched from the event loop and from loader threads; a lock guards the tables.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.batcher import Batcher, ScoreOptions, wait_quietly
from app.errors import APIError, ModelRequiredError, NoModelError, model_error
from app.metrics import Metrics
from app.settings import Settings
from stpm import bundle
from stpm.bundle import BundleError, ModelNotFoundError
from stpm.bundle.manifest import Manifest

log = logging.getLogger("app.registry")

IDLE_UNLOAD_S = 60.0
SCORER_MAX_BATCH = 16  # tiles per graph run inside a scorer


def _identity(path: Path) -> tuple[int, int, int] | None:
    """What a loaded bundle is checked against: its manifest's device, inode and mtime."""
    try:
        st = os.stat(path / bundle.MANIFEST)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns)


@dataclass
class LoadedModel:
    name: str
    version: str
    path: Path
    scorer: Any
    manifest: Manifest
    batcher: Batcher
    loaded_at: float
    load_seconds: float
    warm: bool
    identity: tuple[int, int, int] | None = None  # the manifest it was loaded from (see _identity)
    in_use: int = 0
    last_used: float = field(default_factory=time.monotonic)
    retired: str | None = None  # why it left the table (deleted, replaced); closed when its last request ends

    @property
    def ref(self) -> str:
        return f"{self.name}/{self.version}"


def default_scorer_factory(settings: Settings) -> Callable[[Path], Any]:
    def make(path: Path):
        from stpm.runtime.scorer import Scorer  # imported lazily: onnxruntime, never torch

        return Scorer(
            path,
            providers=tuple(settings.providers),
            intra_op_threads=settings.intra_op_threads,
            inter_op_threads=settings.inter_op_threads,
            precision=settings.precision,
            backend=settings.backend,
            max_pixels=settings.max_pixels,
            max_batch=settings.batch_max_images or SCORER_MAX_BATCH,
            fall_back_to_fp32=True,  # a precision the version lacks (e.g. made by POST /train) serves fp32, warned
        )

    return make


class ModelRegistry:
    """The service's view of the model store. Create one per app; stored on ``app.state.registry``."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        scorer_factory: Callable[[Path], Any] | None = None,
    ):
        self.settings = settings
        self.models_dir = Path(settings.models_dir)
        self.metrics = metrics
        self.scorer_factory = scorer_factory or default_scorer_factory(settings)
        self.executor = ThreadPoolExecutor(max_workers=settings.inference_threads, thread_name_prefix="stpm-infer")
        self.render_executor = ThreadPoolExecutor(max_workers=settings.render_threads, thread_name_prefix="stpm-render")
        self._loaded: dict[tuple[str, str], LoadedModel] = {}
        self._load_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._lock = threading.RLock()
        self._poller: asyncio.Task | None = None
        self.last_error: str | None = None  # the last load failure, shown by /readyz
        self.on_change: list[Callable[[str, str, str], None]] = []  # hooks: (event, name, version)

    # ----- resolution (cheap, synchronous) -----

    def default_name(self) -> str | None:
        """The model name used without `model`: the setting, else the only name; None when there is none
        or several (a request must then name one)."""
        if self.settings.default_model:
            return bundle.parse_ref(self.settings.default_model)[0]
        names = bundle.list_models(self.models_dir)
        return names[0] if len(names) == 1 else None

    def default_ref(self) -> str:
        """The reference a request without `model` means. Raises NoModelError (409, empty store) or
        ModelRequiredError (400, several names and no STPM_DEFAULT_MODEL)."""
        if self.settings.default_model:
            return self.settings.default_model
        names = bundle.list_models(self.models_dir)
        if not names:
            raise NoModelError()
        if len(names) > 1:
            raise ModelRequiredError(len(names))
        return names[0]

    def resolve(self, ref: str | None) -> tuple[str, str]:
        """'name' | 'name/vN' | None (the default) -> (name, version). Raises APIError 400/404/409."""
        if ref is None or not ref.strip():
            ref = self.default_ref()
        try:
            path = bundle.resolve(self.models_dir, ref)
        except BundleError as e:
            if isinstance(e, ModelNotFoundError) and not bundle.list_models(self.models_dir):
                raise NoModelError() from None
            raise model_error(e) from None
        return path.parent.name, path.name

    def redact(self, text: str) -> str:
        """A message for API clients: the model store's location removed (bundle paths become name/vN)."""
        for root in {str(self.models_dir.resolve()), str(self.models_dir)}:
            text = text.replace(root + os.sep, "").replace(root, "<models>")
        return text

    # ----- loading -----

    def loaded(self) -> list[LoadedModel]:
        with self._lock:
            return list(self._loaded.values())

    def peek(self, name: str, version: str) -> LoadedModel | None:
        with self._lock:
            return self._loaded.get((name, version))

    async def get(self, ref: str | None) -> LoadedModel:
        """Resolve and return a loaded, warmed-up model, loading it (off the event loop) if needed."""
        name, version = self.resolve(ref)
        return await self.load(name, version)

    async def load(self, name: str, version: str) -> LoadedModel:
        key = (name, version)
        identity = _identity(self.models_dir / name / version)
        lm = self.peek(name, version)
        if lm is not None and lm.identity == identity:
            lm.last_used = time.monotonic()
            return lm
        if identity is None:
            await self.forget(name, version, "unloaded")
            raise APIError(404, "model_not_found", f"model {name}/{version} does not exist")
        lock = self._load_locks.setdefault(key, asyncio.Lock())
        async with lock:
            lm = self.peek(name, version)
            if lm is not None and lm.identity != identity:  # deleted and re-created, or replaced
                await self.forget(name, version, "replaced")
                lm = None
            if lm is None:
                lm = await asyncio.to_thread(self._load_sync, name, version)
                with self._lock:
                    self._loaded[key] = lm
                    self.metrics.models_loaded.set(len(self._loaded))
                self._notify("loaded", name, version)
                await self._evict_lru()
        lm.last_used = time.monotonic()
        return lm

    def _load_sync(self, name: str, version: str) -> LoadedModel:
        label = f"{name}/{version}"
        path = self.models_dir / name / version
        t0 = time.perf_counter()
        identity = _identity(path)
        try:
            manifest = Manifest.read(path)
            scorer = self.scorer_factory(path)
            warm = False
            if self.settings.warmup:
                scorer.warmup()
                warm = True
        except Exception as e:  # noqa: BLE001 - any load failure becomes a 503
            self.metrics.model_loads.labels(label, "error").inc()
            self.last_error = self.redact(f"{label}: {type(e).__name__}: {e}")
            log.error("loading model %s failed: %s", label, e)
            if isinstance(e, ModelNotFoundError) or _identity(path) != identity:  # deleted while it loaded
                raise APIError(404, "model_not_found", f"model {label} does not exist") from None
            raise APIError(
                503, "model_unavailable", self.redact(f"model {label} could not be loaded: {type(e).__name__}: {e}")
            ) from None
        dt = time.perf_counter() - t0
        self.metrics.model_loads.labels(label, "ok").inc()
        self.metrics.model_load_seconds.observe(dt)
        self.last_error = None
        sel = getattr(scorer, "selection", None)
        log.info("loaded model %s in %.2f s (providers %s)%s", label, dt, getattr(scorer, "providers", "?"),
                 f"; {sel.backend}/{sel.precision}: {sel.reason}" if sel is not None else "")
        batcher = Batcher(scorer, label, self.executor, self.settings, self.metrics, self.render_executor)
        return LoadedModel(name, version, path, scorer, manifest, batcher, time.time(), dt,
                           warm or not self.settings.warmup, identity)

    async def unload(self, name: str, version: str, reason: str = "unloaded") -> bool:
        with self._lock:
            lm = self._loaded.pop((name, version), None)
            self.metrics.models_loaded.set(len(self._loaded))
        if lm is None:
            return False
        await self._close(lm, reason)
        return True

    async def forget(self, name: str, version: str, reason: str = "unloaded") -> bool:
        """Take a version out of the cache at once (deleted or replaced on disk): no new request gets
        it; requests already using it finish, then it is closed."""
        with self._lock:
            lm = self._loaded.pop((name, version), None)
            self.metrics.models_loaded.set(len(self._loaded))
            if lm is not None and lm.in_use:
                lm.retired = reason
                return True
        if lm is None:
            return False
        await self._close(lm, reason)
        return True

    async def _close(self, lm: LoadedModel, reason: str) -> None:
        await lm.batcher.close()
        self.metrics.model_loads.labels(lm.ref, reason).inc()
        self._notify(reason, lm.name, lm.version)
        log.info("%s model %s", reason, lm.ref)

    async def _evict_lru(self) -> None:
        with self._lock:
            extra = len(self._loaded) - self.settings.max_loaded_models
            if extra <= 0:
                return
            idle = sorted((lm for lm in self._loaded.values() if lm.in_use == 0), key=lambda m: m.last_used)
        for lm in idle[:extra]:
            await self.unload(lm.name, lm.version, "evicted")

    def _notify(self, event: str, name: str, version: str) -> None:
        for hook in list(self.on_change):
            try:
                hook(event, name, version)
            except Exception:
                log.exception("registry hook failed")

    # ----- scoring -----

    async def score(self, lm: LoadedModel, images: Sequence, names: Sequence[str], opts: ScoreOptions):
        lm.in_use += 1
        lm.last_used = time.monotonic()
        try:
            return await lm.batcher.submit(images, names, opts)
        finally:
            lm.in_use -= 1
            lm.last_used = time.monotonic()
            if lm.retired is not None and lm.in_use == 0:
                reason, lm.retired = lm.retired, None
                await self._close(lm, reason)

    def in_use(self, name: str, version: str) -> bool:
        lm = self.peek(name, version)
        return lm is not None and lm.in_use > 0

    # ----- hot reload -----

    async def refresh(self) -> None:
        """Load the default model's current version; unload deleted and idle superseded versions."""
        try:
            name, version = self.resolve(None)
        except APIError:
            name = version = None
        if name is not None:
            try:
                await self.load(name, version)
            except APIError:
                pass  # recorded in last_error / metrics; retried on the next poll
        now = time.monotonic()
        for lm in self.loaded():
            if lm.in_use:
                continue
            gone = _identity(lm.path) != lm.identity
            try:
                active = bundle.get_active(self.models_dir, lm.name)
            except BundleError:
                active = None
            superseded = lm.version != active and now - lm.last_used > IDLE_UNLOAD_S
            if gone or superseded:
                await self.unload(lm.name, lm.version, "unloaded")

    async def _poll(self) -> None:
        interval = self.settings.reload_interval_s
        while True:
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("model store poll failed")
            await asyncio.sleep(interval)

    async def start(self) -> None:
        if self.settings.reload_interval_s > 0:
            self._poller = asyncio.get_running_loop().create_task(self._poll(), name="registry-poll")

    async def stop(self) -> None:
        await wait_quietly(self._poller, cancel=True)
        for lm in self.loaded():
            await self.unload(lm.name, lm.version, "unloaded")
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.render_executor.shutdown(wait=False, cancel_futures=True)

    # ----- readiness -----

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        try:
            lm = await self.get(None)
        except ModelRequiredError as e:  # several models, none default: requests name theirs
            return True, {"detail": e.detail}
        except APIError as e:
            return False, {"error": e.error, "detail": e.detail}
        ok = lm.warm
        return ok, {
            "model": lm.name,
            "version": lm.version,
            "warm": lm.warm,
            "providers": list(getattr(lm.scorer, "providers", []) or []),
            "load_seconds": round(lm.load_seconds, 3),
            **inference_info(lm),
        }


def inference_info(lm: LoadedModel) -> dict[str, Any]:
    """How a loaded model runs: backend, precision, why (the selection), and its batching."""
    sel = getattr(lm.scorer, "selection", None)
    if sel is None:
        return {}
    return {"backend": sel.backend, "precision": sel.precision, "selection": sel.to_dict(),
            "batch_max_images": lm.batcher.max_images, "batch_wait_ms": lm.batcher.wait_s * 1000.0}
