"""The job database out of reach, piece by piece (tests/test_scale_faults.py checks it with whole clusters):
the store raises StoreUnavailable with the reason and reconnects once PostgreSQL is back; the API maps it
to a 503 with that reason; a training process skips progress while the database is away, waits for an
answer to its cancel checks (the one before publishing included), and gives up after its grace."""

from __future__ import annotations

import time

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from services import start_postgres

from app.errors import install_error_handlers
from app.jobs import run_job
from app.jobs.run_job import Progress, until_reachable
from app.jobs.store import JobStore, StoreUnavailable


def test_a_stopped_postgres_raises_store_unavailable_with_the_reason_and_a_restart_needs_no_new_store():
    pg = start_postgres()
    try:
        store = JobStore(pg.create_db("gone").replace("stpm@", "stpm:secret@"), pool_size=1)
        store.create("a" * 32, "demo", {}, "/data/jobs/a", 8, None)
        pg.stop()
        with pytest.raises(StoreUnavailable, match=rf"job database 127.0.0.1:{pg.port}/gone is unreachable: .+") as e:
            store.get("a" * 32)
        assert "secret" not in str(e.value)
        pg.start()
        assert store.get("a" * 32).state == "queued"  # the pool reconnects: no new JobStore, no restart
        store.close()
    finally:
        pg.destroy()


def test_store_unavailable_is_a_503_with_the_reason():
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/train")
    def jobs():
        raise StoreUnavailable("the job database db:5432/stpm is unreachable: Connection refused")

    r = TestClient(app).get("/train")
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    assert r.json()["error"] == "job_store_unavailable"
    assert r.json()["detail"].startswith("the job database db:5432/stpm is unreachable: Connection refused; retry")


class FlakyStore:
    """A job store that is unreachable for its first `down` calls, then answers `cancelled`."""

    def __init__(self, down: int, cancelled: bool = False):
        self.down, self.cancelled, self.calls, self.progress = down, cancelled, 0, []

    def _call(self):
        self.calls += 1
        if self.calls <= self.down:
            raise StoreUnavailable("the job database h:5432/stpm is unreachable: Connection refused")

    def cancel_requested(self, job_id: str) -> bool:
        self._call()
        return self.cancelled

    def set_progress(self, job_id: str, token: str, progress: dict) -> bool:
        self._call()
        self.progress.append(progress)
        return True


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(run_job, "STORE_RETRY_S", 0.01)


def test_progress_is_skipped_while_the_database_is_away():
    store = FlakyStore(down=1)
    p = Progress(store, "j", "t", db_grace_s=5.0)
    p.report({"epoch": 1}, force=True)  # no exception: the report is lost, training goes on
    p.report({"epoch": 2}, force=True)
    assert [x["epoch"] for x in store.progress] == [2]


def test_a_cancel_check_waits_for_the_database_and_answers_from_the_row():
    store = FlakyStore(down=3, cancelled=True)
    assert Progress(store, "j", "t", db_grace_s=5.0).should_stop() is True
    assert store.calls == 4  # three refusals waited out, then the row's answer


def test_a_cancel_check_gives_up_after_the_grace_so_nothing_unconfirmed_is_published():
    store = FlakyStore(down=10**9)
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable):
        Progress(store, "j", "t", db_grace_s=0.3).should_stop()
    assert 0.3 <= time.monotonic() - t0 < 5.0


def test_until_reachable_passes_other_errors_through_at_once():
    def broken():
        raise ValueError("not a connection problem")

    with pytest.raises(ValueError):
        until_reachable(broken, 60.0)
