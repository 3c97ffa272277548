"""The job store: one table of jobs, in SQLite (embedded default) or PostgreSQL (scaled out).

`JobStore(path_or_url)`: a file path (or `sqlite:///path`) is a SQLite file (WAL) in the data directory,
shared by the API and training processes; `postgresql://user:pass@host/db` is a PostgreSQL database
shared by API replicas and workers on several hosts. Every query is written once, in standard SQL with
`?` placeholders, and runs unchanged on both (`_conn()` adapts the placeholders for psycopg).

SQLite: every call opens its own short-lived connection (safe from threads and processes; SQLite
serialises writers, WAL lets readers proceed while a training process writes its progress).
PostgreSQL: a small connection pool per process (psycopg_pool), autocommit, connections checked on
checkout so a database restart costs one retry, not a failed request.

Every write is a single statement, so it is atomic on both without explicit transactions. A job row is
the single source of truth for its state:

    queued -> running -> succeeded | failed | cancelled        queued -> cancelled

A training process owns its row through a `run_token` drawn when the job is claimed: its writes are
guarded by `state = 'running' AND run_token = ?`, so a process that outlived its server or worker (or
was declared dead) can never overwrite the truth written meanwhile. Workers of the scaled mode also
write `heartbeat_at` while they supervise a run; a run whose heartbeat went stale belonged to a worker
that died (see app/jobs/worker.py, `sweep_stale`).
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED = ("succeeded", "failed", "cancelled")
STORE_ENV = "STPM_RUN_JOB_STORE"  # how a training process learns its store (a URL may hold a password)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    name TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    params TEXT NOT NULL,
    progress TEXT,
    created_at {real} NOT NULL,
    started_at {real},
    finished_at {real},
    updated_at {real} NOT NULL,
    error TEXT,
    version TEXT,
    activated INTEGER NOT NULL DEFAULT 0,
    job_dir TEXT NOT NULL,
    n_images INTEGER NOT NULL,
    fingerprint TEXT,
    uploads_deleted INTEGER NOT NULL DEFAULT 0,
    cancel_requested_at {real},
    pid INTEGER,
    run_token TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, seq);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_seq ON jobs (seq)
"""
# Columns added after the first release: added to an existing table when a store opens it.
_ADDED_COLUMNS = {
    "worker": "TEXT",  # who runs it: host name and worker process (scaled mode) or the server's host
    "heartbeat_at": "{real}",  # last sign of life of the process supervising the run (scaled mode)
    "enqueued_at": "{real}",  # when the job's task reached the broker (scaled mode)
}
_PG_LOCK = 7317001  # advisory lock id: one replica at a time creates or migrates the table


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
    worker: str | None = None
    heartbeat_at: float | None = None
    enqueued_at: float | None = None

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
            "worker": self.worker,
        }


def _row_to_job(r) -> Job:
    d = dict(r)
    d["params"] = json.loads(d["params"])
    d["progress"] = json.loads(d["progress"]) if d["progress"] else None
    d["activated"] = bool(d["activated"])
    d["uploads_deleted"] = bool(d["uploads_deleted"])
    return Job(**d)


def is_url(target: str | Path) -> bool:
    return "://" in str(target)


class _Row(tuple):
    """A psycopg row that reads like sqlite3.Row: by position, and by name (so dict(row) works)."""

    names: tuple[str, ...] = ()

    def keys(self) -> tuple[str, ...]:
        return self.names

    def __getitem__(self, key):  # type: ignore[override]
        if isinstance(key, str):
            return tuple.__getitem__(self, self.names.index(key))
        return tuple.__getitem__(self, key)


@functools.lru_cache(maxsize=64)
def _row_class(names: tuple[str, ...]) -> type[_Row]:
    return type("Row", (_Row,), {"names": names})


def _pg_row_factory(cursor):
    return _row_class(tuple(c.name for c in cursor.description or ()))


class _PgConn:
    """A pooled psycopg connection that takes the store's `?` SQL."""

    def __init__(self, conn):
        self.raw = conn

    def execute(self, sql: str, args: tuple | list = ()):
        assert "%" not in sql, "the store's SQL uses ? placeholders only"
        return self.raw.execute(sql.replace("?", "%s"), tuple(args))


class JobStore:
    """The job table. `target`: a SQLite file path (or sqlite:///path) or a postgresql:// URL."""

    def __init__(self, target: str | Path, pool_size: int = 4):
        self.kind = "postgresql" if str(target).startswith(("postgresql://", "postgres://")) else "sqlite"
        self._pool = None
        self._pool_lock = threading.Lock()
        if self.kind == "postgresql":
            self.url = str(target)
            self.path = None
            self.pool_size = pool_size
            with self._conn() as c:
                c.raw.execute("SELECT pg_advisory_lock(%s)", (_PG_LOCK,))
                try:
                    self._create_schema(c, "DOUBLE PRECISION")
                finally:
                    c.raw.execute("SELECT pg_advisory_unlock(%s)", (_PG_LOCK,))
        else:
            s = str(target)
            if is_url(s):
                if not s.startswith("sqlite:///"):
                    raise ValueError(f"job store {target!r}: use a file path, sqlite:///PATH or postgresql://...")
                s = s[len("sqlite:///"):]
            self.path = Path(s)
            self.url = str(self.path.resolve())
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._conn() as c:
                c.execute("PRAGMA journal_mode=WAL")
                self._create_schema(c, "REAL")

    def _create_schema(self, c, real: str) -> None:
        for stmt in _SCHEMA.format(real=real).split(";"):
            if stmt.strip():
                c.execute(stmt)
        if self.kind == "sqlite":
            have = {r[1] for r in c.execute("PRAGMA table_info(jobs)")}
        else:
            have = {r[0] for r in c.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = 'jobs'"
                " AND table_schema = current_schema()")}
        for col, typ in _ADDED_COLUMNS.items():
            if col not in have:
                c.execute(f"ALTER TABLE jobs ADD COLUMN {col} {typ.format(real=real)}")

    def _get_pool(self):
        with self._pool_lock:
            if self._pool is None:
                try:
                    from psycopg_pool import ConnectionPool
                except ImportError as e:
                    raise RuntimeError(f"a PostgreSQL job store needs psycopg: pip install 'stpm[scale]' ({e})") from None
                self._pool = ConnectionPool(
                    self.url, min_size=1, max_size=self.pool_size, open=True, timeout=30.0,
                    check=ConnectionPool.check_connection, name=f"stpm-jobs-{os.getpid()}",
                    kwargs={"autocommit": True, "row_factory": _pg_row_factory},
                )
            return self._pool

    @contextmanager
    def _conn(self):
        """A connection whose `execute(sql, args)` takes `?` placeholders on either backend."""
        if self.kind == "postgresql":
            with self._get_pool().connection() as raw:
                yield _PgConn(raw)
            return
        c = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        c.row_factory = sqlite3.Row
        try:
            c.execute("PRAGMA synchronous=FULL")  # a 202 means the row survives a power cut
            c.execute("PRAGMA busy_timeout=30000")
            yield c
        finally:
            c.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def _is_duplicate(self, e: Exception) -> bool:
        return isinstance(e, sqlite3.IntegrityError) or type(e).__name__ == "UniqueViolation"

    # ----- API side -----

    def create(self, job_id: str, name: str, params: dict[str, Any], job_dir: str | Path, n_images: int,
               fingerprint: str | None) -> Job:
        now = time.time()
        for attempt in range(20):  # PostgreSQL: two replicas may draw the same seq at once; the unique index says
            try:
                with self._conn() as c:
                    c.execute(
                        "INSERT INTO jobs (id, seq, name, state, params, created_at, updated_at, job_dir, n_images,"
                        " fingerprint) VALUES (?, (SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs), ?, 'queued', ?, ?, ?,"
                        " ?, ?, ?)",
                        (job_id, name, json.dumps(params), now, now, str(job_dir), n_images, fingerprint),
                    )
                break
            except Exception as e:  # noqa: BLE001 - re-raised unless it is the seq race
                if not self._is_duplicate(e) or self.get(job_id) is not None or attempt == 19:
                    raise
                time.sleep(0.005 * (attempt + 1))
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
            return [_row_to_job(r) for r in c.execute(q, (*args, limit, offset)).fetchall()]

    def ids(self) -> set[str]:
        with self._conn() as c:
            return {r[0] for r in c.execute("SELECT id FROM jobs").fetchall()}

    def counts(self) -> dict[str, int]:
        """Jobs per state (every state present, 0 included)."""
        with self._conn() as c:
            found = dict(c.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
        return {s: int(found.get(s, 0)) for s in STATES}

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

    def mark_enqueued(self, job_id: str) -> None:
        with self._conn() as c:
            c.execute("UPDATE jobs SET enqueued_at = ? WHERE id = ?", (time.time(), job_id))

    def queued(self, not_enqueued: bool = False) -> list[Job]:
        """Queued jobs, oldest first (only those whose task never reached the broker, if asked)."""
        q = "SELECT * FROM jobs WHERE state = 'queued'" + (" AND enqueued_at IS NULL" if not_enqueued else "")
        with self._conn() as c:
            return [_row_to_job(r) for r in c.execute(q + " ORDER BY seq").fetchall()]

    # ----- worker side -----

    def claim_next(self, worker: str | None = None) -> tuple[Job, str] | None:
        """Atomically move the oldest queued job to running; -> (job, run token) or None."""
        for _ in range(10):
            token = uuid.uuid4().hex
            now = time.time()
            with self._conn() as c:
                n = c.execute(
                    "UPDATE jobs SET state = 'running', started_at = ?, updated_at = ?, heartbeat_at = ?, run_token = ?,"
                    " worker = ?, pid = NULL, progress = NULL"
                    " WHERE id = (SELECT id FROM jobs WHERE state = 'queued' ORDER BY seq LIMIT 1) AND state = 'queued'",
                    (now, now, now, token, worker),
                ).rowcount
                if n == 0 and c.execute("SELECT 1 FROM jobs WHERE state = 'queued' LIMIT 1").fetchone():
                    continue  # PostgreSQL: another claimer took that row first; take the next
                r = c.execute("SELECT * FROM jobs WHERE run_token = ?", (token,)).fetchone() if n else None
            return (_row_to_job(r), token) if r else None
        return None

    def claim(self, job_id: str, worker: str | None = None) -> tuple[Job, str] | None:
        """Move this queued job to running; -> (job, run token), or None if it is not queued (any more)."""
        token = uuid.uuid4().hex
        now = time.time()
        with self._conn() as c:
            n = c.execute(
                "UPDATE jobs SET state = 'running', started_at = ?, updated_at = ?, heartbeat_at = ?, run_token = ?,"
                " worker = ?, pid = NULL, progress = NULL WHERE id = ? AND state = 'queued'",
                (now, now, now, token, worker, job_id),
            ).rowcount
        return (self.get(job_id), token) if n == 1 else None

    def set_pid(self, job_id: str, token: str, pid: int) -> None:
        with self._conn() as c:
            c.execute("UPDATE jobs SET pid = ? WHERE id = ? AND run_token = ?", (pid, job_id, token))

    def heartbeat(self, job_id: str, token: str) -> bool:
        """The supervising worker is alive; -> False when the run is no longer ours (settled meanwhile)."""
        with self._conn() as c:
            n = c.execute(
                "UPDATE jobs SET heartbeat_at = ? WHERE id = ? AND state = 'running' AND run_token = ?",
                (time.time(), job_id, token),
            ).rowcount
        return n == 1

    def running(self) -> list[Job]:
        with self._conn() as c:
            return [_row_to_job(r) for r in
                    c.execute("SELECT * FROM jobs WHERE state = 'running' ORDER BY seq").fetchall()]

    def stale_running(self, older_than_s: float) -> list[Job]:
        """Running jobs whose supervisor has not written a heartbeat for `older_than_s` seconds."""
        limit = time.time() - older_than_s
        with self._conn() as c:
            return [_row_to_job(r) for r in c.execute(
                "SELECT * FROM jobs WHERE state = 'running' AND COALESCE(heartbeat_at, started_at) < ? ORDER BY seq",
                (limit,)).fetchall()]

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
               version: str | None = None, activated: bool = False, stale_before: float | None = None) -> bool:
        """running -> a final state. With `token`, only the process that owns the run may do it; with
        `stale_before`, only if its heartbeat is older than that (a sweeper never overrides a live run)."""
        assert state in FINISHED, state
        now = time.time()
        q = ("UPDATE jobs SET state = ?, finished_at = ?, updated_at = ?, error = ?, version = ?, activated = ?"
             " WHERE id = ? AND state = 'running'")
        args: list[Any] = [state, now, now, error, version, int(activated), job_id]
        if token is not None:
            q += " AND run_token = ?"
            args.append(token)
        if stale_before is not None:
            q += " AND COALESCE(heartbeat_at, started_at) < ?"
            args.append(stale_before)
        with self._conn() as c:
            return c.execute(q, args).rowcount == 1

    def mark_uploads_deleted(self, job_id: str) -> None:
        with self._conn() as c:
            c.execute("UPDATE jobs SET uploads_deleted = 1 WHERE id = ?", (job_id,))
