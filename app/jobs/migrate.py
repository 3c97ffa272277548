"""Copy the job history from one store to another: the upgrade from embedded (SQLite) to scaled
(PostgreSQL). `python -m app.jobs.migrate SOURCE TARGET`, with the server stopped.

Every row is copied as it is (states, progress, errors, versions, upload references); rows whose id
already exists in the target are left alone, so running it twice copies nothing twice. Copied jobs keep
their order and come before none of the target's own: their `seq` continues after the target's highest.
The rows are written in one transaction: all of them or none. A source with running jobs is refused
(stop the server first: its restart would settle them).
"""

from __future__ import annotations

import argparse
import sys

from sqlalchemy import func, insert, select

from app.jobs.schema import jobs
from app.jobs.store import JobStore


def copy_jobs(source: JobStore, target: JobStore) -> int:
    """-> how many rows were copied. Raises ValueError if the source has running jobs."""
    if source.running():
        raise ValueError("the source store has running jobs: stop the server (its restart settles them) first")
    have = target.ids()
    with source.engine.connect() as c:
        rows = [dict(r._mapping) for r in c.execute(select(jobs).order_by(jobs.c.seq))]
    rows = [r for r in rows if r["id"] not in have]
    if not rows:
        return 0
    with target.transaction() as c:
        base = c.execute(select(func.coalesce(func.max(jobs.c.seq), 0))).scalar_one()
        for i, r in enumerate(rows, start=1):
            r["seq"] = base + i
        c.execute(insert(jobs), rows)
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
