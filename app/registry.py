"""Loaded scorers per model version, the default model, hot reload, and micro-batching.

* Resolution is done on every request against the model store (a directory listing and a few stats,
  well under a millisecond), so a newly published or activated version is used by the very next
  request; a background poll (``reload_interval_s``) loads and warms it before that request arrives.
* The default model (requests without ``model``): ``settings.default_model`` if set, else the only
  model name in the store; with several names and no setting, a request must name one (400).
  A name serves only its activated version (see stpm.bundle).
* The cache of loaded scorers is keyed by name/version and checked against the bundle on disk at
  every request (the manifest's inode and mtime): a deleted or replaced bundle is never served.
* Each loaded version owns a :class:`Batcher`: concurrent requests are queued and coalesced into one
  inference call of up to ``batch_max_images`` images, run in a small thread pool so the event loop
  never blocks; heatmaps are rendered on another pool, so the next batch infers meanwhile. Batch size
  and wait default to the values measured for the model's backend (``BATCH_DEFAULTS``). Versions that
  are no longer active, not used for ``IDLE_UNLOAD_S`` and not serving a request are unloaded; so are
  deleted ones.

State is touched from the event loop and from loader threads; a lock guards the tables.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.errors import APIError
from app.metrics import Metrics
from app.settings import Settings
from stpm import bundle
from stpm.bundle.store import BundleError, ModelNotFoundError, NoActiveVersionError

log = logging.getLogger("app.registry")

IDLE_UNLOAD_S = 60.0
# (images per batch, wait ms) per backend when the settings leave them unset: the choice recorded in
# benchmarks/results/load_sweep.json (benchmarks/load.py --sweep, rule in benchmarks/batching.py;
# docs/BENCHMARKS.md "Micro-batching per backend"; tests/test_batching.py keeps them equal). On the 2-core
# CPU it was measured on, coalescing requests bought no throughput for either backend, so the default is
# none: each request (with all its files) infers alone. On a larger CPU or a GPU host, rerun the sweep
# and set STPM_BATCH_MAX_IMAGES / STPM_BATCH_WAIT_MS.
BATCH_DEFAULTS: dict[str, tuple[int, float]] = {"onnxruntime": (1, 0.0), "openvino": (1, 0.0)}
SCORER_MAX_BATCH = 16  # tiles per graph run inside a scorer


def batch_policy(settings: Settings, backend: str | None) -> tuple[int, float]:
    """(max images, wait ms) of a model's batcher: the settings, else the backend's measured default."""
    n, wait = BATCH_DEFAULTS.get(backend or "onnxruntime", BATCH_DEFAULTS["onnxruntime"])
    return (settings.batch_max_images or n,
            settings.batch_wait_ms if settings.batch_wait_ms is not None else wait)


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
    """Map the store's exceptions onto HTTP: unknown -> 404, nothing activated -> 409, malformed -> 400."""
    if isinstance(exc, NoActiveVersionError):
        return APIError(409, "no_active_version", str(exc))
    if isinstance(exc, ModelNotFoundError):
        return APIError(404, "model_not_found", str(exc))
    return APIError(400, "invalid_model_name", str(exc))


def _identity(path: Path) -> tuple[int, int, int] | None:
    """What a loaded bundle is checked against: its manifest's device, inode and mtime."""
    try:
        st = os.stat(path / bundle.MANIFEST)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns)


@dataclass(frozen=True)
class ScoreOptions:
    overlay: bool = False
    raw_map_png: bool = False
    map_size: Any = None  # None | "input" | (h, w)
    heatmap_format: str = "png"

    @property
    def renders(self) -> bool:
        return self.overlay or self.raw_map_png or self.map_size is not None


@dataclass
class _Job:
    images: list
    names: list[str]
    opts: ScoreOptions
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    """Coalesces concurrent score() calls for one scorer into batched calls on a thread pool."""

    def __init__(self, scorer, label: str, executor: ThreadPoolExecutor, settings: Settings, metrics: Metrics,
                 render_executor: ThreadPoolExecutor | None = None):
        self.scorer = scorer
        self.label = label
        self.executor = executor
        self.render_executor = render_executor or executor
        self.max_images, wait_ms = batch_policy(settings, getattr(scorer, "backend", None))
        self.wait_s = wait_ms / 1000.0
        self.concurrency = settings.inference_threads
        self.metrics = metrics
        self._queue: asyncio.Queue[_Job] | None = None
        self._carry: deque[_Job] = deque()
        self._task: asyncio.Task | None = None
        self._sem: asyncio.Semaphore | None = None
        self._running: set[asyncio.Task] = set()
        self.batches = 0

    def _ensure_started(self) -> None:
        if self._task is None or self._task.done():
            self._queue = asyncio.Queue()
            self._sem = asyncio.Semaphore(self.concurrency)
            self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher:{self.label}")

    async def submit(self, images: Sequence, names: Sequence[str], opts: ScoreOptions) -> tuple[list, float]:
        """-> (ScoreResults in order, seconds spent queued)."""
        self._ensure_started()
        job = _Job(list(images), list(names), opts, asyncio.get_running_loop().create_future())
        self._queue.put_nowait(job)
        return await job.future

    async def _next(self, timeout: float | None) -> _Job | None:
        if self._carry:
            return self._carry.popleft()
        if timeout is None:
            return await self._queue.get()
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            if timeout <= 0:
                return None
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._sem.acquire()
            try:
                first = await self._next(None)
            except BaseException:
                self._sem.release()
                raise
            batch, n, nxt = [first], len(first.images), None
            deadline = loop.time() + self.wait_s
            while n < self.max_images:
                nxt = await self._next(deadline - loop.time())
                if nxt is None:
                    break
                if n + len(nxt.images) > self.max_images:
                    self._carry.append(nxt)
                    break
                batch.append(nxt)
                n += len(nxt.images)
            t = loop.create_task(self._run(batch))
            self._running.add(t)
            t.add_done_callback(self._running.discard)
            # This loop now waits for the next job: it must not keep this batch's images alive meanwhile.
            del first, batch, nxt, t

    async def _run(self, batch: list[_Job]) -> None:
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        released = False
        try:
            scored = await loop.run_in_executor(self.executor, self._infer_sync, batch)
            self._sem.release()  # the next batch may infer while this one renders
            released = True
            self.metrics.inference.labels(self.label).observe(time.perf_counter() - start)
            results = await loop.run_in_executor(self.render_executor, self._render_sync, batch, scored)
        except BaseException as e:
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(e if isinstance(e, Exception) else RuntimeError("cancelled"))
            if not isinstance(e, Exception):
                raise
            return
        finally:
            if not released:
                self._sem.release()
        self.batches += 1
        self.metrics.batch_size.labels(self.label).observe(sum(len(j.images) for j in batch))
        for job, res in zip(batch, results):
            job.images = []  # scored: the decoded images are no longer needed
            if not job.future.done():
                job.future.set_result((res, start - job.enqueued))

    def _two_phase(self) -> bool:
        return hasattr(self.scorer, "infer_images") and hasattr(self.scorer, "render")

    def _infer_sync(self, batch: list[_Job]) -> list[list]:
        """Runs on the inference thread: every job's images decided (scored, not rendered), in chunks of
        max_images (a single large request is chunked). A scorer without the two phases (a test
        double) scores and renders here."""
        images = [im for job in batch for im in job.images]
        names = [nm for job in batch for nm in job.names]
        flat: list = []
        for s in range(0, len(images), self.max_images):
            if self._two_phase():
                flat.extend(self.scorer.infer_images(images[s : s + self.max_images],
                                                     names=names[s : s + self.max_images]))
            else:
                flat.extend(self._legacy_score(images[s : s + self.max_images], names[s : s + self.max_images],
                                               batch, s))
        out, k = [], 0
        for job in batch:
            out.append(flat[k : k + len(job.images)])
            k += len(job.images)
        return out

    def _legacy_score(self, images: list, names: list[str], batch: list[_Job], start: int) -> list:
        opts_of = [job.opts for job in batch for _ in job.images][start : start + len(images)]
        out: list = [None] * len(images)
        for opts in dict.fromkeys(opts_of):
            idx = [i for i, o in enumerate(opts_of) if o == opts]
            res = self.scorer.score([images[i] for i in idx], names=[names[i] for i in idx], map_size=opts.map_size,
                                    overlay=opts.overlay, raw_map_png=opts.raw_map_png)
            for i, r in zip(idx, res):
                out[i] = r
        return out

    def _render_sync(self, batch: list[_Job], scored: list[list]) -> list[list]:
        """Runs on the render pool: each job's maps and heatmap images, with its own options."""
        if not self._two_phase():
            return scored
        return [self.scorer.render(sc, map_size=job.opts.map_size, overlay=job.opts.overlay,
                                   raw_map_png=job.opts.raw_map_png, heatmap_format=job.opts.heatmap_format)
                for job, sc in zip(batch, scored)]

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001, S110 - shutting down
                pass
        for t in list(self._running):
            try:
                await t
            except (asyncio.CancelledError, Exception):  # noqa: BLE001, S110 - shutting down
                pass
        pending = list(self._carry)
        while self._queue is not None and not self._queue.empty():
            pending.append(self._queue.get_nowait())
        for job in pending:
            if not job.future.done():
                job.future.set_exception(APIError(503, "shutting_down", "the server is shutting down"))


@dataclass
class LoadedModel:
    name: str
    version: str
    path: Path
    scorer: Any
    manifest: dict
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
            manifest = bundle.read_manifest(path)
            scorer = self.scorer_factory(path)
            warm = False
            if self.settings.warmup:
                scorer.warmup()
                warm = True
        except Exception as e:  # noqa: BLE001 - any load failure becomes a 503
            self.metrics.model_loads.labels(label, "error").inc()
            self.last_error = self.redact(f"{label}: {type(e).__name__}: {e}")
            log.error("loading model %s failed: %s", label, e)
            if isinstance(e, ModelNotFoundError):
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
        if self._poller is not None:
            self._poller.cancel()
            try:
                await self._poller
            except (asyncio.CancelledError, Exception):  # noqa: BLE001, S110 - shutting down
                pass
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
