"""Running training jobs: the narrow `JobRunner` interface and the embedded `LocalRunner`.

The API only ever calls `submit(job_id)` (the job row exists, state queued, uploads stored) and
`cancel(job_id)`; everything else goes through the job store. The scaled mode's runner is
`app.jobs.celery_queue.CeleryRunner` (Celery on Redis, `stpm worker` on GPU hosts): its workers use a
`LocalRunner` that is never started as a process supervisor (`run_blocking`), and every replica uses
`sweep_stale` to settle the jobs of workers that died (docs/SCALING.md).

`LocalRunner`: one thread in the server process that starts each job as a separate process
(`python -m app.jobs.run_job`; torch is imported only there), at most `train_concurrency` at once,
oldest first. A crash, an OOM kill or `kill -9` of that process only fails its job. When several
server processes share a data directory, the one holding `<data_dir>/worker.lock` runs the jobs; the
others only queue them (and take over if the holder dies).

Restart semantics (chosen: fail, not resume): a job found `running` when a worker starts belonged to a
server that died; its training process is killed if it still exists, and the job becomes `failed`
with "server restarted while the job was running; resubmit" (or `succeeded`, if its version had
already been published, or `cancelled`, if a cancel had been asked for). Queued jobs keep their
uploads and run. Leftover staging folders of interrupted publishes are removed before any job starts.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Protocol

from app.jobs.store import STORE_ENV, Job, JobStore, StoreUnavailable
from app.jobs.uploads import IMAGES, clean_incoming
from app.settings import Settings

log = logging.getLogger("app.jobs")
REPO = Path(__file__).resolve().parents[2]
POLL_S = 0.25
KILL_AFTER_TERM_S = 5.0
CANCEL_CHECK_S = 1.0  # how often a Celery worker checks whether its job's cancel grace has run out
RESTART_REASON = "server restarted while the job was running; resubmit it (its uploads are kept: {kept})"
WORKER_STOPPED = "the worker stopped while the job was running; resubmit it"
WORKER_LOST = ("its worker {worker} stopped sending heartbeats {age:.0f} s ago (the worker or its host died, or lost "
               "the job database); resubmit it")


class JobRunner(Protocol):
    """What the API needs from a job engine."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def submit(self, job_id: str) -> None:
        """Run a queued job (its row and uploads exist) when a slot is free."""

    def cancel(self, job_id: str) -> Job | None:
        """Cancel a queued job at once, or ask a running one to stop; -> the job as it is now."""


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (out of memory, or killed by someone)" if -code == signal.SIGKILL else ""
        return f"the training process was killed by {name}{hint}"
    return f"the training process exited with code {code} without reporting a result"


def _log_tail(path: Path, n: int = 6) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])[-800:]


def _is_our_process(pid: int, job_id: str) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"app.jobs.run_job" in cmd and job_id.encode() in cmd


def _kill_and_wait(pid: int, timeout: float = 10.0) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        if Path(f"/proc/{pid}/stat").is_file():
            try:  # a zombie (our own child) counts as gone
                if Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z"):
                    return
            except (OSError, IndexError):
                pass
        time.sleep(0.05)


def _stop_child(child: _Child) -> None:
    child.proc.kill()
    try:
        child.proc.wait(10)
    except subprocess.TimeoutExpired:
        log.error("training process %d did not die after SIGKILL", child.proc.pid)


class _Child:
    def __init__(self, job: Job, token: str, proc: subprocess.Popen, log_path: Path):
        self.job, self.token, self.proc, self.log_path = job, token, proc, log_path
        self.terminated_at: float | None = None


class LocalRunner:
    def __init__(self, store: JobStore, settings: Settings, python: str = sys.executable):
        self.store = store
        self.settings = settings
        self.python = python
        self.models_dir = Path(settings.models_dir).resolve()
        self.data_dir = settings.jobs_data_dir
        self.jobs_root = self.data_dir / "jobs"
        self.concurrency = settings.train_concurrency
        self._children: dict[str, _Child] = {}
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock_fd: int | None = None
        self.is_leader = False
        self.worker_name = f"local@{socket.gethostname()}"

    # ----- JobRunner -----

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="train-worker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(30)
        for child in list(self._children.values()):  # server shutdown: the job cannot finish
            if child.proc.poll() is None:
                child.proc.kill()
                child.proc.wait(10)
            self._settle(child.job.id, "server stopped while the job was running; resubmit it")
        self._children.clear()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def submit(self, job_id: str) -> None:
        self._wake.set()

    def cancel(self, job_id: str) -> Job | None:
        job = self.store.get(job_id)
        if job is None:
            return None
        if job.state == "queued" and self.store.cancel_queued(job_id):
            self._retention(job_id)
        elif job.state == "running":
            self.store.request_cancel(job_id)
            self._wake.set()
        return self.store.get(job_id)

    # ----- the worker thread -----

    def _try_lock(self) -> bool:
        if self.is_leader:
            return True
        import fcntl

        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.data_dir / "worker.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._lock_fd = fd
        self.is_leader = True
        return True

    def _run(self) -> None:
        last_lock_try = 0.0
        while not self._stopping.is_set():
            try:
                if not self.is_leader:
                    if time.monotonic() - last_lock_try >= 2.0:
                        last_lock_try = time.monotonic()
                        if self._try_lock():
                            self.recover()
                    self._wake.wait(2.0)
                    self._wake.clear()
                    continue
                self._tick()
            except Exception:
                log.exception("training worker loop failed; retrying")
                time.sleep(1.0)
            self._wake.wait(POLL_S)
            self._wake.clear()

    def recover(self) -> None:
        """Start-up (as the leader): settle jobs left running, remove partial publishes and uploads."""
        from stpm.bundle import clean_staging

        for job in self.store.running():
            if job.pid and _is_our_process(job.pid, job.id):
                log.warning("job %s: killing its training process %d left from a previous server", job.id, job.pid)
                _kill_and_wait(job.pid)
            kept = "yes" if not job.uploads_deleted and self.settings.train_upload_retention == "keep" else "no"
            self._settle(job.id, RESTART_REASON.format(kept=kept))
        removed = clean_staging(self.models_dir)
        if removed:
            log.warning("removed %d unfinished publish folder(s): %s", len(removed), [str(p) for p in removed])
        clean_incoming(self.jobs_root, self.store.ids(), min_age_s=300.0)

    def _tick(self) -> None:
        for job_id, child in list(self._children.items()):
            code = child.proc.poll()
            if code is not None:
                del self._children[job_id]
                self._reap(child, code)
            else:
                self._escalate_cancel(child)
        while len(self._children) < self.concurrency and not self._stopping.is_set():
            claimed = self.store.claim_next(worker=self.worker_name)
            if claimed is None:
                break
            self._launch(*claimed)

    def _launch(self, job: Job, token: str) -> None:
        job_dir = Path(job.job_dir)
        log_path = job_dir / "log.txt"
        cmd = [
            self.python, "-m", "app.jobs.run_job", job.id,
            "--token", token, "--models-dir", str(self.models_dir), "--device", self.settings.train_device,
            "--db-grace", str(self.settings.job_stale_after_s),  # then the sweep fails the job: stop waiting
        ]
        if self.settings.train_threads:
            cmd += ["--threads", str(self.settings.train_threads)]
        if self.settings.train_weights_dir:
            cmd += ["--weights-dir", str(Path(self.settings.train_weights_dir).resolve())]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               STORE_ENV: self.store.url}  # not on the command line: a database URL may hold a password
        try:
            with open(log_path, "ab") as out:
                proc = subprocess.Popen(cmd, cwd=job_dir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as e:
            self.store.finish(job.id, "failed", token=token, error=f"cannot start the training process: {e}")
            self._retention(job.id)
            return
        self.store.set_pid(job.id, token, proc.pid)
        self._children[job.id] = _Child(job, token, proc, log_path)
        log.info("job %s (%s) started as process %d", job.id, job.name, proc.pid)

    # ----- the Celery worker's side (app.jobs.celery_queue) -----

    def run_blocking(self, job: Job, token: str, should_abort: Callable[[], bool] = lambda: False) -> str:
        """Run one claimed job to its end in the calling thread: start its process, mark the run alive
        every `job_heartbeat_s`, honour cancel requests, settle the row; -> the job's final state.
        `should_abort()` true (the worker is shutting down) stops the job as failed."""
        self._launch(job, token)
        child = self._children.pop(job.id, None)
        if child is None:  # the process could not start; _launch failed the job
            return self._state(job.id)
        next_beat = next_cancel_check = 0.0
        while (code := child.proc.poll()) is None:
            try:
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + self.settings.job_heartbeat_s
                    if not self.store.heartbeat(job.id, token):
                        log.warning("job %s: its row was settled by another process (no heartbeat seen in time); "
                                    "stopping its training process", job.id)
                        _stop_child(child)
                        self._retention(job.id)
                        return self._state(job.id)
                if should_abort():
                    _stop_child(child)
                    self._settle(job.id, WORKER_STOPPED)
                    return self._state(job.id)
                if time.monotonic() >= next_cancel_check:  # the training process itself polls more often
                    next_cancel_check = time.monotonic() + CANCEL_CHECK_S
                    self._escalate_cancel(child)
            except Exception as e:  # noqa: BLE001 - the job store is unreachable: keep supervising, retry
                log.warning("job %s: job store unreachable (%s); retrying", job.id, e)
            time.sleep(POLL_S)
        try:
            self._reap(child, code)
            return self._state(job.id)
        except StoreUnavailable as e:  # the row's last heartbeat goes stale: the sweep settles it
            log.warning("job %s: its training process exited (%s) while %s; the job is settled by the sweep", job.id,
                        _exit_reason(code) if code else "code 0", e)
            return "unknown"

    def sweep_stale(self, stale_after_s: float) -> list[str]:
        """Settle running jobs whose worker stopped sending heartbeats (it died); -> their ids.
        Safe from any number of replicas at once: each settle is one guarded update."""
        settled = []
        for job in self.store.stale_running(stale_after_s):
            age = time.time() - (job.heartbeat_at or job.started_at or time.time())
            reason = WORKER_LOST.format(worker=job.worker or "?", age=age)
            if self._settle(job.id, reason, stale_before=time.time() - stale_after_s):
                log.warning("job %s: %s", job.id, reason)
                settled.append(job.id)
        return settled

    def _state(self, job_id: str) -> str:
        job = self.store.get(job_id)
        return job.state if job is not None else "missing"

    def _escalate_cancel(self, child: _Child) -> None:
        job = self.store.get(child.job.id)
        if job is None or job.cancel_requested_at is None:
            return
        waited = time.time() - job.cancel_requested_at
        if child.terminated_at is None and waited >= self.settings.train_cancel_grace_s:
            log.warning("job %s: still running %.0fs after cancel; terminating it", job.id, waited)
            child.proc.terminate()
            child.terminated_at = time.monotonic()
        elif child.terminated_at is not None and time.monotonic() - child.terminated_at > KILL_AFTER_TERM_S:
            child.proc.kill()

    def _reap(self, child: _Child, code: int) -> None:
        job = self.store.get(child.job.id)
        if job is not None and job.state == "running":  # the process did not write its own result
            tail = _log_tail(child.log_path)
            reason = _exit_reason(code) + (f"; last log lines: {tail}" if tail and code > 0 else "")
            self._settle(job.id, reason)
        self._retention(child.job.id)
        log.info("job %s finished: %s", child.job.id, self.store.get(child.job.id).state)

    def _settle(self, job_id: str, reason: str, stale_before: float | None = None) -> bool:
        """A running job whose process is gone: tell the truth about it; -> whether this call settled it.
        `stale_before`: only if its heartbeat is older (the job of a dead worker, never a live one)."""
        job = self.store.get(job_id)
        if job is None or job.state != "running":
            return False
        version = self._published_version(job)
        if version is not None:
            done = self.store.finish(job_id, "succeeded", version=version, stale_before=stale_before,
                                     error=f"{job.name}/{version} was published, then {reason}"
                                     + ("; it was not activated" if job.params.get("activate") else ""))
        elif job.cancel_requested_at is not None:
            done = self.store.finish(job_id, "cancelled", stale_before=stale_before,
                                     error="cancelled; the training process was stopped and no version was published")
        else:
            done = self.store.finish(job_id, "failed", error=reason, stale_before=stale_before)
        self._retention(job_id)
        return done

    def _published_version(self, job: Job) -> str | None:
        """The version this job published, if it got that far (same data fingerprint, created after start)."""
        from stpm import bundle
        from stpm.bundle.manifest import Manifest

        if not job.fingerprint or job.started_at is None:
            return None
        try:
            versions = bundle.list_versions(self.models_dir, job.name)
        except bundle.BundleError:
            return None
        for v in reversed(versions):
            try:
                man = Manifest.read(self.models_dir / job.name / v)
                created = datetime.fromisoformat(man.created_at or "").timestamp()
            except (bundle.BundleError, ValueError):
                continue
            if man.data.get("fingerprint") == job.fingerprint and created >= job.started_at - 1.0:
                return v
        return None

    def _retention(self, job_id: str) -> None:
        job = self.store.get(job_id)
        if job is None or not job.finished:
            return
        job_dir = Path(job.job_dir)
        shutil.rmtree(job_dir / "run", ignore_errors=True)  # checkpoints: jobs are not resumed
        if self.settings.train_upload_retention == "delete" and not job.uploads_deleted:
            shutil.rmtree(job_dir / IMAGES, ignore_errors=True)
            self.store.mark_uploads_deleted(job_id)
