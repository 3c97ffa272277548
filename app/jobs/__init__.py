"""Training jobs behind POST /train: a SQLite job store, durable uploads, and a local worker that runs
each training in its own process (see worker.py for the runner interface and restart semantics)."""

from __future__ import annotations

from fastapi import FastAPI

from app.jobs.store import JobStore
from app.jobs.worker import JobRunner, LocalRunner

__all__ = ["JobRunner", "JobStore", "LocalRunner", "install"]


def install(app: FastAPI) -> None:
    """Register the lifespan hooks that open the store and start / stop the worker."""

    async def start(app: FastAPI) -> None:
        from starlette.concurrency import run_in_threadpool

        s = app.state.settings
        store = await run_in_threadpool(JobStore, s.jobs_data_dir / "jobs.sqlite3")
        runner = LocalRunner(store, s)
        runner.start()
        app.state.job_store, app.state.job_runner = store, runner

    async def stop(app: FastAPI) -> None:
        from starlette.concurrency import run_in_threadpool

        runner = getattr(app.state, "job_runner", None)
        if runner is not None:
            await run_in_threadpool(runner.stop)

    app.state.startup_hooks.append(start)
    app.state.shutdown_hooks.append(stop)
