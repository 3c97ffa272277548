"""Micro-batching of one loaded model's score requests.

Each loaded version owns a :class:`Batcher`: concurrent requests are queued and coalesced into one
inference call of up to ``max_images`` images, run in a small thread pool so the event loop never
blocks; heatmaps are rendered on another pool, so the next batch infers meanwhile. Batch size and wait
default to the values measured for the model's backend (``BATCH_DEFAULTS``).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from app.errors import APIError
from app.metrics import Metrics
from app.settings import Settings

# (images per batch, wait ms) per backend when the settings leave them unset: the choice recorded in
# benchmarks/results/load_sweep.json (benchmarks/load.py --sweep, rule in benchmarks/batching.py;
# docs/BENCHMARKS.md "Micro-batching per backend"; tests/test_batching.py keeps them equal). On the 2-core
# CPU it was measured on, coalescing requests bought no throughput for either backend, so the default is
# none: each request (with all its files) infers alone. On a larger CPU or a GPU host, rerun the sweep
# and set STPM_BATCH_MAX_IMAGES / STPM_BATCH_WAIT_MS.
BATCH_DEFAULTS: dict[str, tuple[int, float]] = {"onnxruntime": (1, 0.0), "openvino": (1, 0.0)}


def batch_policy(settings: Settings, backend: str | None) -> tuple[int, float]:
    """(max images, wait ms) of a model's batcher: the settings, else the backend's measured default."""
    n, wait = BATCH_DEFAULTS.get(backend or "onnxruntime", BATCH_DEFAULTS["onnxruntime"])
    return (settings.batch_max_images or n,
            settings.batch_wait_ms if settings.batch_wait_ms is not None else wait)



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
class _Pending:
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
        self._queue: asyncio.Queue[_Pending] | None = None
        self._carry: deque[_Pending] = deque()
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
        job = _Pending(list(images), list(names), opts, asyncio.get_running_loop().create_future())
        self._queue.put_nowait(job)
        return await job.future

    async def _next(self, timeout: float | None) -> _Pending | None:
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

    async def _run(self, batch: list[_Pending]) -> None:
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

    def _infer_sync(self, batch: list[_Pending]) -> list[list]:
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

    def _legacy_score(self, images: list, names: list[str], batch: list[_Pending], start: int) -> list:
        opts_of = [job.opts for job in batch for _ in job.images][start : start + len(images)]
        out: list = [None] * len(images)
        for opts in dict.fromkeys(opts_of):
            idx = [i for i, o in enumerate(opts_of) if o == opts]
            res = self.scorer.score([images[i] for i in idx], names=[names[i] for i in idx], map_size=opts.map_size,
                                    overlay=opts.overlay, raw_map_png=opts.raw_map_png)
            for i, r in zip(idx, res):
                out[i] = r
        return out

    def _render_sync(self, batch: list[_Pending], scored: list[list]) -> list[list]:
        """Runs on the render pool: each job's maps and heatmap images, with its own options."""
        if not self._two_phase():
            return scored
        return [self.scorer.render(sc, map_size=job.opts.map_size, overlay=job.opts.overlay,
                                   raw_map_png=job.opts.raw_map_png, heatmap_format=job.opts.heatmap_format)
                for job, sc in zip(batch, scored)]

    async def close(self) -> None:
        """Stop taking requests: batches in flight finish, queued requests get 503."""
        await wait_quietly(self._task, cancel=True)
        for t in list(self._running):
            await wait_quietly(t)
        pending = list(self._carry)
        while self._queue is not None and not self._queue.empty():
            pending.append(self._queue.get_nowait())
        for job in pending:
            if not job.future.done():
                job.future.set_exception(APIError(503, "shutting_down", "the server is shutting down"))


async def wait_quietly(task: asyncio.Task | None, cancel: bool = False) -> None:
    """Await a task that is being shut down (cancelled first if asked); its cancellation or failure is
    not the caller's concern."""
    if task is None:
        return
    if cancel:
        task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):  # noqa: BLE001, S110 - shutting down
        pass
