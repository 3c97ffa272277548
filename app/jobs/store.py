"""The job store: one SQLite file (WAL) in the data directory, shared by the API and training processes.

Every call opens its own short-lived connection, so the store is safe from threads and processes alike
(SQLite serialises writers; WAL lets readers proceed while a training process writes its progress).
A job row is the single source of truth for its state:

    queued -> running -> succeeded | failed | cancelled        queued -> cancelled

A training process owns its row through a `run_token` drawn when the job is claimed: its writes are
guarded by `state = 'running' AND run_token = ?`, so a process that outlived its server (or was
declared dead) can never overwrite the truth the server wrote meanwhile.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED = ("succeeded", "failed", "cancelled")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    name TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    params TEXT NOT NULL,
    progress TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    updated_at REAL NOT NULL,
    error TEXT,
    version TEXT,
    activated INTEGER NOT NULL DEFAULT 0,
    job_dir TEXT NOT NULL,
    n_images INTEGER NOT NULL,
    fingerprint TEXT,
    uploads_deleted INTEGER NOT NULL DEFAULT 0,
    cancel_requested_at REAL,
    pid INTEGER,
    run_token TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, seq);
"""


def iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class Job:
    id: str
    seq: int
    name: str
    state: str
    params: dict[str, Any]
    progress: dict[str, Any] | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    updated_at: float
    error: str | None
    version: str | None
    activated: bool
    job_dir: str
    n_images: int
    fingerprint: str | None
    uploads_deleted: bool
    cancel_requested_at: float | None
    pid: int | None
    run_token: str | None = field(repr=False, default=None)

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    def public(self) -> dict[str, Any]:
        """What the API shows (no pid, no token, no local paths)."""
        return {
            "job_id": self.id,
            "name": self.name,
            "state": self.state,
            "params": self.params,
            "progress": self.progress,
            "created_at": iso(self.created_at),
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
            "updated_at": iso(self.updated_at),
            "error": self.error,
            "version": self.version,
            "model": f"{self.name}/{self.version}" if self.version else None,
            "activated": self.activated,
            "n_images": self.n_images,
            "uploads_kept": not self.uploads_deleted,
            "cancel_requested": self.cancel_requested_at is not None,
        }


def _row_to_job(r: sqlite3.Row) -> Job:
    d = dict(r)
    d["params"] = json.loads(d["params"])
    d["progress"] = json.loads(d["progress"]) if d["progress"] else None
    d["activated"] = bool(d["activated"])
    d["uploads_deleted"] = bool(d["uploads_deleted"])
    return Job(**d)


class JobStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._conn() as c:
            c.execute("PRAGMA journal_mode=WAL")
            c.executescript(_SCHEMA)

    @contextmanager
    def _conn(self):
        c = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        c.row_factory = sqlite3.Row
        try:
            c.execute("PRAGMA synchronous=FULL")  # a 202 means the row survives a power cut
            c.execute("PRAGMA busy_timeout=30000")
            yield c
        finally:
            c.close()

    # ----- API side -----

    def create(self, job_id: str, name: str, params: dict[str, Any], job_dir: str | Path, n_images: int,
               fingerprint: str | None) -> Job:
        now = time.time()
        with self._conn() as c:
            c.execute("BEGIN IMMEDIATE")
            seq = c.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()[0]
            c.execute(
                "INSERT INTO jobs (id, seq, name, state, params, created_at, updated_at, job_dir, n_images, fingerprint)"
                " VALUES (?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?)",
                (job_id, seq, name, json.dumps(params), now, now, str(job_dir), n_images, fingerprint),
            )
            c.execute("COMMIT")
        return self.get(job_id)

    def get(self, job_id: str) -> Job | None:
        with self._conn() as c:
            r = c.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _row_to_job(r) if r else None

    def list(self, state: str | None = None, limit: int = 100, offset: int = 0) -> list[Job]:
        q, args = "SELECT * FROM jobs", []
        if state:
            q += " WHERE state = ?"
            args.append(state)
        q += " ORDER BY seq DESC LIMIT ? OFFSET ?"
        with self._conn() as c:
            return [_row_to_job(r) for r in c.execute(q, (*args, limit, offset))]

    def ids(self) -> set[str]:
        with self._conn() as c:
            return {r[0] for r in c.execute("SELECT id FROM jobs")}

    def queue_position(self, job: Job) -> int | None:
        """1 = next to run."""
        if job.state != "queued":
            return None
        with self._conn() as c:
            return c.execute("SELECT COUNT(*) FROM jobs WHERE state = 'queued' AND seq <= ?", (job.seq,)).fetchone()[0]

    def cancel_queued(self, job_id: str) -> bool:
        now = time.time()
        with self._conn() as c:
            n = c.execute(
                "UPDATE jobs SET state = 'cancelled', finished_at = ?, updated_at = ?, cancel_requested_at = ?,"
                " error = 'cancelled before it started' WHERE id = ? AND state = 'queued'",
                (now, now, now, job_id),
            ).rowcount
        return n == 1

    def request_cancel(self, job_id: str) -> bool:
        now = time.time()
        with self._conn() as c:
            n = c.execute(
                "UPDATE jobs SET cancel_requested_at = COALESCE(cancel_requested_at, ?), updated_at = ?"
                " WHERE id = ? AND state = 'running'",
                (now, now, job_id),
            ).rowcount
        return n == 1

    # ----- worker side -----

    def claim_next(self) -> tuple[Job, str] | None:
        """Atomically move the oldest queued job to running; -> (job, run token) or None."""
        token = uuid.uuid4().hex
        now = time.time()
        with self._conn() as c:
            c.execute("BEGIN IMMEDIATE")
            r = c.execute("SELECT id FROM jobs WHERE state = 'queued' ORDER BY seq LIMIT 1").fetchone()
            if r is None:
                c.execute("COMMIT")
                return None
            c.execute(
                "UPDATE jobs SET state = 'running', started_at = ?, updated_at = ?, run_token = ?, pid = NULL,"
                " progress = NULL WHERE id = ?",
                (now, now, token, r[0]),
            )
            c.execute("COMMIT")
        return self.get(r[0]), token

    def set_pid(self, job_id: str, token: str, pid: int) -> None:
        with self._conn() as c:
            c.execute("UPDATE jobs SET pid = ? WHERE id = ? AND run_token = ?", (pid, job_id, token))

    def running(self) -> list[Job]:
        with self._conn() as c:
            return [_row_to_job(r) for r in c.execute("SELECT * FROM jobs WHERE state = 'running' ORDER BY seq")]

    def set_progress(self, job_id: str, token: str, progress: dict[str, Any]) -> bool:
        with self._conn() as c:
            n = c.execute(
                "UPDATE jobs SET progress = ?, updated_at = ? WHERE id = ? AND state = 'running' AND run_token = ?",
                (json.dumps(progress), time.time(), job_id, token),
            ).rowcount
        return n == 1

    def cancel_requested(self, job_id: str) -> bool:
        with self._conn() as c:
            r = c.execute("SELECT cancel_requested_at, state FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return r is None or r[0] is not None or r[1] != "running"

    def finish(self, job_id: str, state: str, *, token: str | None = None, error: str | None = None,
               version: str | None = None, activated: bool = False) -> bool:
        """running -> a final state. With `token`, only the process that owns the run may do it."""
        assert state in FINISHED, state
        now = time.time()
        q = ("UPDATE jobs SET state = ?, finished_at = ?, updated_at = ?, error = ?, version = ?, activated = ?"
             " WHERE id = ? AND state = 'running'")
        args: list[Any] = [state, now, now, error, version, int(activated), job_id]
        if token is not None:
            q += " AND run_token = ?"
            args.append(token)
        with self._conn() as c:
            return c.execute(q, args).rowcount == 1

    def mark_uploads_deleted(self, job_id: str) -> None:
        with self._conn() as c:
            c.execute("UPDATE jobs SET uploads_deleted = 1 WHERE id = ?", (job_id,))
