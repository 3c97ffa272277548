"""The API side of the Celery queue against a real redis-server: sending, re-sending what never reached
the broker, `stpm worker --requeue`, and a submit while the broker is down (the job stays queued)."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from services import free_port, start_redis
from sqlalchemy import update

from app.jobs.schema import jobs
from app.jobs.store import JobStore
from app.settings import Settings

celery = pytest.importorskip("celery", reason="the scale extra (Celery) is not installed")
redis_py = pytest.importorskip("redis", reason="the scale extra (redis) is not installed")

from app.jobs.celery_queue import QUEUE, Sweeper, make_celery, requeue, send  # noqa: E402
from app.jobs.worker import LocalRunner  # noqa: E402


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    r = start_redis(tmp_path_factory.mktemp("redis"))
    yield r
    r.stop()


@pytest.fixture()
def queue(redis):
    client = redis_py.Redis.from_url(redis.url)
    client.flushall()
    return client


def _settings(tmp_path, broker: str) -> Settings:
    return Settings(models_dir=tmp_path / "models", data_dir=tmp_path / "data", queue="celery", broker_url=broker)


def _queued_ids(client) -> list[str]:
    return [json.loads(m)["headers"]["id"] for m in client.lrange(QUEUE, 0, -1)]


def _new(store: JobStore, created_ago_s: float = 0.0) -> str:
    job_id = uuid.uuid4().hex
    store.create(job_id, "demo", {}, f"/data/jobs/{job_id}", 8, None)
    if created_ago_s:
        with store.engine.connect() as c:
            c.execute(update(jobs).where(jobs.c.id == job_id).values(created_at=time.time() - created_ago_s))
    return job_id


def test_send_puts_the_job_on_the_queue_with_its_id_as_task_id(tmp_path, redis, queue):
    store = JobStore(tmp_path / "jobs.sqlite3")
    app = make_celery(_settings(tmp_path, redis.url))
    job = _new(store)
    assert send(app, store, job)
    assert _queued_ids(queue) == [job] and store.get(job).enqueued_at is not None


def test_sweep_resends_what_never_reached_the_broker_and_requeue_resends_all(tmp_path, redis, queue):
    store = JobStore(tmp_path / "jobs.sqlite3")
    settings = _settings(tmp_path, redis.url)
    app = make_celery(settings)
    lost, fresh, sent = _new(store, created_ago_s=10), _new(store), _new(store, created_ago_s=10)
    store.mark_enqueued(sent)
    Sweeper(LocalRunner(store, settings), app, settings).sweep()
    assert _queued_ids(queue) == [lost]  # `fresh` may be being sent by its own submit right now
    assert store.get(lost).enqueued_at is not None and store.get(fresh).enqueued_at is None
    queue.delete(QUEUE)  # the broker lost its data
    assert requeue(app, store) == 3
    assert sorted(_queued_ids(queue)) == sorted([lost, fresh, sent])


def test_a_submit_while_the_broker_is_down_keeps_the_job_queued(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    app = make_celery(_settings(tmp_path, f"redis://127.0.0.1:{free_port()}/0"))  # nothing listens there
    job = _new(store)
    t0 = time.monotonic()
    assert not send(app, store, job)
    assert time.monotonic() - t0 < 30
    j = store.get(job)
    assert j.state == "queued" and j.enqueued_at is None  # the replicas' sweep sends it when Redis is back
