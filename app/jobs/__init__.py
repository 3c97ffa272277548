"""Training jobs behind POST /train: a job store (SQLite embedded, PostgreSQL scaled), durable uploads,
and a runner: the embedded local worker that runs each training in its own process (see worker.py for
the runner interface and restart semantics), or Celery workers on other hosts (celery_queue.py)."""

from __future__ import annotations

from fastapi import FastAPI

from app.jobs.store import JobStore
from app.jobs.worker import JobRunner, LocalRunner

__all__ = ["JobRunner", "JobStore", "LocalRunner", "install"]


def make_runner(store: JobStore, settings) -> JobRunner:
    """`queue=local`: this server runs the jobs; `queue=celery`: `stpm worker` processes do."""
    if settings.queue == "celery":
        from app.jobs.celery_queue import CeleryRunner

        return CeleryRunner(store, settings)
    return LocalRunner(store, settings)


def install(app: FastAPI) -> None:
    """Register the lifespan hooks that open the store and start / stop the runner."""

    async def start(app: FastAPI) -> None:
        from starlette.concurrency import run_in_threadpool

        s = app.state.settings
        store = await run_in_threadpool(JobStore, s.jobs_store_target, s.jobs_db_pool_size)
        runner = make_runner(store, s)
        runner.start()
        app.state.job_store, app.state.job_runner = store, runner
        app.state.metrics.watch_jobs(store.counts)

    async def stop(app: FastAPI) -> None:
        from starlette.concurrency import run_in_threadpool

        runner = getattr(app.state, "job_runner", None)
        if runner is not None:
            await run_in_threadpool(runner.stop)
        store = getattr(app.state, "job_store", None)
        if store is not None:
            store.close()

    app.state.startup_hooks.append(start)
    app.state.shutdown_hooks.append(stop)
