"""Scaled-out training: Celery on a Redis broker (`STPM_QUEUE=celery`, `STPM_BROKER_URL`).

The job row (PostgreSQL when scaled) is the truth; a broker message only says "run job X".

* API replicas use `CeleryRunner`: `submit` sends task `stpm.train(job_id)` with task id = job id,
  `cancel` cancels a queued row and revokes its task, or sets the running row's cancel flag (the training
  process polls it; its worker terminates it after `train_cancel_grace_s`).
* `stpm worker` (app/celery_worker.py) consumes the queue with late acknowledgement and a prefetch of
  one: a message is acknowledged only when its task returned, so a worker that dies before claiming the
  job leaves the message to be redelivered. The task claims the row (`queued -> running`, one guarded
  update: a duplicate or revoked delivery finds it taken and does nothing), then supervises the training
  process exactly like the embedded runner, writing a heartbeat into the row every `job_heartbeat_s`.
* Every replica and worker sweeps: a running row whose heartbeat is older than `job_stale_after_s`
  belonged to a dead worker and is settled **failed** with the reason (or succeeded, if its version was
  in fact published; cancelled, if a cancel had been asked). Never retried: see docs/SCALING.md.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import TYPE_CHECKING

from app.jobs.store import Job, JobStore
from app.jobs.uploads import clean_incoming
from app.jobs.worker import LocalRunner
from app.settings import Settings

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger("app.jobs.celery")
TASK = "stpm.train"
QUEUE = "stpm-train"
INCOMING_MAX_AGE_S = 3600.0  # another replica may be storing an upload right now: only older ones go


def make_celery(settings: Settings) -> Celery:
    """The Celery app both sides share (the API only sends; workers also register the task)."""
    from celery import Celery

    if settings.broker_url is None:
        raise ValueError("no broker: set STPM_BROKER_URL=redis://HOST:6379/0")
    app = Celery("stpm", broker=settings.broker_url.get_secret_value(), set_as_current=False)
    app.conf.update(
        task_acks_late=True,  # acknowledged when the task returns, not when it is received
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # a worker holds only the messages it is running
        task_default_queue=QUEUE,
        task_ignore_result=True,  # the job row is the result
        task_serializer="json",
        accept_content=["json"],
        broker_transport_options={"visibility_timeout": settings.broker_visibility_timeout_s},
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


def sweep_interval(settings: Settings) -> float:
    return max(0.5, min(5.0, settings.job_stale_after_s / 4))


class Sweeper:
    """A daemon thread: settle the jobs of dead workers; re-send tasks that never reached the broker."""

    def __init__(self, supervisor: LocalRunner, celery: Celery | None, settings: Settings):
        self.supervisor, self.celery, self.settings = supervisor, celery, settings
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="job-sweeper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def sweep(self) -> None:
        self.supervisor.sweep_stale(self.settings.job_stale_after_s)
        if self.celery is not None:
            for job in self.supervisor.store.queued(not_enqueued=True):
                if time.time() - job.created_at > 2.0:  # not one whose submit is sending right now
                    send(self.celery, self.supervisor.store, job.id)

    def _run(self) -> None:
        if self.celery is not None:  # an API replica: half-stored uploads of replicas that crashed
            try:
                jobs_root = self.settings.jobs_data_dir / "jobs"
                clean_incoming(jobs_root, self.supervisor.store.ids(), min_age_s=INCOMING_MAX_AGE_S)
            except Exception as e:  # noqa: BLE001 - best effort; the next start tries again
                log.warning("cleaning half-stored uploads failed: %s", e)
        while not self._stop.wait(sweep_interval(self.settings)):
            try:
                self.sweep()
            except Exception as e:  # noqa: BLE001 - the store or broker is down: try again later
                log.warning("job sweep failed: %s", e)


def send(celery: Celery, store: JobStore, job_id: str) -> bool:
    """Put the job's task on the queue (task id = job id); -> whether the broker took it."""
    try:
        celery.send_task(TASK, args=[job_id], task_id=job_id, queue=QUEUE)
    except Exception as e:  # noqa: BLE001 - the row stays queued; the sweeper sends it again
        log.error("job %s: could not reach the broker (%s); it stays queued and is sent again later", job_id, e)
        return False
    store.mark_enqueued(job_id)
    return True


class CeleryRunner:
    """The API replicas' JobRunner: jobs run on `stpm worker` processes, anywhere."""

    def __init__(self, store: JobStore, settings: Settings):
        self.store, self.settings = store, settings
        self.celery = make_celery(settings)
        self.supervisor = LocalRunner(store, settings)  # never started: settles and cleans up only
        self.sweeper = Sweeper(self.supervisor, self.celery, settings)

    def start(self) -> None:
        self.sweeper.start()

    def stop(self) -> None:
        self.sweeper.stop()

    def submit(self, job_id: str) -> None:
        send(self.celery, self.store, job_id)

    def cancel(self, job_id: str) -> Job | None:
        before = self.store.get(job_id)
        job = self.supervisor.cancel(job_id)  # queued: cancelled now; running: the row's cancel flag
        if before is not None and before.state == "queued" and job is not None and job.state == "cancelled":
            try:
                self.celery.control.revoke(job_id)
            except Exception as e:  # noqa: BLE001 - the row already says cancelled; a delivery would do nothing
                log.warning("job %s: revoke failed (%s); its task will find the job cancelled", job_id, e)
        return job


def worker_name() -> str:
    return f"stpm-{os.getpid()}@{socket.gethostname()}"


def _shutting_down() -> bool:
    from celery.worker import state

    return any(v is not None and v is not False for v in (state.should_stop, state.should_terminate))


def run_task(store: JobStore, settings: Settings, job_id: str, worker: str) -> str:
    """The body of task `stpm.train` on a worker; -> the job's state when it returns."""
    if _shutting_down():  # delivered while this worker stops: back to the queue for another worker
        from celery.exceptions import Reject

        raise Reject(f"worker {worker} is shutting down", requeue=True)
    claimed = store.claim(job_id, worker=worker)
    if claimed is None:
        job = store.get(job_id)
        state = job.state if job is not None else "missing"
        log.info("job %s is %s: nothing to do (a duplicate or revoked delivery)", job_id, state)
        return state
    log.info("job %s (%s): claimed by %s", job_id, claimed[0].name, worker)
    return LocalRunner(store, settings).run_blocking(*claimed, should_abort=_shutting_down)


def register_task(celery: Celery, store: JobStore, settings: Settings) -> None:
    @celery.task(name=TASK, bind=True, acks_late=True)
    def train(task, job_id: str) -> str:
        return run_task(store, settings, job_id, task.request.hostname or worker_name())


def requeue(celery: Celery, store: JobStore) -> int:
    """Send the task of every queued job again (after the broker lost its data); duplicates are harmless."""
    return sum(send(celery, store, job.id) for job in store.queued())
