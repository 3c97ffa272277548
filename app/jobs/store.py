"""The job store: one table of jobs (app/jobs/schema.py), in SQLite (embedded default) or PostgreSQL
(scaled out), through SQLAlchemy Core.

`JobStore(path_or_url)`: a file path (or `sqlite:///path`) is a SQLite file (WAL) in the data directory,
shared by the API and training processes; `postgresql://user:pass@host/db` is a PostgreSQL database
(driver psycopg) shared by API replicas and workers on several hosts. Every query is written once, as a
SQLAlchemy expression, and compiles for either dialect.

Each process has one engine: a small connection pool (SQLite: its connections set `synchronous=FULL`
and a 30 s busy timeout; PostgreSQL: `pool_size` connections, pinged on checkout, so a database restart
costs one reconnect, not a failed request; a connection attempt or an unacknowledged send gives up after
10 s, so a database host cut off by the network is noticed instead of waited for). While PostgreSQL cannot
be reached, every method raises `StoreUnavailable` with the driver's reason (the API answers 503 with it).
Connections autocommit, and every write is a single statement, so it is atomic on both without explicit
transactions; creating a job is the exception: the queue is counted and the row inserted (its seq drawn)
under one lock (`create(max_queued=...)`), so concurrent submits never exceed the queue cap and never draw
the same seq. A job row is the single source of truth for its state:

    queued -> running -> succeeded | failed | cancelled        queued -> cancelled

A training process owns its row through a `run_token` drawn when the job is claimed: its writes are
guarded by `state = 'running' AND run_token = ?`, so a process that outlived its server or worker (or
was declared dead) can never overwrite the truth written meanwhile. Workers of the scaled mode also
write `heartbeat_at` while they supervise a run; a run whose heartbeat went stale belonged to a worker
that died (see app/jobs/worker.py, `sweep_stale`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (
    URL,
    ColumnElement,
    Connection,
    Engine,
    Select,
    create_engine,
    event,
    func,
    insert,
    make_url,
    select,
    text,
    update,
)
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from app.jobs.errors import QueueFullError, StoreUnavailable
from app.jobs.schema import FINISHED, STATES, ensure_schema, jobs

__all__ = ["FINISHED", "STATES", "STORE_ENV", "Job", "JobStore", "QueueFullError", "StoreUnavailable", "is_url",
           "iso"]

STORE_ENV = "STPM_RUN_JOB_STORE"  # how a training process learns its store (a URL may hold a password)
_PG_LOCK = 7317001  # advisory lock id: one replica at a time creates or migrates the table
_PG_CREATE_LOCK = 7317002  # advisory lock id: one creator at a time counts the queue and draws a seq
# PostgreSQL (libpq): give up a connection attempt, or a connection whose sent data stays unacknowledged
# (the database host vanished from the network), after this long; a postgresql:// URL's own
# ?connect_timeout=S&tcp_user_timeout=MS win
_PG_TIMEOUTS = {"connect_timeout": 10, "tcp_user_timeout": 10_000}
_UNREACHABLE = (OperationalError, InterfaceError, PoolTimeout)  # PostgreSQL: down, restarting or cut off


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

    @classmethod
    def from_row(cls, row) -> Job:
        d = dict(row._mapping)
        d["activated"] = bool(d["activated"])
        d["uploads_deleted"] = bool(d["uploads_deleted"])
        return cls(**d)

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


def is_url(target: str | Path) -> bool:
    return "://" in str(target)


def _sqlite_path(target: str | Path) -> Path:
    s = str(target)
    if is_url(s):
        if not s.startswith("sqlite:///"):
            raise ValueError(f"job store {target!r}: use a file path, sqlite:///PATH or postgresql://...")
        s = s[len("sqlite:///"):]
    return Path(s)


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA synchronous=FULL")  # a 202 means the row survives a power cut
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def _postgres_engine(url: str, pool_size: int) -> Engine:
    try:
        import psycopg  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"a PostgreSQL job store needs psycopg: pip install 'stpm[scale]' ({e})") from None
    u = make_url(url).set(drivername="postgresql+psycopg")
    timeouts = {k: v for k, v in _PG_TIMEOUTS.items() if k not in u.query}
    return create_engine(u, isolation_level="AUTOCOMMIT", pool_size=pool_size, max_overflow=0, pool_timeout=30.0,
                         pool_pre_ping=True, connect_args=timeouts)


WAL_SWITCH_S = 30.0  # how long opening a store keeps retrying the switch to WAL (the busy timeout's length)


def _enable_wal(conn: Connection) -> None:
    """Put a SQLite store in WAL mode. Several processes opening a new store at once all ask for the switch,
    which needs the database to itself; SQLite answers one that would deadlock with "database is locked"
    at once, without waiting out the busy timeout. Retry with backoff until the switch is made (by this
    process or another one), for up to WAL_SWITCH_S."""
    deadline, delay = time.monotonic() + WAL_SWITCH_S, 0.005
    while True:
        try:
            conn.exec_driver_sql("PRAGMA journal_mode=WAL")
            return
        except OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
        time.sleep(delay)
        delay = min(2 * delay, 0.25)


def _sqlite_engine(path: Path) -> Engine:
    engine = create_engine(URL.create("sqlite", database=str(path)), isolation_level="AUTOCOMMIT",
                           connect_args={"timeout": 30.0})
    event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _claimed(token: str, worker: str | None) -> dict[str, Any]:
    """The values that move a queued row to running under a new run token."""
    now = time.time()
    return {"state": "running", "started_at": now, "updated_at": now, "heartbeat_at": now, "run_token": token,
            "worker": worker, "pid": None, "progress": None}


class JobStore:
    """The job table. `target`: a SQLite file path (or sqlite:///path) or a postgresql:// URL."""

    def __init__(self, target: str | Path, pool_size: int = 4):
        self.kind = "postgresql" if str(target).startswith(("postgresql://", "postgres://")) else "sqlite"
        if self.kind == "postgresql":
            self.url, self.path = str(target), None
            self.engine = _postgres_engine(self.url, pool_size)
        else:
            self.path = _sqlite_path(target)
            self.url = str(self.path.resolve())
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.engine = _sqlite_engine(self.path)
        self._create_schema()

    @contextmanager
    def _connect(self) -> Iterator[Connection]:
        """A pooled connection; PostgreSQL out of reach raises StoreUnavailable (its reason, no password)."""
        try:
            with self.engine.connect() as c:
                yield c
        except _UNREACHABLE as e:
            if self.kind != "postgresql":
                raise
            u = self.engine.url
            reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0][:300]
            raise StoreUnavailable(f"the job database {u.host}:{u.port or 5432}/{u.database} is unreachable: "
                                   f"{reason}") from e

    def _create_schema(self) -> None:
        if self.kind == "sqlite":
            with self._connect() as c:
                _enable_wal(c)
                ensure_schema(c)
            return
        with self.transaction() as c:  # DDL is transactional in PostgreSQL: all of it or none
            c.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK})
            ensure_schema(c)

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A connection whose statements commit together at the end (rolled back on an error)."""
        with self._connect() as c:
            c.execution_options(isolation_level="SERIALIZABLE" if self.kind == "sqlite" else "READ COMMITTED")
            with c.begin():
                yield c

    def close(self) -> None:
        self.engine.dispose()

    def _jobs(self, query: Select) -> list[Job]:
        with self._connect() as c:
            return [Job.from_row(r) for r in c.execute(query)]

    def _scalar(self, query: Select) -> Any:
        with self._connect() as c:
            return c.execute(query).scalar()

    def _update(self, *where: ColumnElement[bool], **values: Any) -> bool:
        """One guarded UPDATE; -> whether it changed exactly one row."""
        with self._connect() as c:
            return c.execute(update(jobs).where(*where).values(**values)).rowcount == 1

    # ----- API side -----

    def create(self, job_id: str, name: str, params: dict[str, Any], job_dir: str | Path, n_images: int,
               fingerprint: str | None, max_queued: int | None = None) -> Job:
        """Insert a queued job. With `max_queued`, the queue is counted and the row inserted under one lock
        (SQLite: an immediate transaction; PostgreSQL: an advisory lock), so concurrent submits can never
        queue more: QueueFullError otherwise."""
        now = time.time()
        row = insert(jobs).values(
            id=job_id, seq=select(func.coalesce(func.max(jobs.c.seq), 0) + 1).scalar_subquery(), name=name,
            state="queued", params=params, created_at=now, updated_at=now, job_dir=str(job_dir),
            n_images=n_images, fingerprint=fingerprint)
        with self._creating() as c:
            if max_queued is not None:
                queued = c.execute(select(func.count()).where(jobs.c.state == "queued")).scalar()
                if queued >= max_queued:
                    raise QueueFullError(queued, max_queued)
            c.execute(row)
        return self.get(job_id)

    @contextmanager
    def _creating(self) -> Iterator[Connection]:
        """A connection on which the queue's count and a new row's seq are drawn by one creator at a time."""
        if self.kind == "postgresql":
            with self.transaction() as c:
                c.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_CREATE_LOCK})
                yield c
            return
        with self._connect() as c:  # autocommit: the transaction is ours to open
            c.exec_driver_sql("BEGIN IMMEDIATE")  # the write lock first (waits up to busy_timeout)
            try:
                yield c
            except BaseException:
                c.exec_driver_sql("ROLLBACK")
                raise
            c.exec_driver_sql("COMMIT")

    def get(self, job_id: str) -> Job | None:
        found = self._jobs(select(jobs).where(jobs.c.id == job_id))
        return found[0] if found else None

    def list(self, state: str | None = None, limit: int = 100, offset: int = 0) -> list[Job]:
        query = select(jobs).order_by(jobs.c.seq.desc()).limit(limit).offset(offset)
        return self._jobs(query.where(jobs.c.state == state) if state else query)

    def ids(self) -> set[str]:
        with self._connect() as c:
            return set(c.execute(select(jobs.c.id)).scalars())

    def counts(self) -> dict[str, int]:
        """Jobs per state (every state present, 0 included)."""
        with self._connect() as c:
            found = dict(c.execute(select(jobs.c.state, func.count()).group_by(jobs.c.state)).all())
        return {s: int(found.get(s, 0)) for s in STATES}

    def queue_position(self, job: Job) -> int | None:
        """1 = next to run."""
        if job.state != "queued":
            return None
        return self._scalar(select(func.count()).where(jobs.c.state == "queued", jobs.c.seq <= job.seq))

    def cancel_queued(self, job_id: str) -> bool:
        now = time.time()
        return self._update(jobs.c.id == job_id, jobs.c.state == "queued", state="cancelled", finished_at=now,
                            updated_at=now, cancel_requested_at=now, error="cancelled before it started")

    def request_cancel(self, job_id: str) -> bool:
        now = time.time()
        return self._update(jobs.c.id == job_id, jobs.c.state == "running", updated_at=now,
                            cancel_requested_at=func.coalesce(jobs.c.cancel_requested_at, now))

    def mark_enqueued(self, job_id: str) -> None:
        self._update(jobs.c.id == job_id, enqueued_at=time.time())

    def queued(self, not_enqueued: bool = False) -> list[Job]:
        """Queued jobs, oldest first (only those whose task never reached the broker, if asked)."""
        query = select(jobs).where(jobs.c.state == "queued").order_by(jobs.c.seq)
        return self._jobs(query.where(jobs.c.enqueued_at.is_(None)) if not_enqueued else query)

    # ----- worker side -----

    def claim_next(self, worker: str | None = None) -> tuple[Job, str] | None:
        """Atomically move the oldest queued job to running; -> (job, run token) or None."""
        oldest = select(jobs.c.id).where(jobs.c.state == "queued").order_by(jobs.c.seq).limit(1).scalar_subquery()
        for _ in range(10):
            claimed = self._claim(jobs.c.id == oldest, worker)
            if claimed is not None:
                return claimed
            if self._scalar(select(jobs.c.id).where(jobs.c.state == "queued").limit(1)) is None:
                return None
            # PostgreSQL: another claimer took that row first; take the next
        return None

    def claim(self, job_id: str, worker: str | None = None) -> tuple[Job, str] | None:
        """Move this queued job to running; -> (job, run token), or None if it is not queued (any more)."""
        return self._claim(jobs.c.id == job_id, worker)

    def _claim(self, which: ColumnElement[bool], worker: str | None) -> tuple[Job, str] | None:
        token = uuid.uuid4().hex
        query = (update(jobs).where(which, jobs.c.state == "queued").values(**_claimed(token, worker))
                 .returning(*jobs.columns))
        with self._connect() as c:
            row = c.execute(query).first()
        return (Job.from_row(row), token) if row is not None else None

    def set_pid(self, job_id: str, token: str, pid: int) -> None:
        self._update(jobs.c.id == job_id, jobs.c.run_token == token, pid=pid)

    def heartbeat(self, job_id: str, token: str) -> bool:
        """The supervising worker is alive; -> False when the run is no longer ours (settled meanwhile)."""
        return self._update(*_owned(job_id, token), heartbeat_at=time.time())

    def running(self) -> list[Job]:
        return self._jobs(select(jobs).where(jobs.c.state == "running").order_by(jobs.c.seq))

    def stale_running(self, older_than_s: float) -> list[Job]:
        """Running jobs whose supervisor has not written a heartbeat for `older_than_s` seconds."""
        return self._jobs(select(jobs).where(jobs.c.state == "running", _stale(time.time() - older_than_s))
                          .order_by(jobs.c.seq))

    def set_progress(self, job_id: str, token: str, progress: dict[str, Any]) -> bool:
        return self._update(*_owned(job_id, token), progress=progress, updated_at=time.time())

    def cancel_requested(self, job_id: str) -> bool:
        with self._connect() as c:
            r = c.execute(select(jobs.c.cancel_requested_at, jobs.c.state).where(jobs.c.id == job_id)).first()
        return r is None or r.cancel_requested_at is not None or r.state != "running"

    def finish(self, job_id: str, state: str, *, token: str | None = None, error: str | None = None,
               version: str | None = None, activated: bool = False, stale_before: float | None = None) -> bool:
        """running -> a final state. With `token`, only the process that owns the run may do it; with
        `stale_before`, only if its heartbeat is older than that (a sweeper never overrides a live run)."""
        assert state in FINISHED, state
        where = [jobs.c.id == job_id, jobs.c.state == "running"]
        if token is not None:
            where.append(jobs.c.run_token == token)
        if stale_before is not None:
            where.append(_stale(stale_before))
        now = time.time()
        return self._update(*where, state=state, finished_at=now, updated_at=now, error=error, version=version,
                            activated=int(activated))

    def mark_uploads_deleted(self, job_id: str) -> None:
        self._update(jobs.c.id == job_id, uploads_deleted=1)


def _owned(job_id: str, token: str) -> tuple[ColumnElement[bool], ...]:
    """The guard of a running job's writes: only the process holding its run token."""
    return jobs.c.id == job_id, jobs.c.state == "running", jobs.c.run_token == token


def _stale(before: float) -> ColumnElement[bool]:
    """The supervisor's last sign of life (its heartbeat, else the start) is older than `before`."""
    return func.coalesce(jobs.c.heartbeat_at, jobs.c.started_at) < before
