"""One training job in its own process: `python -m app.jobs.run_job JOB_ID --token ...` (job store in --db or
the environment).

Started by the worker (app.jobs.worker.LocalRunner, in the server or in a Celery worker); it is the only
place that imports torch. It reads its parameters from the job row, reports progress into it, polls the
row for a cancel request (through `should_stop`), and writes the final state, all guarded by its run
token. It exits when its parent (the server or worker) dies, so a killed server never leaves a training
process behind that could publish or write state the restarted server did not expect.

The job database out of reach (scaled mode: PostgreSQL restarting, or this host cut off): progress
reports are skipped, and every cancel check, the one before publishing included, waits for an answer
from the row (training pauses) for at most `--db-grace` seconds (the worker passes job_stale_after_s,
after which the job is failed by the others' sweep); then the process stops without publishing (exit 4).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from app.jobs.store import STORE_ENV, Job, JobStore, StoreUnavailable
from app.jobs.uploads import IMAGES

T = TypeVar("T")
log = logging.getLogger("app.jobs.run_job")
PROGRESS_EVERY_S = 0.5
CANCEL_POLL_S = 0.3
STORE_RETRY_S = 0.5
EXIT_STORE_LOST = 4


def until_reachable(call: Callable[[], T], grace_s: float) -> T:
    """`call()`, retried while the job database is unreachable, for at most `grace_s` seconds (then the
    last StoreUnavailable is raised)."""
    deadline = time.monotonic() + grace_s
    warned = False
    while True:
        try:
            return call()
        except StoreUnavailable as e:
            if time.monotonic() >= deadline:
                raise
            if not warned:
                log.warning("%s; waiting for it (at most %.0f s)", e, grace_s)
                warned = True
            time.sleep(STORE_RETRY_S)


def _die_with_parent() -> None:
    """Exit when the parent process goes away (kill -9 of the server included)."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except Exception as e:  # noqa: BLE001 - the watchdog thread below covers it
            log.debug("prctl(PR_SET_PDEATHSIG) unavailable: %s", e)

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(70)
            time.sleep(0.5)

    if os.getppid() != parent:
        os._exit(70)
    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


DISK_FULL = ("No space left on device", "StorageFull", "Disk quota exceeded", "FilesystemQuotaExceeded")


def readable_error(e: BaseException) -> str:
    """A message a user can act on."""
    name = type(e).__name__
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"disk full: {e.strerror} ({e.filename or 'while writing'}); free space and resubmit"
    if name == "SafetensorError" and any(s in str(e) for s in DISK_FULL):  # Rust's io::Error, as text
        return "disk full: No space left on device (while writing the weights); free space and resubmit"
    if name == "OutOfMemoryError":
        return f"out of GPU memory ({e}); lower batch_size or image_size and resubmit"
    if isinstance(e, MemoryError):
        return "out of memory; lower batch_size or image_size, or upload fewer images, and resubmit"
    msg = str(e).strip() or name
    return msg if isinstance(e, ValueError) and name != "ValueError" else f"{name}: {msg}"


def redact(message: str, folders: list[str | Path | None]) -> str:
    """A job error as API clients see it: the server's folders (the model store, the data directory) named
    `<models>` / `<data>` instead of their paths."""
    for folder, label in zip(folders, ("<models>", "<data>")):
        if folder is None:
            continue
        for form in {str(Path(folder)), str(Path(folder).resolve())}:
            message = message.replace(form, label)
    return message


class Progress:
    """What the training process writes into its job row (phase, elapsed time, ETA, the last epoch's
    record; at most every PROGRESS_EVERY_S unless an epoch or a phase ends), and whether a cancel was
    asked for (read from the row at most every CANCEL_POLL_S)."""

    def __init__(self, store: JobStore, job_id: str, token: str, db_grace_s: float = 60.0):
        self.store, self.job_id, self.token, self.db_grace_s = store, job_id, token, db_grace_s
        self.started = time.monotonic()
        self.phase = "loading"
        self.last_write = self.last_poll = 0.0
        self.stop_requested = False
        self.epoch_end: dict = {}  # the last epoch's record (it has val_loss)
        self.phase_t0: float | None = None  # when this phase's first step was reported (for the ETA)

    @property
    def epochs_done(self) -> int:
        return self.epoch_end.get("epoch", 0)

    def report(self, extra: dict, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_write < PROGRESS_EVERY_S:
            return
        self.last_write = now
        try:
            self.store.set_progress(self.job_id, self.token,
                                    {"phase": self.phase, "elapsed_s": round(now - self.started, 2), **extra})
        except StoreUnavailable as e:  # progress is for display: skip it while the database is away
            log.warning("progress not recorded: %s", e)

    def __call__(self, d: dict) -> None:
        """The training pipeline's progress callback."""
        d = dict(d)
        new_phase = d.pop("phase", "training")  # patchcore: "patch features", "memory bank (coreset)", ...
        phase_changed = new_phase != self.phase
        if phase_changed:
            self.phase_t0 = None  # the ETA restarts with each phase
            self.phase = new_phase
        d = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in d.items()}
        self._add_eta(d)
        epoch_end = "val_loss" in d
        if epoch_end:
            self.epoch_end = d
            if d["epoch"] == d["epochs"]:
                self.phase = "calibrating, exporting and publishing"
        elif "steps" not in d:  # a phase after training (selection, calibration): the last epoch's record stays
            d = {**self.epoch_end, **d}
        else:
            for k in ("val_loss", "best_val_loss"):
                if k in self.epoch_end:
                    d.setdefault(k, self.epoch_end[k])
        self.report(d, force=epoch_end or phase_changed)

    def _add_eta(self, d: dict) -> None:
        """A step-level ETA from the fraction of the phase done, where the pipeline gave none."""
        if "eta_s" in d or "steps" not in d or "step" not in d:
            return
        done = (d["epoch"] - 1) * d["steps"] + d["step"]
        total = d["epochs"] * d["steps"]
        if self.phase_t0 is None:
            self.phase_t0 = time.monotonic()
        if done:
            d["eta_s"] = round((time.monotonic() - self.phase_t0) / done * (total - done), 1)

    def should_stop(self) -> bool:
        """Whether to stop (cancelled, or the run is no longer ours): an answer read from the row at most
        CANCEL_POLL_S ago; while the database is away this waits (StoreUnavailable after db_grace_s)."""
        if not self.stop_requested and time.monotonic() - self.last_poll >= CANCEL_POLL_S:
            self.stop_requested = until_reachable(lambda: self.store.cancel_requested(self.job_id), self.db_grace_s)
            self.last_poll = time.monotonic()
        return self.stop_requested


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m app.jobs.run_job")
    p.add_argument("job_id")
    p.add_argument("--db", default=os.environ.get(STORE_ENV),
                   help=f"job store: SQLite file or postgresql:// URL (default: environment {STORE_ENV})")
    p.add_argument("--token", required=True)
    p.add_argument("--models-dir", required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--weights-dir", default=None)
    p.add_argument("--db-grace", type=float, default=60.0,
                   help="seconds to wait for an unreachable job database before stopping without publishing")
    args = p.parse_args(argv)
    if not args.db:
        p.error(f"no job store: pass --db or set {STORE_ENV}")
    return args


def train(job: Job, args: argparse.Namespace, progress: Progress):
    """Train on the job's uploads and publish a version (the only place torch is imported); -> the
    pipeline's outcome, or None when the job was cancelled while training."""
    if args.threads:
        os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from stpm.methods.base import TrainingStopped
    from stpm.options import from_params, updated
    from stpm.training.pipeline import run_training

    config = from_params(job.params)  # every section the API stored, validated again (stpm.options)
    config = config.model_copy(update={"train": updated(config.train, device=args.device)})  # the server's device
    job_dir = Path(job.job_dir)
    images = sorted((job_dir / IMAGES).iterdir())
    try:
        return run_training(
            images, job.name, args.models_dir, config, run_dir=job_dir / "run", weights_dir=args.weights_dir,
            skip_bad=False, resume=False, export=True, progress=progress, should_stop=progress.should_stop,
            show_bar=False,
        )
    except TrainingStopped:
        return None


def settle(store: JobStore, job_id: str, state: str, args: argparse.Namespace, **fields) -> bool:
    """The run's final state into its row (guarded by the token), waiting out a database restart."""
    return until_reachable(lambda: store.finish(job_id, state, token=args.token, **fields), args.db_grace)


def record_success(store: JobStore, job: Job, args: argparse.Namespace, version: str) -> None:
    """Activate the new version if the job asked for it, and settle the row as succeeded."""
    from stpm import bundle

    note = None
    if job.params.get("activate"):
        try:
            bundle.set_active(args.models_dir, job.name, version)
        except Exception as e:  # noqa: BLE001
            note = f"published {job.name}/{version} but could not activate it: {readable_error(e)}"
    # the first version of a new name is activated by the publish itself (stpm.bundle)
    activated = bundle.get_active(args.models_dir, job.name) == version
    if not settle(store, job.id, "succeeded", args, version=version, activated=activated, error=note):
        log.error("job %s: published %s but the job row was no longer ours", job.id, version)
    log.info("job %s succeeded: %s/%s", job.id, job.name, version)


def run(store: JobStore, job: Job, args: argparse.Namespace) -> int:
    """Train, publish and settle the claimed job; -> the exit code."""
    progress = Progress(store, job.id, args.token, args.db_grace)
    progress.report({}, force=True)
    try:
        outcome = train(job, args, progress)
        if outcome is None or outcome.version is None:
            settle(store, job.id, "cancelled", args, error=f"cancelled while running (after "
                   f"{progress.epochs_done} completed epoch(s)); no version was published")
            log.info("job %s cancelled", job.id)
            return 0
        record_success(store, job, args, outcome.version)
        return 0
    except StoreUnavailable:
        raise
    except BaseException as e:
        log.exception("job %s failed", job.id)
        settle(store, job.id, "failed", args,
               error=redact(readable_error(e), [args.models_dir, Path(job.job_dir).parent.parent]))
        return 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _die_with_parent()
    try:
        store = until_reachable(lambda: JobStore(args.db, pool_size=1), args.db_grace)
        job = until_reachable(lambda: store.get(args.job_id), args.db_grace)
        if job is None or job.state != "running" or job.run_token != args.token:
            log.error("job %s is not running under this token; nothing to do", args.job_id)
            return 3
        return run(store, job, args)
    except StoreUnavailable as e:  # staging folders are removed on the way out; nothing unchecked is published
        log.error("job %s: stopped after waiting %.0f s for the job database (%s); its worker or the others' sweep "
                  "settles the row", args.job_id, args.db_grace, e)
        return EXIT_STORE_LOST


if __name__ == "__main__":
    sys.exit(main())
