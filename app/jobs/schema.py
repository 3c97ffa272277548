"""The job table, declared once (SQLAlchemy Core) for both dialects, and how an existing store is brought
up to it.

SQLite stores the times as REAL, PostgreSQL as DOUBLE PRECISION; flags are 0/1 integers and `params` /
`progress` JSON text on both, so a store made by an earlier release reads the same. Columns added after
the first release (`ADDED_COLUMNS`) are added to an existing table when a store opens it.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import (
    CheckConstraint,
    Column,
    Connection,
    Double,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    inspect,
    text,
)
from sqlalchemy.dialects.sqlite import REAL
from sqlalchemy.exc import OperationalError
from sqlalchemy.schema import CreateIndex, CreateTable
from sqlalchemy.types import TypeDecorator

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED = ("succeeded", "failed", "cancelled")


class JSONText(TypeDecorator):
    """A JSON value stored as TEXT (as every release wrote it); NULL and '' read as None."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect) -> str | None:
        return None if value is None else json.dumps(value)

    def process_result_value(self, value: str | None, dialect) -> Any:
        return json.loads(value) if value else None


def _time() -> Double:
    return Double().with_variant(REAL(), "sqlite")


metadata = MetaData()
jobs = Table(
    "jobs",
    metadata,
    Column("id", Text, primary_key=True),
    Column("seq", Integer, nullable=False),
    Column("name", Text, nullable=False),
    Column("state", Text, CheckConstraint(f"state IN {STATES!r}", name="jobs_state_check"), nullable=False),
    Column("params", JSONText, nullable=False),
    Column("progress", JSONText),
    Column("created_at", _time(), nullable=False),
    Column("started_at", _time()),
    Column("finished_at", _time()),
    Column("updated_at", _time(), nullable=False),
    Column("error", Text),
    Column("version", Text),
    Column("activated", Integer, nullable=False, server_default=text("0")),
    Column("job_dir", Text, nullable=False),
    Column("n_images", Integer, nullable=False),
    Column("fingerprint", Text),
    Column("uploads_deleted", Integer, nullable=False, server_default=text("0")),
    Column("cancel_requested_at", _time()),
    Column("pid", Integer),
    Column("run_token", Text),
    # added after the first release:
    Column("worker", Text),  # who runs it: host name and worker process (scaled mode) or the server's host
    Column("heartbeat_at", _time()),  # last sign of life of the process supervising the run (scaled mode)
    Column("enqueued_at", _time()),  # when the job's task reached the broker (scaled mode)
    Index("jobs_state", "state", "seq"),
    Index("jobs_seq", "seq", unique=True),
)
ADDED_COLUMNS = ("worker", "heartbeat_at", "enqueued_at")
COLUMNS = tuple(c.name for c in jobs.columns)


def ensure_schema(conn: Connection) -> None:
    """Create the table and its indexes where missing; add the columns an older store lacks. Safe when
    several processes open a new or old store at once (IF NOT EXISTS; a column another one added
    meanwhile is not an error)."""
    conn.execute(CreateTable(jobs, if_not_exists=True))
    for index in jobs.indexes:
        conn.execute(CreateIndex(index, if_not_exists=True))
    for name in ADDED_COLUMNS:
        if name not in _columns(conn):
            column_type = jobs.c[name].type.compile(dialect=conn.dialect)
            try:
                conn.execute(text(f"ALTER TABLE jobs ADD COLUMN {name} {column_type}"))
            except OperationalError:
                if name not in _columns(conn):
                    raise


def _columns(conn: Connection) -> set[str]:
    return {c["name"] for c in inspect(conn).get_columns("jobs")}
