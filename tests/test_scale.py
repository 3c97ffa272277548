"""Scaled out for real: redis-server and PostgreSQL from Debian's packages, two API processes and two
Celery workers on 127.0.0.1, one shared model store. Jobs submitted to either API run on either worker;
a worker killed with SIGKILL mid-job leaves that job failed (the documented rule, docs/SCALING.md) and
nothing else; a cancel sent to the other API stops a running job and revokes a queued one; both APIs
score every new version identically; restarting every process loses no job row and no version.

Tiny jobs (random ResNet18 at 64 px, 8 images, 1 epoch) so the whole module takes a few minutes at most."""

from __future__ import annotations

import concurrent.futures as cf
import io
import time

import httpx
import pytest
from PIL import Image
from scale_cluster import Cluster
from services import missing, start_postgres, start_redis
from test_jobs_helpers import finished, form, image_files, pid_alive, real_good, training, wait_for

from app.jobs.store import JobStore

pytest.importorskip("torch", reason="training needs torch")
pytestmark = pytest.mark.slow

STALE_AFTER_S = 4.0
ENV = {
    "STPM_TRAIN_MIN_IMAGES": "8",
    "STPM_JOB_HEARTBEAT_S": "0.5",
    "STPM_JOB_STALE_AFTER_S": str(STALE_AFTER_S),
    # short, so long-running jobs see duplicate deliveries, which must change nothing
    "STPM_BROKER_VISIBILITY_TIMEOUT_S": "8",
    "STPM_TRAIN_CANCEL_GRACE_S": "10",
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    try:
        import celery  # noqa: F401
        import psycopg  # noqa: F401
    except ImportError as e:
        missing(f"the scale extra is not installed ({e}): pip install 'stpm[scale]'")
    root = tmp_path_factory.mktemp("scale")
    redis = start_redis(root / "redis")
    pg = start_postgres()
    c = Cluster(root, redis, pg, pg.create_db("stpm"), ENV)
    try:
        for name in ("api-a", "api-b"):
            c.start_api(name, wait=False)
        for name in ("w1", "w2"):
            c.start_worker(name, wait=False)
        for name in ("api-a", "api-b"):
            c.wait_api(name)
        for name in ("w1", "w2"):
            c.wait_worker(name)
        yield c
    finally:
        c.stop_processes()
        redis.stop()
        pg.destroy()


def client(c: Cluster, api: str) -> httpx.Client:
    return httpx.Client(base_url=c.url(api), timeout=60)


def store(c: Cluster) -> JobStore:
    return JobStore(c.env["STPM_JOBS_DB"], pool_size=1)


def score_all(c: Cluster, api: str, name: str, versions: list[str], image: bytes) -> dict[str, list]:
    with client(c, api) as h:
        out = {}
        for v in versions:
            r = h.post("/score", params={"model": f"{name}/{v}"}, files=[("files", ("q.png", image, "image/png"))])
            assert r.status_code == 200, r.text
            out[v] = [(x["raw_score"], x["score"], x["is_anomaly"], x["threshold"]) for x in r.json()["results"]]
    return out


def wait_versions(c: Cluster, api: str, name: str, n: int, timeout: float = 30.0) -> list[str]:
    deadline = time.monotonic() + timeout
    with client(c, api) as h:
        while time.monotonic() < deadline:
            for m in h.get("/models").json()["models"]:
                if m["name"] == name and len(m["versions"]) >= n:
                    return [v["version"] for v in m["versions"]]
            time.sleep(0.2)
    raise AssertionError(f"{api} never listed {n} versions of {name}")


def query_image() -> bytes:
    """A real photo at the training images' size (72 px): models keep the scale they were trained at,
    so a 512 px photo would need more tiles than a 72 px-trained model allows."""
    good = real_good(1)
    if not good:
        return image_files(1, seed0=99)[0][1][1]
    buf = io.BytesIO()
    Image.open(good[0]).convert("RGB").resize((72, 72), Image.BILINEAR).save(buf, format="PNG")
    return buf.getvalue()


def test_four_jobs_across_both_apis_run_on_both_workers_and_both_apis_score_them_identically(cluster):
    c = cluster

    def submit(i: int) -> str:
        with client(c, ("api-a", "api-b")[i % 2]) as h:
            r = h.post("/train", data=form("shared", epochs=1, seed=i), files=image_files(8, seed0=20 * i))
            assert r.status_code == 202, r.text
            return r.json()["job_id"]

    with cf.ThreadPoolExecutor(4) as ex:
        ids = list(ex.map(submit, range(4)))
    with client(c, "api-b") as b:
        jobs = [wait_for(b, j, finished, timeout=300, what="the four jobs") for j in ids]
    assert [j["state"] for j in jobs] == ["succeeded"] * 4, [(j["state"], j["error"]) for j in jobs]
    assert {j["worker"] for j in jobs} == {"w1@test", "w2@test"}  # both workers took jobs
    assert sorted(j["version"] for j in jobs) == ["v1", "v2", "v3", "v4"]  # concurrent publishes never collide

    versions = wait_versions(c, "api-a", "shared", 4)
    assert versions == wait_versions(c, "api-b", "shared", 4) == ["v1", "v2", "v3", "v4"]
    image = query_image()
    assert score_all(c, "api-a", "shared", versions, image) == score_all(c, "api-b", "shared", versions, image)
    for api in ("api-a", "api-b"):
        with client(c, api) as h:
            assert h.get("/healthz").json()["replica"] == api
            text = h.get("/metrics").text
            assert f'target_info{{replica="{api}"}} 1.0' in text
            assert 'stpm_train_jobs{state="succeeded"} 4.0' in text


def test_sigkill_of_a_worker_mid_job_fails_that_job_only(cluster):
    c = cluster
    with client(c, "api-a") as a, client(c, "api-b") as b:
        r = a.post("/train", data=form("long", epochs=500), files=image_files(8))
        assert r.status_code == 202, r.text
        doomed = r.json()["job_id"]
        job = wait_for(b, doomed, training, timeout=120, what="the long job to train")
        victim = job["worker"].split("@")[0]
        # the other worker is free: this one runs there while the victim dies
        r = b.post("/train", data=form("bystander", epochs=1), files=image_files(8, seed0=40))
        assert r.status_code == 202, r.text
        bystander = r.json()["job_id"]
        wait_for(a, bystander, lambda j: j["state"] != "queued", timeout=60, what="the bystander to start")
        pid = store(c).get(doomed).pid
        assert c.ping(victim)  # a worker that is training still answers its health check
        c.kill_worker(victim)
        t0 = time.monotonic()
        failed = wait_for(a, doomed, finished, timeout=STALE_AFTER_S + 30, what="the dead worker's job to settle")
        assert failed["state"] == "failed", failed
        assert f"its worker {victim}@test stopped sending heartbeats" in failed["error"]
        assert time.monotonic() - t0 < STALE_AFTER_S + 15
        assert not pid_alive(pid)  # its training process died with the worker
        assert not c.ping(victim)
        other = wait_for(b, bystander, finished, timeout=180, what="the bystander")
        assert other["state"] == "succeeded" and other["worker"] != f"{victim}@test", other
        c.start_worker(victim)  # back to two workers; the dead one's unacknowledged task must change nothing
        assert a.get(f"/train/{doomed}").json()["state"] == "failed"
        assert wait_versions(c, "api-a", "bystander", 1) == ["v1"]
    assert not (c.models / "long").exists() or not list((c.models / "long").glob("v*"))


def test_cancel_from_the_other_api_stops_a_running_job_and_revokes_a_queued_one(cluster):
    c = cluster
    with client(c, "api-a") as a, client(c, "api-b") as b:
        ids = []
        for i in range(3):  # two run (one per worker), the third waits
            r = a.post("/train", data=form("cancelme", epochs=500, seed=i), files=image_files(8, seed0=60 + i))
            assert r.status_code == 202, r.text
            ids.append(r.json()["job_id"])
        running = []
        deadline = time.monotonic() + 120
        while len(running) < 2 and time.monotonic() < deadline:
            running = [j for j in ids if training(b.get(f"/train/{j}").json())]
            time.sleep(0.2)
        assert len(running) == 2, [b.get(f"/train/{j}").json()["state"] for j in ids]
        waiting = next(j for j in ids if j not in running)
        assert b.get(f"/train/{waiting}").json()["state"] == "queued"

        r = b.delete(f"/train/{waiting}")  # queued: cancelled at once, its task revoked
        assert r.status_code == 200 and r.json()["state"] == "cancelled", r.text
        pids = {j: store(c).get(j).pid for j in running}
        r = b.delete(f"/train/{running[0]}")  # running on some worker: the flag in the job store
        assert r.status_code == 202 and r.json()["cancel_requested"] is True, r.text
        job = wait_for(a, running[0], finished, timeout=30, what="the cancel")
        assert job["state"] == "cancelled" and job["version"] is None, job
        deadline = time.monotonic() + 15
        while pid_alive(pids[running[0]]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not pid_alive(pids[running[0]])
        assert a.delete(f"/train/{running[1]}").status_code == 202
        assert wait_for(b, running[1], finished, timeout=30)["state"] == "cancelled"
        time.sleep(2.0)  # both workers are free now: the revoked task still must not run
        job = a.get(f"/train/{waiting}").json()
        assert job["state"] == "cancelled" and job["started_at"] is None and job["worker"] is None
    assert not list((c.models / "cancelme").glob("v*")) if (c.models / "cancelme").exists() else True


def test_restarting_every_process_loses_no_job_and_no_version(cluster):
    c = cluster
    with client(c, "api-a") as a:
        if not any(j["state"] == "succeeded" for j in a.get("/train").json()["jobs"]):  # run alone: publish one
            r = a.post("/train", data=form("shared", epochs=1), files=image_files(8))
            assert wait_for(a, r.json()["job_id"], finished, timeout=300)["state"] == "succeeded"
            wait_versions(c, "api-b", "shared", 1)
        before = {j["job_id"]: j for j in a.get("/train", params={"limit": 1000}).json()["jobs"]}
    assert all(finished(j) for j in before.values())
    versions = {m["name"]: [v["version"] for v in m["versions"]] for m in
                httpx.get(c.url("api-b") + "/models").json()["models"]}
    image = query_image()
    scores = score_all(c, "api-a", "shared", versions["shared"], image)

    for name in list(c.workers):  # workers first: a job submitted now must wait in the queue
        proc = c.workers.pop(name)
        proc.terminate()
        proc.wait(60)
    with client(c, "api-a") as a:
        r = a.post("/train", data=form("after-restart", epochs=500), files=image_files(8, seed0=80))
        assert r.status_code == 202, r.text
        queued = r.json()["job_id"]
    c.stop_processes()
    c.redis.stop()
    c.postgres.stop()

    c.postgres.start()
    c.redis.start()
    for name in ("api-a", "api-b"):
        c.start_api(name, wait=False)
    for name in ("w1", "w2"):
        c.start_worker(name, wait=False)
    for name in ("api-a", "api-b"):
        c.wait_api(name)
    for name in ("w1", "w2"):
        c.wait_worker(name)

    with client(c, "api-b") as b:
        after = {j["job_id"]: j for j in b.get("/train", params={"limit": 1000}).json()["jobs"]}
        assert set(after) == set(before) | {queued}
        keys = ("state", "version", "error", "worker", "created_at", "finished_at", "model")
        assert {i: [after[i][k] for k in keys] for i in before} == {i: [before[i][k] for k in keys] for i in before}
        # the job queued across the restart was kept (row in PostgreSQL, task in Redis's append-only file)
        wait_for(b, queued, lambda j: j["state"] == "running", timeout=120, what="the queued job to run after restart")
        assert b.delete(f"/train/{queued}").status_code == 202
        assert wait_for(b, queued, finished, timeout=30)["state"] == "cancelled"
    for api in ("api-a", "api-b"):
        with client(c, api) as h:
            now = {m["name"]: [v["version"] for v in m["versions"]] for m in h.get("/models").json()["models"]}
        assert now == versions
    assert score_all(c, "api-b", "shared", versions["shared"], image) == scores
