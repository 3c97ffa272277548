"""Training jobs with real processes: end to end on real images, queue, cancel, kill -9 of the training
process and of the whole server, restarts. Tiny models (random ResNet18, 64 px) so each run is seconds."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal

import httpx
import pytest
from fastapi.testclient import TestClient
from test_jobs_helpers import (
    finished,
    form,
    image_files,
    job_pid,
    kill9,
    leftovers,
    real_good,
    start_server,
    stop,
    training,
    visible_versions,
    wait_dead,
    wait_for,
)

from app.main import create_app
from app.settings import Settings

pytest.importorskip("torch", reason="training needs torch")
pytestmark = pytest.mark.slow


def test_end_to_end_on_real_images_new_version_is_served(tmp_path):
    good = real_good(10)
    if len(good) < 10:
        pytest.skip("real data not available: ../shared/data/mvtec_ad_bottle_512 (set STPM_SHARED_DATA)")
    models, data = tmp_path / "models", tmp_path / "data"
    proc, url = start_server(models, data, {"STPM_TRAIN_MIN_IMAGES": "10"})
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            assert c.post("/score", files=[("files", ("x.png", good[0].read_bytes()))]).status_code == 409
            files = [("files", (p.name, p.read_bytes(), "image/png")) for p in good]
            r = c.post("/train", data=form("bottle", epochs=2, max_steps=2, activate=True), files=files)
            assert r.status_code == 202, r.text
            job_id = r.json()["job_id"]
            seen_progress = wait_for(c, job_id, lambda j: finished(j) or (j["progress"] or {}).get("epoch"),
                                     what="progress")
            job = wait_for(c, job_id, finished, timeout=300, what="the job to finish")
            assert job["state"] == "succeeded", job
            assert job["version"] == "v1" and job["model"] == "bottle/v1" and job["activated"] is True
            assert job["started_at"] and job["finished_at"] and job["error"] is None
            p = job["progress"]
            assert p["epoch"] == 2 and p["epochs"] == 2 and p["val_loss"] > 0 and "eta_s" in p
            assert (seen_progress["progress"] or {}).get("epoch")
            # the registry hot-loads it: /models lists it, /score uses it
            models_list = wait_for_model(c, "bottle")
            assert [v["version"] for v in models_list["versions"]] == ["v1"]
            assert models_list["active_version"] == "v1"
            r = c.post("/score", params={"model": "bottle"},
                       files=[("files", ("q.png", good[0].read_bytes(), "image/png"))])
            assert r.status_code == 200, r.text
            assert r.json()["model"] == "bottle" and r.json()["version"] == "v1"
            assert 0.0 <= r.json()["results"][0]["score"] <= 1.0
            man = c.get("/models/bottle/versions/v1").json()["manifest"]
            assert man["data"]["n_images"] == 10 and {"scorer.onnx", "student.onnx"} <= set(os.listdir(models / "bottle" / "v1"))
            assert c.get("/train").json()["jobs"][0]["job_id"] == job_id
    finally:
        stop(proc)
    assert proc.returncode is not None


def wait_for_model(c: httpx.Client, name: str, timeout: float = 30.0) -> dict:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for m in c.get("/models").json()["models"]:
            if m["name"] == name:
                return m
        time.sleep(0.2)
    raise AssertionError(f"{name} never appeared in /models")


def test_queue_cancel_running_and_kill_the_training_process(tmp_path):
    """Two submissions at once queue (one runs); cancelling the running one stops it without a version;
    the next runs; kill -9 of its training process fails it with a reason, and a restarted server agrees."""
    models, data = tmp_path / "models", tmp_path / "data"
    settings = Settings(models_dir=models, data_dir=data, reload_interval_s=0, warmup=False, train_min_images=8,
                        train_concurrency=1, train_threads=1, train_upload_retention="keep")
    with TestClient(create_app(settings)) as c:
        def submit(i):
            return c.post("/train", data=form("demo", epochs=500, seed=i), files=image_files(8, seed0=10 * i))

        with cf.ThreadPoolExecutor(2) as ex:
            rs = list(ex.map(submit, range(2)))
        assert [r.status_code for r in rs] == [202, 202], [r.text for r in rs]
        ids = [r.json()["job_id"] for r in rs]
        wait_for(c, ids[0], lambda j: "running" in {c.get(f"/train/{i}").json()["state"] for i in ids},
                 what="a job to start")
        a = next(i for i in ids if c.get(f"/train/{i}").json()["state"] == "running")
        b = next(i for i in ids if i != a)
        assert c.get(f"/train/{b}").json()["state"] == "queued"
        assert c.get(f"/train/{b}").json()["queue_position"] == 1
        wait_for(c, a, training, what="training progress")
        assert c.get(f"/train/{b}").json()["state"] == "queued"  # one job at a time

        pid_a = job_pid(data, a)
        r = c.delete(f"/train/{a}")
        assert r.status_code == 202 and r.json()["cancel_requested"] is True
        job_a = wait_for(c, a, finished, timeout=60, what="the cancel")
        assert job_a["state"] == "cancelled" and job_a["version"] is None, job_a
        wait_dead(pid_a)

        wait_for(c, b, training, what="the queued job to run")
        pid_b = job_pid(data, b)
        os.kill(pid_b, signal.SIGKILL)
        job_b = wait_for(c, b, finished, timeout=30, what="the killed job to settle")
        assert job_b["state"] == "failed"
        assert "killed by SIGKILL" in job_b["error"], job_b["error"]
        assert c.get("/healthz").status_code == 200  # the API never went down
        assert visible_versions(models, "demo") == []
    # restart on the same data: the states are the same, nothing was published, uploads are kept
    with TestClient(create_app(settings)) as c:
        jobs = {j["job_id"]: j for j in c.get("/train").json()["jobs"]}
        assert jobs[a]["state"] == "cancelled" and jobs[b]["state"] == "failed"
        assert all(j["uploads_kept"] for j in jobs.values())
        assert c.get("/models").json()["models"] == []
    assert leftovers(models) == []
    assert not (data / "jobs" / a / "run").exists()  # checkpoints of finished jobs are removed


def test_server_killed_mid_job_restarts_truthfully(tmp_path):
    """kill -9 of the whole server while a job trains and another waits: the training process dies
    with it, a restart marks the running job failed with the reason, runs the queued one, removes a
    half-written publish, and shows no partial version."""
    models, data = tmp_path / "models", tmp_path / "data"
    env = {"STPM_TRAIN_MIN_IMAGES": "8", "STPM_TRAIN_UPLOAD_RETENTION": "keep"}
    proc, url = start_server(models, data, env)
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            r1 = c.post("/train", data=form("demo", epochs=500), files=image_files(8))
            r2 = c.post("/train", data=form("demo", epochs=500, seed=1), files=image_files(8, seed0=50))
            assert r1.status_code == 202 and r2.status_code == 202, (r1.text, r2.text)
            j1, j2 = r1.json()["job_id"], r2.json()["job_id"]
            wait_for(c, j1, training, what="training progress")
            child = job_pid(data, j1)
        kill9(proc)
        wait_dead(child)  # the training process does not outlive its server
    finally:
        stop(proc)
    # what a kill during publishing would leave: a staging folder, owned by the dead training process,
    # with a complete-looking bundle
    from stpm.bundle import store

    staging = models / "demo" / f".staging-{child}-{store._host_tag()}-{'0' * 32}"
    staging.mkdir(parents=True)
    (staging / "manifest.json").write_text(json.dumps({"name": "demo", "version": None}))

    proc, url = start_server(models, data, env)
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            job1 = wait_for(c, j1, finished, timeout=30, what="recovery")
            assert job1["state"] == "failed"
            assert "server restarted while the job was running; resubmit" in job1["error"]
            assert job1["uploads_kept"] is True and (data / "jobs" / j1 / "images").is_dir()
            assert len(list((data / "jobs" / j2 / "images").iterdir())) == 8  # the queued upload survived
            wait_for(c, j2, lambda j: j["state"] == "running", what="the queued job to run after restart")
            assert not staging.exists() and leftovers(models) == []
            assert visible_versions(models, "demo") == [] and c.get("/models").json()["models"] == []
            assert c.delete(f"/train/{j2}").status_code in (200, 202)
            assert wait_for(c, j2, finished, timeout=60)["state"] == "cancelled"
    finally:
        stop(proc)
