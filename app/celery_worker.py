"""`stpm worker`: a Celery worker that runs training jobs from the Redis queue (scaled mode).

Settings come from STPM_* variables like `stpm serve`: STPM_BROKER_URL (required), STPM_JOBS_DB (the
shared PostgreSQL job store), STPM_MODELS_DIR and STPM_DATA_DIR (the shared model store and uploads,
mounted at the same paths as on the API replicas), STPM_TRAIN_DEVICE, STPM_TRAIN_THREADS ...

It runs `--concurrency` jobs at once (default STPM_TRAIN_CONCURRENCY = 1: one per GPU), each in its own
process (`python -m app.jobs.run_job`, as in the embedded mode), on a thread pool so the worker keeps
answering the broker (revokes, pings) while jobs train. SIGTERM stops the running jobs (failed: "the
worker stopped while the job was running; resubmit it") and exits. See docs/SCALING.md.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from typing import TYPE_CHECKING

from app.commands import Command, load_settings

if TYPE_CHECKING:
    from app.settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--concurrency", type=int, default=None,
                        help="jobs at once (default STPM_TRAIN_CONCURRENCY, 1: one job per GPU)")
    parser.add_argument("--hostname", default=None,
                        help="worker name, %%h = this host (default stpm-PID@HOST; one worker per container: stpm@%%h)")
    parser.add_argument("--loglevel", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--ping", action="store_true",
                        help="exit 0 if the worker named by --hostname answers over the broker, else 1 (health checks)")
    parser.add_argument("--requeue", action="store_true",
                        help="send the task of every queued job again and exit (after the broker lost its data)")
    parser.add_argument("--env-file", default=None, help="read settings from this file instead of ./.env")


def _check_scale_setup(settings: Settings) -> bool:
    """The broker is set and Celery installed; else the reason is printed."""
    if settings.broker_url is None:
        print("stpm worker: no broker: set STPM_BROKER_URL=redis://HOST:6379/0 (and STPM_JOBS_DB to the shared "
              "PostgreSQL job store)", file=sys.stderr)
        return False
    try:
        import celery  # noqa: F401
    except ImportError as e:
        print(f"stpm worker: Celery is not installed ({e}): pip install 'stpm[scale]'", file=sys.stderr)
        return False
    return True


def _ping(app, hostname: str | None) -> int:
    name = (hostname or "stpm@%h").replace("%h", socket.gethostname())
    answers = app.control.ping(destination=[name], timeout=3.0)
    print(answers or f"no answer from {name}")
    return 0 if answers else 1


def main(args: argparse.Namespace) -> int:
    settings = load_settings("worker", args.env_file)
    if settings is None or not _check_scale_setup(settings):
        return 2
    logging.basicConfig(level=args.loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from app.jobs.celery_queue import QUEUE, Sweeper, make_celery, register_task, requeue, worker_name
    from app.jobs.store import JobStore
    from app.jobs.worker import LocalRunner

    app = make_celery(settings)
    if args.ping:
        return _ping(app, args.hostname)
    store = JobStore(settings.jobs_store_target, settings.jobs_db_pool_size)
    register_task(app, store, settings)
    if args.requeue:
        print(f"re-sent {requeue(app, store)} queued job(s)")
        return 0
    if settings.jobs_db is None:
        logging.getLogger("app.jobs").warning(
            "STPM_JOBS_DB is not set: this worker uses the SQLite store %s, which only processes on this host "
            "can share", settings.jobs_store_target)
    sweeper = Sweeper(LocalRunner(store, settings), None, settings)  # settles jobs of workers that died
    sweeper.start()
    concurrency = args.concurrency or settings.train_concurrency
    try:
        app.worker_main([
            "worker", "--pool=threads", f"--concurrency={concurrency}", "--prefetch-multiplier=1", "-Q", QUEUE,
            f"--hostname={args.hostname or worker_name()}", f"--loglevel={args.loglevel.upper()}",
            "--without-gossip", "--without-mingle",
        ])
    finally:
        sweeper.stop()
        store.close()
    return 0


COMMAND = Command("worker", "run training jobs from the Celery queue (scaled mode, docs/SCALING.md)", __doc__,
                  add_arguments, main)
register = COMMAND.register  # the `stpm.commands` entry point (pyproject.toml)

if __name__ == "__main__":  # python -m app.celery_worker
    sys.exit(COMMAND.run("python -m app.celery_worker"))
