"""One training job in its own process: `python -m app.jobs.run_job JOB_ID --token ...` (job store in --db or
the environment).

Started by the worker (app.jobs.worker.LocalRunner, in the server or in a Celery worker); it is the only
place that imports torch. It reads its parameters from the job row, reports progress into it, polls the
row for a cancel request (through `should_stop`), and writes the final state, all guarded by its run
token. It exits when its parent (the server or worker) dies, so a killed server never leaves a training
process behind that could publish or write state the restarted server did not expect.
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
from pathlib import Path

from app.jobs.store import STORE_ENV, JobStore
from app.jobs.uploads import IMAGES

log = logging.getLogger("app.jobs.run_job")
PROGRESS_EVERY_S = 0.5
CANCEL_POLL_S = 0.3


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


def readable_error(e: BaseException) -> str:
    """A message a user can act on."""
    name = type(e).__name__
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"disk full: {e.strerror} ({e.filename or 'while writing'}); free space and resubmit"
    if name == "OutOfMemoryError":
        return f"out of GPU memory ({e}); lower batch_size or image_size and resubmit"
    if isinstance(e, MemoryError):
        return "out of memory; lower batch_size or image_size, or upload fewer images, and resubmit"
    msg = str(e).strip() or name
    return msg if isinstance(e, ValueError) and name != "ValueError" else f"{name}: {msg}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m app.jobs.run_job")
    p.add_argument("job_id")
    p.add_argument("--db", default=os.environ.get(STORE_ENV),
                   help=f"job store: SQLite file or postgresql:// URL (default: environment {STORE_ENV})")
    p.add_argument("--token", required=True)
    p.add_argument("--models-dir", required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--weights-dir", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _die_with_parent()

    if not args.db:
        p.error(f"no job store: pass --db or set {STORE_ENV}")
    store = JobStore(args.db, pool_size=1)
    job = store.get(args.job_id)
    if job is None or job.state != "running" or job.run_token != args.token:
        log.error("job %s is not running under this token; nothing to do", args.job_id)
        return 3
    t_start = time.monotonic()
    last = {"write": 0.0, "poll": 0.0, "stop": False}
    phase = {"name": "loading"}

    def report(extra: dict, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - last["write"] < PROGRESS_EVERY_S:
            return
        last["write"] = now
        store.set_progress(job.id, args.token, {"phase": phase["name"], "elapsed_s": round(now - t_start, 2), **extra})

    def progress(d: dict) -> None:
        d = dict(d)
        new_phase = d.pop("phase", "training")  # patchcore: "patch features", "memory bank (coreset)", ...
        if new_phase != phase["name"]:
            last.pop("train_t0", None)  # the ETA restarts with each phase
            phase["name"] = new_phase
            force_phase = True
        else:
            force_phase = False
        d = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in d.items()}
        epoch_end = "val_loss" in d
        if "eta_s" not in d and "steps" in d and "step" in d:  # step-level ETA from the fraction done
            done = (d["epoch"] - 1) * d["steps"] + d["step"]
            total = d["epochs"] * d["steps"]
            started = last.setdefault("train_t0", time.monotonic())
            if done:
                d["eta_s"] = round((time.monotonic() - started) / done * (total - done), 1)
        if epoch_end:
            last["epoch_end"] = d
            if d["epoch"] == d["epochs"]:
                phase["name"] = "calibrating, exporting and publishing"
        elif "steps" not in d:  # a phase after training (selection, calibration): the last epoch's record stays
            d = {**last.get("epoch_end", {}), **d}
        else:
            for k in ("val_loss", "best_val_loss"):
                if k in last.get("epoch_end", {}):
                    d.setdefault(k, last["epoch_end"][k])
        report(d, force=epoch_end or force_phase)

    def should_stop() -> bool:
        now = time.monotonic()
        if not last["stop"] and now - last["poll"] >= CANCEL_POLL_S:
            last["poll"] = now
            last["stop"] = store.cancel_requested(job.id)
        return bool(last["stop"])

    report({}, force=True)
    try:
        if args.threads:
            os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        from stpm import bundle
        from stpm.options import from_params, updated
        from stpm.training.pipeline import run_training
        from stpm.methods.base import TrainingStopped

        params = job.params
        config = from_params(params)  # every section the API stored, validated again (stpm.options)
        config = config.model_copy(update={"train": updated(config.train, device=args.device)})  # the server's device
        job_dir = Path(job.job_dir)
        images = sorted((job_dir / IMAGES).iterdir())
        outcome = None
        try:
            outcome = run_training(
                images, job.name, args.models_dir, config, run_dir=job_dir / "run", weights_dir=args.weights_dir,
                skip_bad=False, resume=False, export=True, progress=progress, should_stop=should_stop, show_bar=False,
            )
        except TrainingStopped:
            pass
        if outcome is None or outcome.version is None:
            where = last.get("epoch_end", {}).get("epoch", 0)
            store.finish(job.id, "cancelled", token=args.token, error=f"cancelled while running "
                         f"(after {where} completed epoch(s)); no version was published")
            log.info("job %s cancelled", job.id)
            return 0
        note = None
        if params.get("activate"):
            try:
                bundle.set_active(args.models_dir, job.name, outcome.version)
            except Exception as e:  # noqa: BLE001
                note = f"published {job.name}/{outcome.version} but could not activate it: {readable_error(e)}"
        # the first version of a new name is activated by the publish itself (stpm.bundle)
        activated = bundle.get_active(args.models_dir, job.name) == outcome.version
        if not store.finish(job.id, "succeeded", token=args.token, version=outcome.version, activated=activated,
                            error=note):
            log.error("job %s: published %s but the job row was no longer ours", job.id, outcome.version)
        log.info("job %s succeeded: %s/%s", job.id, job.name, outcome.version)
        return 0
    except BaseException as e:
        log.exception("job %s failed", job.id)
        store.finish(job.id, "failed", token=args.token, error=readable_error(e))
        return 1


if __name__ == "__main__":
    sys.exit(main())
