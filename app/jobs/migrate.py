"""Copy the job history from one store to another: the upgrade from embedded (SQLite) to scaled
(PostgreSQL). `python -m app.jobs.migrate SOURCE TARGET`, with the server stopped.

Every row is copied as it is (states, progress, errors, versions, upload references); rows whose id
already exists in the target are left alone, so running it twice copies nothing twice. Copied jobs keep
their order and come before none of the target's own: their `seq` continues after the target's highest.
A source with running jobs is refused (stop the server first: its restart would settle them).
"""

from __future__ import annotations

import argparse
import sys

from app.jobs.store import JobStore

COLUMNS = ("id", "seq", "name", "state", "params", "progress", "created_at", "started_at", "finished_at",
           "updated_at", "error", "version", "activated", "job_dir", "n_images", "fingerprint", "uploads_deleted",
           "cancel_requested_at", "pid", "run_token", "worker", "heartbeat_at", "enqueued_at")


def copy_jobs(source: JobStore, target: JobStore) -> int:
    """-> how many rows were copied. Raises ValueError if the source has running jobs."""
    if source.running():
        raise ValueError("the source store has running jobs: stop the server (its restart settles them) first")
    have = target.ids()
    with source._conn() as c:
        rows = [dict(r) for r in c.execute(f"SELECT {', '.join(COLUMNS)} FROM jobs ORDER BY seq").fetchall()]
    rows = [r for r in rows if r["id"] not in have]
    if not rows:
        return 0
    marks = ", ".join("?" * len(COLUMNS))
    with target._conn() as c:
        base = c.execute("SELECT COALESCE(MAX(seq), 0) FROM jobs").fetchone()[0]
        for i, r in enumerate(rows, start=1):
            r["seq"] = base + i
            c.execute(f"INSERT INTO jobs ({', '.join(COLUMNS)}) VALUES ({marks})", [r[k] for k in COLUMNS])
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m app.jobs.migrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="the embedded store: DATA_DIR/jobs.sqlite3")
    p.add_argument("target", help="the shared store: postgresql://USER:PASS@HOST:5432/DB")
    a = p.parse_args(argv)
    src, dst = JobStore(a.source), JobStore(a.target)
    try:
        n = copy_jobs(src, dst)
    except ValueError as e:
        print(f"migrate: {e}", file=sys.stderr)
        return 2
    finally:
        src.close()
        dst.close()
    print(f"copied {n} job(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
