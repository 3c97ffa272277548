"""The job store, the same tests on both backends: SQLite (embedded) and a real PostgreSQL (scaled).

Concurrency is tested with threads that each go through the store's own connections (per call on
SQLite, a pool on PostgreSQL), as API replicas and workers do."""

from __future__ import annotations

import concurrent.futures as cf
import json
from pathlib import Path
import sqlite3
import time
import uuid
from datetime import datetime, timezone

import pytest
from services import start_postgres
from sqlalchemy import inspect

from app.jobs.store import JobStore
from app.jobs.worker import LocalRunner
from app.settings import Settings

# The first release's table: stores opened by this version add the new columns.
OLD_SCHEMA = """CREATE TABLE jobs (id TEXT PRIMARY KEY, seq INTEGER NOT NULL, name TEXT NOT NULL, state TEXT NOT NULL,
params TEXT NOT NULL, progress TEXT, created_at {real} NOT NULL, started_at {real}, finished_at {real},
updated_at {real} NOT NULL, error TEXT, version TEXT, activated INTEGER NOT NULL DEFAULT 0, job_dir TEXT NOT NULL,
n_images INTEGER NOT NULL, fingerprint TEXT, uploads_deleted INTEGER NOT NULL DEFAULT 0, cancel_requested_at {real},
pid INTEGER, run_token TEXT)"""


@pytest.fixture(scope="module")
def postgres():
    pg = start_postgres()
    yield pg
    pg.destroy()


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request, tmp_path):
    """A fresh, empty store location of each kind."""
    if request.param == "sqlite":
        return str(tmp_path / "jobs.sqlite3")
    return request.getfixturevalue("postgres").create_db(f"t{uuid.uuid4().hex[:12]}")


@pytest.fixture()
def store(target):
    s = JobStore(target)
    yield s
    s.close()


def new(store: JobStore, name: str = "demo", fingerprint: str | None = "fp") -> str:
    job_id = uuid.uuid4().hex
    store.create(job_id, name, {"train": {"epochs": 1}, "activate": False}, f"/data/jobs/{job_id}", 8, fingerprint)
    return job_id


def test_lifecycle_and_guarded_writes(store):
    a, b = new(store), new(store)
    job = store.get(a)
    assert job.state == "queued" and job.params == {"train": {"epochs": 1}, "activate": False} and job.n_images == 8
    assert store.queue_position(store.get(b)) == 2 and store.counts()["queued"] == 2
    claimed, token = store.claim_next(worker="w1")
    assert claimed.id == a and claimed.state == "running" and claimed.worker == "w1" and claimed.heartbeat_at
    assert store.queue_position(store.get(b)) == 1
    assert store.set_progress(a, token, {"epoch": 1, "loss": 0.5})
    assert not store.set_progress(a, "not-the-token", {"epoch": 9})
    assert store.get(a).progress == {"epoch": 1, "loss": 0.5}
    store.set_pid(a, token, 4242)
    assert store.get(a).pid == 4242
    assert not store.finish(a, "succeeded", token="not-the-token", version="v1")
    assert store.finish(a, "succeeded", token=token, version="v1", activated=True)
    assert not store.finish(a, "failed", token=token, error="late")  # finished rows never change again
    job = store.get(a)
    assert (job.state, job.version, job.activated, job.error) == ("succeeded", "v1", True, None)
    assert [j.id for j in store.list()] == [b, a] and [j.id for j in store.list("succeeded")] == [a]
    assert store.ids() == {a, b} and store.get("f" * 32) is None
    assert store.counts() == {"queued": 1, "running": 0, "succeeded": 1, "failed": 0, "cancelled": 0}


def test_cancel_queued_and_running(store):
    a, b = new(store), new(store)
    assert store.cancel_queued(a) and not store.cancel_queued(a)
    assert store.get(a).state == "cancelled" and store.cancel_requested(a)
    assert store.claim(a, "w") is None  # a revoked task that is delivered anyway does nothing
    job, token = store.claim(b, "w")
    assert not store.cancel_queued(b) and not store.cancel_requested(b)
    assert store.request_cancel(b) and store.cancel_requested(b)
    first = store.get(b).cancel_requested_at
    assert store.request_cancel(b) and store.get(b).cancel_requested_at == first
    assert store.finish(b, "cancelled", token=token)
    assert not store.request_cancel(b)


def test_enqueue_marks_and_requeue_lists(store):
    a, b = new(store), new(store)
    store.mark_enqueued(a)
    assert [j.id for j in store.queued()] == [a, b]
    assert [j.id for j in store.queued(not_enqueued=True)] == [b]


def test_a_job_is_claimed_once_however_many_workers_race(store):
    ids = [new(store) for _ in range(6)]
    with cf.ThreadPoolExecutor(8) as ex:  # 8 deliveries of the same task at once
        wins = [r for r in ex.map(lambda _: store.claim(ids[0], "w"), range(8)) if r is not None]
    assert len(wins) == 1
    with cf.ThreadPoolExecutor(4) as ex:  # 4 local runners drain the rest
        got = [r for r in ex.map(lambda _: store.claim_next("w"), range(10)) if r is not None]
    assert sorted(j.id for j, _ in got) == sorted(ids[1:])
    assert len({t for _, t in got}) == 5 and store.counts()["running"] == 6


def test_concurrent_submissions_get_unique_ordered_seqs(store):
    with cf.ThreadPoolExecutor(8) as ex:
        ids = list(ex.map(lambda _: new(store), range(40)))
    seqs = sorted(store.get(i).seq for i in ids)
    assert seqs == list(range(1, 41))


def test_heartbeat_and_stale_runs(store):
    a, b = new(store), new(store)
    (_, ta), (_, tb) = store.claim(a, "w1"), store.claim(b, "w2")
    assert store.heartbeat(a, ta) and not store.heartbeat(a, tb)
    time.sleep(0.3)
    assert store.heartbeat(b, tb)
    assert [j.id for j in store.stale_running(0.2)] == [a]
    # a sweeper never settles a run whose heartbeat is fresh, even if it read it as stale a moment ago
    assert not store.finish(b, "failed", error="x", stale_before=time.time() - 0.2)
    assert store.finish(a, "failed", error="dead", stale_before=time.time() - 0.2)
    assert not store.heartbeat(a, ta)  # the dead worker's supervisor learns that the run is no longer its own


def test_reopening_keeps_every_row(target):
    s = JobStore(target)
    ids = {new(s) for _ in range(3)}
    s.close()
    s = JobStore(target)  # a restart, or another replica opening the same store
    assert s.ids() == ids
    s.close()


def _first_release_store(target: str) -> None:
    """The table as the first release made it (no index either), holding one queued job 'aaa...'."""
    row = {"id": "a" * 32, "seq": 1, "name": "demo", "state": "queued", "params": json.dumps({}),
           "created_at": 1.0, "updated_at": 1.0, "job_dir": "/x", "n_images": 8}
    cols = ", ".join(row)
    if target.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(target, autocommit=True) as c:
            c.execute(OLD_SCHEMA.format(real="DOUBLE PRECISION"))
            c.execute(f"INSERT INTO jobs ({cols}) VALUES ({', '.join(['%s'] * len(row))})", tuple(row.values()))
    else:
        with sqlite3.connect(target) as c:
            c.execute(OLD_SCHEMA.format(real="REAL"))
            c.execute(f"INSERT INTO jobs ({cols}) VALUES ({', '.join(['?'] * len(row))})", tuple(row.values()))


def test_a_store_of_the_first_release_gains_the_new_columns(target):
    _first_release_store(target)
    s = JobStore(target)
    try:
        job = s.get("a" * 32)
        assert job.state == "queued" and job.worker is None and job.heartbeat_at is None
        claimed, token = s.claim(job.id, "w")
        assert s.heartbeat(job.id, token) and s.get(job.id).worker == "w"
        assert {"jobs_state", "jobs_seq"} <= {ix["name"] for ix in inspect(s.engine).get_indexes("jobs")}
    finally:
        s.close()


@pytest.mark.parametrize("old", [False, True], ids=["new", "first-release"])
def test_several_processes_opening_one_store_at_once(target, old):
    """API workers and training processes start together: each creates or upgrades the table if needed,
    none fails because another one did it first."""
    if old:
        _first_release_store(target)
    with cf.ThreadPoolExecutor(6) as ex:  # each store has its own engine: its own connections
        stores = list(ex.map(lambda _: JobStore(target), range(6)))
    try:
        job_id = new(stores[0])
        assert all(s.get(job_id).state == "queued" for s in stores)
        assert stores[-1].claim(job_id, "w") is not None and stores[1].get(job_id).worker == "w"
    finally:
        for s in stores:
            s.close()


def _published(models, name: str, fingerprint: str) -> None:
    """A published version's manifest (a real one, tests/data/manifests) for training data `fingerprint`."""
    d = models / name / "v1"
    d.mkdir(parents=True)
    manifest = json.loads((Path(__file__).parent / "data" / "manifests" / "format2-patchcore.json").read_text())
    manifest.update(name=name, version="v1", created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    data={**manifest["data"], "fingerprint": fingerprint})
    (d / "manifest.json").write_text(json.dumps(manifest))


def test_sweep_settles_only_dead_workers_runs_truthfully(store, tmp_path):
    models = tmp_path / "models"
    settings = Settings(models_dir=models, data_dir=tmp_path / "data")
    sup = LocalRunner(store, settings)
    dead, published, cancelled, alive = (new(store, f"m{i}", fingerprint=f"fp{i}") for i in range(4))
    tokens = {j: store.claim(j, "w-gone")[1] for j in (dead, published, cancelled, alive)}
    store.request_cancel(cancelled)
    time.sleep(1.0)  # (published versions count when created after the job started, to the second)
    _published(models, "m1", "fp1")
    # Staleness well above scheduling noise: on a loaded machine 0.25 s between the heartbeat and the
    # second sweep was sometimes exceeded, and the live job was (correctly) judged stale.
    stale_s = 2.0
    time.sleep(stale_s)
    store.heartbeat(alive, tokens[alive])
    assert sorted(sup.sweep_stale(stale_s)) == sorted([dead, published, cancelled])
    assert sup.sweep_stale(stale_s) == []  # settled once: a second sweeper finds nothing
    j = store.get(dead)
    assert j.state == "failed" and "its worker w-gone stopped sending heartbeats" in j.error
    j = store.get(published)
    assert j.state == "succeeded" and j.version == "v1" and "was published, then its worker" in j.error
    assert store.get(cancelled).state == "cancelled"
    assert store.get(alive).state == "running"


def test_a_duplicate_or_late_delivery_of_a_task_changes_nothing(store, tmp_path):
    pytest.importorskip("celery", reason="the scale extra (Celery) is not installed")
    from app.jobs.celery_queue import run_task

    settings = Settings(models_dir=tmp_path / "models", data_dir=tmp_path / "data")
    done, live = new(store), new(store)
    _, token = store.claim(done, "w-dead")
    store.finish(done, "failed", token=token, error="its worker died")
    store.claim(live, "w-busy")
    before = (store.get(done), store.get(live))
    # what a worker does with a redelivered message (visibility timeout, a restarted worker, a revoked task)
    assert run_task(store, settings, done, "w-other") == "failed"
    assert run_task(store, settings, live, "w-other") == "running"
    assert (store.get(done), store.get(live)) == before


def test_migrating_the_embedded_history_into_the_shared_store(tmp_path, target):
    from app.jobs.migrate import copy_jobs, main

    src = JobStore(tmp_path / "embedded.sqlite3")
    done, queued = new(src, "old"), new(src, "old")
    _, token = src.claim(done, "local@host")
    src.set_progress(done, token, {"epoch": 3})
    src.finish(done, "succeeded", token=token, version="v7")
    dst = JobStore(target)
    try:
        own = new(dst, "new")
        assert copy_jobs(src, dst) == 2 and copy_jobs(src, dst) == 0  # idempotent
        moved = dst.get(done)
        assert (moved.state, moved.version, moved.progress, moved.worker) == ("succeeded", "v7", {"epoch": 3},
                                                                              "local@host")
        assert dst.get(own).seq < dst.get(done).seq < dst.get(queued).seq  # order kept, after the target's own
        assert dst.claim_next("w")[0].id == own and dst.claim_next("w")[0].id == queued
        src.claim(new(src, "busy"), "local@host")
        with pytest.raises(ValueError, match="running jobs"):
            copy_jobs(src, dst)
        assert main([str(tmp_path / "embedded.sqlite3"), target]) == 2
    finally:
        src.close()
        dst.close()


def test_a_postgresql_restart_costs_no_request(postgres):
    s = JobStore(postgres.create_db(f"t{uuid.uuid4().hex[:12]}"))
    try:
        a = new(s)
        postgres.stop()  # every pooled connection is now dead
        postgres.start()
        assert s.get(a).state == "queued"  # checked on checkout, replaced, answered
        assert s.claim(a, "w") is not None
    finally:
        s.close()


def test_the_switch_to_wal_is_retried_while_another_opener_holds_the_database(monkeypatch):
    """SQLite refuses a would-be deadlock at once ("database is locked", no busy wait): opening a store
    retries the switch (3 in 150 runs of six openers failed before); any other error is raised."""
    from sqlalchemy.exc import OperationalError

    from app.jobs import store as store_module

    class Conn:
        def __init__(self, errors):
            self.errors, self.calls = list(errors), 0

        def exec_driver_sql(self, sql):
            assert sql == "PRAGMA journal_mode=WAL"
            self.calls += 1
            if self.errors:
                raise OperationalError(sql, (), Exception(self.errors.pop(0)))

    monkeypatch.setattr(store_module.time, "sleep", lambda s: None)
    locked = Conn(["database is locked", "database is locked"])
    store_module._enable_wal(locked)
    assert locked.calls == 3
    with pytest.raises(OperationalError, match="disk I/O error"):
        store_module._enable_wal(Conn(["disk I/O error"]))
    monkeypatch.setattr(store_module, "WAL_SWITCH_S", -1.0)  # past its deadline at once
    with pytest.raises(OperationalError, match="locked"):
        store_module._enable_wal(Conn(["database is locked"] * 3))
